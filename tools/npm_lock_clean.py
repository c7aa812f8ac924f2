"""Drop the ``funding`` entries (sponsor URLs) from web/package-lock.json: the committed
lock must name no web address at all. npm ci does not read them; `make web-lock` runs
this after npm re-locks, `make web-check` fails when the lock holds any URL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "web" / "package-lock.json"


def main() -> int:
    doc = json.loads(LOCK.read_text(encoding="utf-8"))
    dropped = 0
    for pkg in doc.get("packages", {}).values():
        if pkg.pop("funding", None) is not None:
            dropped += 1
    LOCK.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"npm lock: {dropped} funding entries dropped from {LOCK.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
