"""Generate the console's TypeScript code from proto/ (protoc-gen-es through buf).

    python tools/gen_web_proto.py            # write into web/src/gen
    python tools/gen_web_proto.py --check    # fail if the checked-in code is stale

buf comes from the venv (buf-bin), protoc-gen-es from web/node_modules (pinned in
web/package-lock.json), so the output is deterministic and the check is a byte
comparison, as for the Python code (tools/gen_proto.py).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
OUT = WEB / "src" / "gen"
BUF = Path(sys.executable).parent / "buf"
PLUGIN = WEB / "node_modules" / ".bin" / "protoc-gen-es"


def generate(out: Path) -> None:
    if not PLUGIN.exists():
        raise SystemExit(f"web-proto: {PLUGIN.relative_to(ROOT)} missing: run `make setup`")
    # buf.gen.yaml names `src/gen`; --output moves that under `out`/.. for the check
    base = out.parent.parent
    subprocess.run([str(BUF), "generate", "--output", str(base)], cwd=WEB, check=True)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    if not args.check:
        shutil.rmtree(OUT, ignore_errors=True)
        generate(OUT)
        print(f"web-proto: generated into {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "src" / "gen"
        generate(fresh)
        have, want = tree(OUT) if OUT.exists() else set(), tree(fresh)
        stale = sorted(want ^ have)
        stale += sorted(f for f in want & have if not filecmp.cmp(OUT / f, fresh / f, False))
        if stale:
            print("web-proto: generated code is stale; run `make proto`:", *stale, sep="\n  ")
            return 1
    print("web-proto: generated TypeScript is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
