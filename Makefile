# CRM 2.0 platform: the commands a newcomer needs are `make demo` and `make test`.
# Every target installs what it needs first (make setup is idempotent and fast when
# nothing changed).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
export PATH := $(HOME)/.local/bin:$(PATH)

# Our Python code (mypy strict, ruff). Generated protobuf code is excluded from ruff
# (it is checked for staleness instead) and type-checked through its .pyi stubs.
PY_SRC := libs/crm_common/src libs/crm_devstack/src services/assignment/src \
          services/recommendation/src services/scheduler/src services/bilog/src \
          operator/src libs/crm_ctl/src libs/crm_web/src tools

.PHONY: help setup lock proto proto-check docs docs-check lint fmt typecheck buf-lint \
        stack-up stack-down k8s-check schemas-check check pytest test demo bench eval manifests clean web-lock \
        web web-check screenshot

help:
	@echo "make demo   - start the platform locally and play a short call-center scenario"
	@echo "make test   - lint, type-check, generated-code checks and the whole test suite"
	@echo "make bench  - benchmarks (ratios against baselines measured in the same run)"
	@echo "make proto  - regenerate Python code from proto/;  make docs - API reference"
	@echo "make eval   - offline evaluation of the car recommendations (hit@10, NDCG@10)"
	@echo "make lock   - re-pin dependencies into requirements.lock"
	@echo "make web    - build the agent console (web/dist), served by python -m crm_web serve"
	@echo "make screenshot - retake docs/img/console-task-detail.png (the console browser test)"

setup:
	@tools/setup.sh

lock:
	@tools/lock.sh

proto: setup
	$(PY) tools/gen_proto.py
	$(PY) tools/gen_web_proto.py

proto-check: setup
	$(PY) tools/gen_proto.py --check
	$(PY) tools/gen_web_proto.py --check

docs: setup
	$(PY) tools/gen_docs.py
	$(PY) tools/gen_settings_docs.py

docs-check: setup
	$(PY) tools/gen_docs.py --check
	$(PY) tools/gen_settings_docs.py --check

buf-lint: setup
	cd proto && ../.venv/bin/buf lint && echo "buf: lint ok"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

fmt: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

typecheck: setup
	.venv/bin/mypy $(PY_SRC)

stack-up: setup
	$(PY) -m crm_devstack up

stack-down: setup
	$(PY) -m crm_devstack down

k8s-check: setup
	$(PY) tools/k8s_check.py

schemas-check: setup
	$(PY) tools/crm_tools/schemas_check.py

# The console: TypeScript type-check; package-lock.json must name no download address
# (web/.npmrc: omit-lockfile-registry-resolved) and no other URL (`make web-lock` drops
# the sponsors' funding URLs npm records).
web-check: setup
	@if grep -nE '"resolved"|registry\.|\.tgz|https?://' web/package-lock.json; then \
	    echo "web: package-lock.json names a URL; run make web-lock" >&2; exit 1; fi
	cd web && npx --no-install tsc --noEmit && echo "web: typecheck ok"

# web/dist is rebuilt only when a source of the console changed (fast when nothing did).
WEB_SRC := $(shell find web/src -type f 2>/dev/null) web/index.html web/package-lock.json \
           web/vite.config.ts web/tsconfig.json
web/dist/index.html: $(WEB_SRC)
	cd web && npm run build

web: setup web/dist/index.html

# The README's console screenshot, taken by the browser test on the real platform.
screenshot: setup stack-up
	$(PY) -m pytest -q tests/web/test_web_console.py -k test_agent_accepts_an_offer
	cp tests/web/artifacts/console-task-detail.png docs/img/console-task-detail.png
	@echo "screenshot: docs/img/console-task-detail.png updated"

# Re-lock the console's npm dependencies (after editing web/package.json).
web-lock:
	cd web && npm install --package-lock-only --no-audit --no-fund --loglevel=error
	$(PY) tools/npm_lock_clean.py

check: lint typecheck buf-lint proto-check docs-check k8s-check schemas-check web-check

pytest: stack-up
	$(PY) -m pytest $(PYTEST_ARGS)

test: setup check pytest

demo: setup stack-up web
	PYTHONPATH=tools $(PY) -m crm_tools.demo $(DEMO_ARGS)

bench: setup stack-up
	PYTHONPATH=tools $(PY) -m crm_tools.bench $(BENCH_ARGS)

eval: setup
	PYTHONPATH=tools $(PY) -m crm_tools.eval_recommendation

manifests: setup
	$(PY) -m crm_operator manifests

clean: stack-down
	rm -rf .stack .bench .demo
