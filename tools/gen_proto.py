"""Generate Python code, gRPC stubs and mypy stubs for every proto under proto/.

    python tools/gen_proto.py            # write into libs/crm_proto/src
    python tools/gen_proto.py --check    # fail if the checked-in code is stale

The output is deterministic for a given grpcio-tools / mypy-protobuf (both pinned in
requirements.lock), so the check is a plain byte comparison.
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
PROTO = ROOT / "proto"
OUT = ROOT / "libs" / "crm_proto" / "src"
BIN = Path(sys.executable).parent


def generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO)
    # Regular packages (not namespace ones) so that mypy and importlib agree.
    for d in sorted({p.parent for p in out.rglob("*_pb2.py")}):
        while d != out:
            (d / "__init__.py").touch()
            d = d.parent
    (out / "crm" / "py.typed").touch()


def tree(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    if not args.check:
        shutil.rmtree(OUT / "crm", ignore_errors=True)
        generate(OUT)
        print(f"proto: generated into {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        have, want = tree(OUT), tree(fresh)
        stale = sorted(want ^ have)
        stale += sorted(f for f in want & have if not filecmp.cmp(OUT / f, fresh / f, False))
        if stale:
            print("proto: generated code is stale; run `make proto`:", *stale, sep="\n  ")
            return 1
    print("proto: generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
