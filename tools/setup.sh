#!/usr/bin/env bash
# Idempotent machine + workspace setup, called by `make setup` (and so by `make test`,
# `make demo`, `make bench`). Installs only what is missing:
#   - Debian packages: etcd-server, etcd-client, mariadb-server, redis-server, chromium
#     (the browser tests of the console drive it through playwright-core)
#   - uv (from PyPI, with pip)
#   - .venv with the pinned dependencies of requirements.lock (hashes checked) and the
#     workspace packages (editable, no deps: every dependency comes from the lock)
#   - web/node_modules (`npm ci`) when web/package-lock.json changed
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
[ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1 || need_apt+=(mariadb-server)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # policy-rc.d may forbid starting services from the package scripts; we start
    # the servers ourselves (crm_devstack), so that is fine.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v uv >/dev/null 2>&1; then
    echo "setup: installing uv"
    python3.11 -m pip install --quiet --user uv 2>/dev/null || python3.11 -m pip install --quiet uv
    export PATH="$HOME/.local/bin:$PATH"
fi

if [ ! -x .venv/bin/python ]; then
    uv venv --quiet --python 3.11 .venv
fi
stamp=.venv/.crm-installed
want="$(cat requirements.lock libs/*/pyproject.toml services/*/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing pinned dependencies into .venv"
    uv pip sync --quiet --python .venv/bin/python --require-hashes requirements.lock
    members=()
    for p in libs/*/pyproject.toml services/*/pyproject.toml operator/pyproject.toml; do
        [ -f "$p" ] && members+=(-e "$(dirname "$p")")
    done
    uv pip install --quiet --python .venv/bin/python --no-deps "${members[@]}"
    echo "$want" > "$stamp"
fi

# The console (web/): npm dependencies exactly as locked. Node.js >= 20 and npm >= 11 are
# expected on the machine (Vite 8 needs them). web/.npmrc keeps download addresses out of
# package-lock.json.
if [ -f web/package-lock.json ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "setup: npm missing: install Node.js >= 20 to build and test the web console" >&2
        exit 1
    fi
    web_stamp=web/node_modules/.crm-installed
    web_want="$(cat web/package.json web/package-lock.json | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$web_stamp" ] || [ "$(cat "$web_stamp")" != "$web_want" ]; then
        echo "setup: installing the console's npm dependencies (npm ci in web/)"
        (cd web && npm ci --no-audit --no-fund --loglevel=error)
        echo "$web_want" > "$web_stamp"
    fi
fi
