#!/usr/bin/env bash
# Re-pin the workspace: resolve with uv, export the pinned requirements with hashes.
# uv.lock stays local (it records registry download addresses; it is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
uv lock --quiet
uv export --quiet --frozen --format requirements-txt --no-emit-workspace --all-groups \
    --no-header -o requirements.lock
if grep -nE 'https?://' requirements.lock; then
    echo "lock: requirements.lock names a download address; refusing" >&2
    exit 1
fi
echo "lock: requirements.lock updated"
