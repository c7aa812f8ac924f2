"""`make schemas-check`: the BI event schemas stay BACKWARD compatible with their
released versions, like `buf breaking` for protos.

    python tools/crm_tools/schemas_check.py [--avsc DIR] [--released DIR]

Schemas live in services/bilog/src/crm_bilog/schemas/avsc/<full name>.avsc (the single
source of truth; they ship with the service). Released versions are recorded as
services/bilog/src/crm_bilog/schemas/released/<full name>/v<N>.avsc. Every current schema
must be valid Avro, pass the bilog service's own loading (PII markers on strings only,
crm.key / crm.event_time naming existing fields, defaults matching their types), and be
BACKWARD compatible with its newest released version: a consumer on the new schema reads
everything written with the released one (add fields with defaults, add enum symbols;
never remove a field without default, change a type, rename). A released schema may not
disappear. Releasing = copying the current .avsc to the next v<N>.avsc in the same
change that ships it (`cp avsc/crm.bi.X.avsc released/crm.bi.X/v2.avsc`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from crm_bilog.domain.avro_json import SchemaError
from crm_bilog.domain.compat import InvalidSchema, check_compatibility, parse_avro
from crm_bilog.domain.pii import PiiPolicy
from crm_bilog.schemas import (
    AVSC_DIR,
    RELEASED_DIR,
    EventSchema,
    load_schema_file,
    released_versions,
)


def check(avsc_dir: Path, released_dir: Path) -> list[str]:
    """Problems found (empty: all good); prints a line per schema."""
    problems: list[str] = []
    current: dict[str, Path] = {p.stem: p for p in sorted(avsc_dir.glob("*.avsc"))}
    if not current:
        problems.append(f"no .avsc files in {avsc_dir}")
    pii = PiiPolicy(b"schemas-check-key-0123456789")
    for name, path in current.items():
        try:
            raw = load_schema_file(path)
            schema = EventSchema.build(raw, pii)
            new = parse_avro(path.read_text(encoding="utf-8"))
        except (SchemaError, InvalidSchema, ValueError, KeyError) as exc:
            problems.append(f"{path.name}: invalid: {exc}")
            continue
        if schema.name != name:
            problems.append(f"{path.name}: holds {schema.name}; name the file after it")
            continue
        versions = released_versions(name, released_dir)
        numbers = [n for n, _ in versions]
        if numbers and numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{name}: released versions must be v1..vN, found {numbers}")
        if not versions:
            print(f"  {name}: not released yet (no {released_dir.name}/{name}/v1.avsc)")
            continue
        latest_n, latest_path = versions[-1]
        try:
            old = parse_avro(latest_path.read_text(encoding="utf-8"))
        except InvalidSchema as exc:
            problems.append(f"{latest_path}: invalid: {exc}")
            continue
        result = check_compatibility(new, [old], "BACKWARD")
        if not result.compatible:
            for message in result.messages:
                problems.append(f"{name}: not BACKWARD compatible with v{latest_n}: {message}")
            continue
        same = load_schema_file(latest_path) == raw
        state = "= released" if same else "compatible, unreleased changes"
        print(f"  {name}: v{latest_n} {state}")
    if released_dir.is_dir():
        for d in sorted(p for p in released_dir.iterdir() if p.is_dir()):
            if d.name not in current and released_versions(d.name, released_dir):
                problems.append(f"{d.name}: released schema was removed (keep it, or deprecate)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avsc", type=Path, default=AVSC_DIR, help="current schemas")
    ap.add_argument("--released", type=Path, default=RELEASED_DIR, help="released versions")
    args = ap.parse_args(argv)
    problems = check(args.avsc, args.released)
    if problems:
        print("schemas: BACKWARD compatibility check failed:", *problems, sep="\n  ")
        return 1
    print("schemas: every schema is BACKWARD compatible with its released version")
    return 0


if __name__ == "__main__":
    sys.exit(main())
