"""Per-service config schemas: the very parse functions and models the services use.

The registry maps a service name to ``"module:function"`` (the ``parse(key, raw)`` its
ConfigWatcher runs) and ``"module:Model"`` (for JSON Schema). The modules only need
pydantic, so the operator imports them and validates a CRMConfig exactly like the service
will; a config the operator accepts is a config the service applies.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

__all__ = [
    "REGISTRY",
    "ConfigInvalid",
    "ServiceSchema",
    "canonical_json",
    "json_schema",
    "key_known",
    "validate",
]


@dataclass(frozen=True, slots=True)
class ServiceSchema:
    service: str
    parse: str
    """``module:function`` with the signature ``parse(key: str, raw: bytes) -> value``."""
    model: str
    """``module:Model``: the pydantic model of one value (JSON Schema, docs)."""
    keys: tuple[str, ...]
    """The keys the service always reads (documentation and the CRD description)."""
    other_keys: str = ""
    """Which other keys it reads, in words (keys its ``parse`` accepts: lines are data)."""


REGISTRY: Mapping[str, ServiceSchema] = {
    s.service: s
    for s in (
        ServiceSchema(
            "assignment",
            "crm_assignment.config:parse",
            "crm_assignment.config:LineConfig",
            ("SALE", "AFTER_SALE", "FINANCE"),
            "or any other business line: its name, with its code in the value",
        ),
        ServiceSchema(
            "recommendation",
            "crm_recommendation.config:parse",
            "crm_recommendation.config:RankingConfig",
            ("ranking",),
        ),
    )
}


class ConfigInvalid(ValueError):
    """A CRMConfig that its service would reject; ``field`` names the offending field
    (``spec.data.weights.star``), ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def parser(service: str) -> Callable[[str, bytes], Any]:
    fn: Callable[[str, bytes], Any] = _load(REGISTRY[service].parse)
    return fn


def key_known(service: str, key: str) -> bool:
    """Whether ``service`` reads ``key``: a declared key, or one its parser does not refuse
    by name (a new business line)."""
    if key in REGISTRY[service].keys:
        return True
    try:
        parser(service)(key, b"{}")
    except pydantic.ValidationError:
        return True  # the key is fine, the empty value is not
    except ValueError:
        return False
    return True


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """The bytes written to etcd for ``data`` (stable: sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def validate(service: str, key: str, data: object) -> bytes:
    """Validate like the service does; returns the bytes to write, or raises ConfigInvalid
    naming the first offending field."""
    if service not in REGISTRY:
        raise ConfigInvalid("spec.service", f"unknown service {service!r}: expected one of "
                            f"{', '.join(sorted(REGISTRY))}")  # fmt: skip
    if not isinstance(data, Mapping):
        raise ConfigInvalid("spec.data", "must be an object")
    raw = canonical_json(data)
    try:
        parser(service)(key, raw)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigInvalid(f"spec.data.{where}" if where else "spec.data",
                            first["msg"] + more) from exc  # fmt: skip
    except ValueError as exc:  # the service refuses the key itself
        raise ConfigInvalid("spec.key", str(exc)) from exc
    return raw


@functools.cache
def json_schema(service: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12, as pydantic writes it) of one value of ``service``."""
    model: type[pydantic.BaseModel] = _load(REGISTRY[service].model)
    return model.model_json_schema()
