"""JSON payloads -> Avro data, compiled once per schema, with a path for every error.

The event payload is plain JSON (what a service naturally writes), not Avro's JSON
encoding: a union value is given bare (``"operator_id": 7`` or ``null``; the tagged form
``{"int": 7}`` is accepted too), an enum as its symbol, ``bytes``/``fixed`` as a string
of code points 0..255, ``timestamp-millis`` as integer milliseconds. Fields with a
default may be left out; fields the schema does not know are errors.

:func:`compile_converter` turns a schema into a function ``payload -> datum`` that
raises :class:`ConversionError` with every ``(path, reason)`` found (paths like
``operator_header.operator_id`` or ``items[2].car_id``, relative to the payload; ``""``
is the payload itself). Reasons never quote the offending value (it may be personal
data). Fields marked ``"pii": "mask"|"hash"`` are protected in the datum it returns.

:func:`compile_protector` is the forgiving twin used for bad rows: it walks an *invalid*
payload along the schema and returns a copy safe to keep (PII fields masked/hashed,
values of fields unknown to the schema redacted).

Nothing is evaluated at import time; every conversion is total (any JSON value gives a
datum or a :class:`ConversionError`, never another exception).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from crm_bilog.domain.pii import PII_KINDS, REDACTED, PiiPolicy

__all__ = [
    "MAX_REPORTED_ERRORS",
    "ConversionError",
    "Converter",
    "SchemaError",
    "compile_converter",
    "compile_protector",
    "join_path",
]

Converter = Callable[[Any], Any]

MAX_REPORTED_ERRORS = 50
"""Errors reported per event at most (the rest are summarised in one more entry)."""

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = 3.4028234663852886e38
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


class SchemaError(ValueError):
    """The schema uses something this module does not support, or marks PII wrongly."""


class ConversionError(ValueError):
    """The payload does not match the schema; ``errors`` are ``(path, reason)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p or '<payload>'}: {r}" for p, r in errors[:3]))
        self.errors = errors


class _Invalid(Exception):
    """Internal: errors with their path segments (innermost last), built on the way up."""

    __slots__ = ("errors",)

    def __init__(self, errors: list[tuple[list[str], str]]) -> None:
        self.errors = errors


def _fail(reason: str) -> _Invalid:
    return _Invalid([([], reason)])


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def join_path(segments: Iterable[str]) -> str:
    """``["items", "[2]", "car_id"]`` -> ``items[2].car_id``."""
    out = ""
    for seg in segments:
        if seg.startswith("["):
            out += seg
        else:
            out = f"{out}.{seg}" if out else seg
    return out


def _full_name(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _valid_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- primitive converters --------------------------------------------------------------


def _c_null(v: Any) -> Any:
    if v is None:
        return None
    raise _fail(f"expected null, got {_json_type(v)}")


def _c_boolean(v: Any) -> Any:
    if type(v) is bool:
        return v
    raise _fail(f"expected a boolean, got {_json_type(v)}")


def _int_converter(lo: int, hi: int, what: str) -> Converter:
    def conv(v: Any) -> Any:
        if type(v) is int:
            if lo <= v <= hi:
                return v
            raise _fail(f"out of range for {what}")
        raise _fail(f"expected an integer ({what}), got {_json_type(v)}")

    return conv


def _c_double(v: Any) -> Any:
    t = type(v)
    if t is float:
        return v
    if t is int:
        try:
            return float(v)
        except OverflowError:
            raise _fail("out of range for double") from None
    raise _fail(f"expected a number (double), got {_json_type(v)}")


def _c_float(v: Any) -> Any:
    x = _c_double(v) if type(v) is not float else v
    if math.isfinite(x) and abs(x) > _FLOAT_MAX:
        raise _fail("out of range for float (32-bit)")
    return x


def _c_string(v: Any) -> Any:
    if type(v) is str:
        if _valid_text(v):
            return v
        raise _fail("not valid Unicode text (lone surrogate)")
    raise _fail(f"expected a string, got {_json_type(v)}")


def _c_bytes(v: Any) -> Any:
    if type(v) is str:
        try:
            return v.encode("latin-1")
        except UnicodeEncodeError:
            raise _fail("bytes must be a string of code points 0..255") from None
    raise _fail(f"expected a string (bytes), got {_json_type(v)}")


_PRIMITIVE_CONVERTERS: dict[str, Converter] = {
    "null": _c_null,
    "boolean": _c_boolean,
    "int": _int_converter(_INT_MIN, _INT_MAX, "int, 32-bit"),
    "long": _int_converter(_LONG_MIN, _LONG_MAX, "long, 64-bit"),
    "float": _c_float,
    "double": _c_double,
    "bytes": _c_bytes,
    "string": _c_string,
}

_TIMESTAMP_CONVERTERS: dict[str, Converter] = {
    "timestamp-millis": _int_converter(
        _LONG_MIN, _LONG_MAX, "timestamp-millis: milliseconds since the Unix epoch"
    ),
    "timestamp-micros": _int_converter(
        _LONG_MIN, _LONG_MAX, "timestamp-micros: microseconds since the Unix epoch"
    ),
}


@dataclass
class _Field:
    name: str
    conv: Converter
    has_default: bool
    default_json: Any
    pii: str | None
    default_value: Any = None
    default_ready: bool = False
    default_mutable: bool = False


class _Compiler:
    def __init__(self, pii: PiiPolicy) -> None:
        self.pii = pii
        self.named: dict[str, Converter] = {}
        self.named_kind: dict[str, str] = {}

    # Every compiled node also records the union branch name it answers to.
    def compile(self, node: Any, ns: str | None) -> tuple[Converter, str]:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return _PRIMITIVE_CONVERTERS[node], node
            full = _full_name(node, ns)
            if full not in self.named and node in self.named:
                full = node
            if full not in self.named:
                raise SchemaError(f"unknown type {node!r}")
            named = self.named

            def ref(v: Any, _full: str = full) -> Any:
                return named[_full](v)

            return ref, full
        if isinstance(node, list):
            return self._union(node, ns), "union"
        if not isinstance(node, dict):
            raise SchemaError(f"not a schema: {node!r}")
        t = node.get("type")
        if isinstance(t, str) and t in _PRIMITIVES:
            logical = node.get("logicalType")
            if t == "long" and logical in _TIMESTAMP_CONVERTERS:
                return _TIMESTAMP_CONVERTERS[logical], t
            return _PRIMITIVE_CONVERTERS[t], t
        if t in ("record", "error"):
            return self._record(node, ns)
        if t == "enum":
            return self._enum(node, ns)
        if t == "array":
            return self._array(node, ns), "array"
        if t == "map":
            return self._map(node, ns), "map"
        if t == "fixed":
            return self._fixed(node, ns)
        return self.compile(t, ns)

    def _declare(self, node: dict[str, Any], ns: str | None, conv: Converter) -> str:
        name = node["name"]
        full = _full_name(name, node.get("namespace") or ns)
        self.named[full] = conv
        return full

    def _record(self, node: dict[str, Any], ns: str | None) -> tuple[Converter, str]:
        fields: list[_Field] = []
        known: set[str] = set()
        pii = self.pii
        full_holder: list[str] = []

        def conv(v: Any) -> Any:
            if type(v) is not dict:
                raise _fail(f"expected an object (record {full_holder[0]}), got {_json_type(v)}")
            out: dict[str, Any] = {}
            errors: list[tuple[list[str], str]] | None = None
            matched = 0
            for f in fields:
                if f.name in v:
                    matched += 1
                    try:
                        x = f.conv(v[f.name])
                    except _Invalid as e:
                        errors = errors if errors is not None else []
                        errors.extend(([f.name, *segs], reason) for segs, reason in e.errors)
                        continue
                    if f.pii is not None and x is not None:
                        x = pii.apply(f.pii, x)
                    out[f.name] = x
                elif f.has_default:
                    out[f.name] = _default_of(f)
                else:
                    errors = errors if errors is not None else []
                    errors.append(([f.name], "required field is missing"))
            if matched < len(v):
                errors = errors if errors is not None else []
                errors.extend(
                    ([str(k)], f"unknown field (not in {full_holder[0]})")
                    for k in v
                    if k not in known
                )
            if errors:
                raise _Invalid(errors)
            return out

        full = self._declare(node, ns, conv)
        full_holder.append(full)
        inner_ns = full.rpartition(".")[0] or None
        for spec in node.get("fields", []):
            field_conv, _ = self.compile(spec["type"], inner_ns)
            kind = spec.get("pii")
            if kind is not None:
                if kind not in PII_KINDS:
                    raise SchemaError(f"{full}.{spec['name']}: pii must be one of {PII_KINDS}")
                if spec["type"] not in ("string", ["null", "string"]):
                    raise SchemaError(f"{full}.{spec['name']}: pii fields must be string or null")
            fields.append(
                _Field(
                    name=spec["name"],
                    conv=field_conv,
                    has_default="default" in spec,
                    default_json=spec.get("default"),
                    pii=kind,
                )
            )
            known.add(spec["name"])
        return conv, full

    def _enum(self, node: dict[str, Any], ns: str | None) -> tuple[Converter, str]:
        symbols = frozenset(node.get("symbols", []))
        shown = ", ".join(node.get("symbols", []))

        def conv(v: Any) -> Any:
            if type(v) is str and v in symbols:
                return v
            if type(v) is str:
                raise _fail(f"unknown symbol; expected one of {shown}")
            raise _fail(f"expected a string (one of {shown}), got {_json_type(v)}")

        return conv, self._declare(node, ns, conv)

    def _fixed(self, node: dict[str, Any], ns: str | None) -> tuple[Converter, str]:
        size = int(node["size"])

        def conv(v: Any) -> Any:
            raw = _c_bytes(v)
            if len(raw) != size:
                raise _fail(f"expected exactly {size} bytes")
            return raw

        return conv, self._declare(node, ns, conv)

    def _array(self, node: dict[str, Any], ns: str | None) -> Converter:
        item, _ = self.compile(node["items"], ns)

        def conv(v: Any) -> Any:
            if type(v) is not list:
                raise _fail(f"expected an array, got {_json_type(v)}")
            out = []
            errors: list[tuple[list[str], str]] | None = None
            for i, x in enumerate(v):
                try:
                    out.append(item(x))
                except _Invalid as e:
                    errors = errors if errors is not None else []
                    errors.extend(([f"[{i}]", *segs], reason) for segs, reason in e.errors)
            if errors:
                raise _Invalid(errors)
            return out

        return conv

    def _map(self, node: dict[str, Any], ns: str | None) -> Converter:
        value_conv, _ = self.compile(node["values"], ns)

        def conv(v: Any) -> Any:
            if type(v) is not dict:
                raise _fail(f"expected an object (map), got {_json_type(v)}")
            out = {}
            errors: list[tuple[list[str], str]] | None = None
            for k, x in v.items():
                seg = f"[{k!r}]"
                if not _valid_text(k):
                    errors = errors if errors is not None else []
                    errors.append(([seg], "map key is not valid Unicode text"))
                    continue
                try:
                    out[k] = value_conv(x)
                except _Invalid as e:
                    errors = errors if errors is not None else []
                    errors.extend(([seg, *segs], reason) for segs, reason in e.errors)
            if errors:
                raise _Invalid(errors)
            return out

        return conv

    def _union(self, node: list[Any], ns: str | None) -> Converter:
        has_null = False
        branches: list[tuple[str, Converter]] = []
        for b in node:
            c, name = self.compile(b, ns)
            if name == "null":
                has_null = True
            else:
                branches.append((name, c))
        by_name = {name: c for name, c in branches}
        by_short = {name.rpartition(".")[2]: c for name, c in branches}
        shown = ", ".join((["null"] if has_null else []) + [n for n, _ in branches])

        def conv(v: Any) -> Any:
            if v is None:
                if has_null:
                    return None
                raise _fail(f"null is not allowed here (one of: {shown})")
            first: _Invalid | None = None
            for _, c in branches:
                try:
                    return c(v)
                except _Invalid as e:
                    if first is None:
                        first = e
            if type(v) is dict and len(v) == 1:  # Avro's JSON encoding: {"int": 7}
                ((tag, inner),) = v.items()
                c2 = by_name.get(tag) or by_short.get(tag)
                if c2 is not None:
                    try:
                        return c2(inner)
                    except _Invalid as e:
                        raise _Invalid([([str(tag), *s], r) for s, r in e.errors]) from None
            if len(branches) == 1 and first is not None:
                raise first
            raise _fail(f"matches none of the union's types ({shown})")

        return conv


def _default_of(f: _Field) -> Any:
    if not f.default_ready:
        try:
            f.default_value = f.conv(f.default_json)
        except _Invalid as exc:
            raise SchemaError(f"field {f.name!r}: default does not match its type") from exc
        f.default_mutable = isinstance(f.default_value, (list, dict))
        f.default_ready = True
    return copy.deepcopy(f.default_value) if f.default_mutable else f.default_value


def compile_converter(schema: dict[str, Any], pii: PiiPolicy) -> Converter:
    """``payload -> datum`` for ``schema`` (a record schema as parsed JSON); raises
    :class:`SchemaError` for schemas it cannot handle."""
    compiler = _Compiler(pii)
    root, _ = compiler.compile(schema, schema.get("namespace"))
    _check_defaults(schema, compiler)

    def convert(payload: Any) -> Any:
        try:
            return root(payload)
        except _Invalid as e:
            errors = [(join_path(segs), reason) for segs, reason in e.errors]
            if len(errors) > MAX_REPORTED_ERRORS:
                more = len(errors) - MAX_REPORTED_ERRORS
                errors = errors[:MAX_REPORTED_ERRORS]
                errors.append(("", f"and {more} more errors"))
            raise ConversionError(errors) from None
        except RecursionError:
            raise ConversionError([("", "nested too deeply")]) from None

    return convert


def _check_defaults(schema: dict[str, Any], compiler: _Compiler) -> None:
    """Evaluate every field default once, so a bad default fails at load time."""
    probe = compiler.named.get(_full_name(schema["name"], schema.get("namespace")))
    if probe is None:
        return

    def walk(node: Any, ns: str | None) -> None:
        if isinstance(node, list):
            for b in node:
                walk(b, ns)
        elif isinstance(node, dict):
            t = node.get("type")
            if t in ("record", "error"):
                full = _full_name(node["name"], node.get("namespace") or ns)
                inner = full.rpartition(".")[0] or None
                for spec in node.get("fields", []):
                    if "default" in spec:
                        conv, _ = compiler.compile(spec["type"], inner)
                        try:
                            conv(spec["default"])
                        except _Invalid as exc:
                            raise SchemaError(
                                f"{full}.{spec['name']}: default does not match its type"
                            ) from exc
                    walk(spec["type"], inner)
            elif t == "array":
                walk(node["items"], ns)
            elif t == "map":
                walk(node["values"], ns)
            elif isinstance(t, (dict, list)):
                walk(t, ns)

    walk(schema, schema.get("namespace"))


# -- bad rows: protect an invalid payload ------------------------------------------------


def compile_protector(schema: dict[str, Any], pii: PiiPolicy) -> Callable[[Any], Any]:
    """``payload -> copy safe to keep`` for payloads that failed conversion (see module
    doc). Total: never raises for any JSON value."""
    named: dict[str, dict[str, Any]] = {}

    def index(node: Any, ns: str | None) -> None:
        if isinstance(node, list):
            for b in node:
                index(b, ns)
        elif isinstance(node, dict):
            t = node.get("type")
            if t in ("record", "error", "enum", "fixed"):
                full = _full_name(node["name"], node.get("namespace") or ns)
                named[full] = node
                inner = full.rpartition(".")[0] or None
                for spec in node.get("fields", []):
                    index(spec["type"], inner)
            elif t == "array":
                index(node["items"], ns)
            elif t == "map":
                index(node["values"], ns)
            elif isinstance(t, (dict, list)):
                index(t, ns)

    index(schema, schema.get("namespace"))

    def resolve(node: Any, ns: str | None) -> tuple[Any, str | None]:
        while True:
            if isinstance(node, str) and node not in _PRIMITIVES:
                full = _full_name(node, ns)
                target = named.get(full) or named.get(node)
                if target is None:
                    return None, ns
                node, ns = target, full.rpartition(".")[0] or None
                continue
            if isinstance(node, dict) and isinstance(node.get("type"), (dict, list)):
                node = node["type"]
                continue
            if isinstance(node, dict) and node.get("type") in ("record", "error", "enum"):
                full = _full_name(node["name"], node.get("namespace") or ns)
                return node, full.rpartition(".")[0] or None
            return node, ns

    def protect(node: Any, ns: str | None, value: Any, depth: int) -> Any:
        if depth > 64:
            return REDACTED
        node, ns = resolve(node, ns)
        if isinstance(node, list):
            for b in node:
                bn, _ = resolve(b, ns)
                kind = bn.get("type") if isinstance(bn, dict) else bn
                if (isinstance(value, dict) and kind in ("record", "error", "map")) or (
                    isinstance(value, list) and kind == "array"
                ):
                    return protect(b, ns, value, depth + 1)
            return value if not isinstance(value, (dict, list)) else REDACTED
        kind = node.get("type") if isinstance(node, dict) else node
        if kind in ("record", "error") and isinstance(value, dict):
            specs = {spec["name"]: spec for spec in node.get("fields", [])}
            out: dict[str, Any] = {}
            for k, x in value.items():
                spec = specs.get(k)
                if spec is None:
                    out[k] = REDACTED
                elif spec.get("pii") is not None:
                    out[k] = (
                        pii.apply(spec["pii"], x)
                        if isinstance(x, str)
                        else (None if x is None else REDACTED)
                    )
                else:
                    out[k] = protect(spec["type"], ns, x, depth + 1)
            return out
        if kind == "array" and isinstance(value, list):
            return [protect(node["items"], ns, x, depth + 1) for x in value]
        if kind == "map" and isinstance(value, dict):
            return {k: protect(node["values"], ns, x, depth + 1) for k, x in value.items()}
        if isinstance(value, (dict, list)):
            return REDACTED  # a structure where the schema has none: cannot tell what it is
        return value

    def protect_payload(payload: Any) -> Any:
        try:
            return protect(schema, schema.get("namespace"), payload, 0)
        except RecursionError:
            return REDACTED

    return protect_payload
