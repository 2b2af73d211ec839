# The two commands: `make run` (install, then run web, workers, scheduler and the embedded Redis)
# and `make test` (install, then lint, type-check and run every test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
WORKERS ?= 4
G ?= 2
W ?= 4

.PHONY: run test test-ha test-slow lint chromium bench bench-cluster faults mutation

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start --procfile Procfile --port $(PORT) \
		--concurrency worker=$(WORKERS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Unit tests (fakeredis, CPU-bound) on two processes; the integration tests one at a time, as
# several start servers and load them.
test: lint chromium
	$(BIN)/pytest -q -n 2 tests/unit
	$(BIN)/pytest -q -m "not ha and not slow" tests/integration

# Past one Redis: replicas, sentinels, a queue server of its own and a Redis Cluster, started by the tests (about two
# minutes); CI runs it too.
test-ha: $(BIN)/.installed
	$(BIN)/pytest -q -m ha tests/integration

# The quick runs of the fault suite and of the benchmark: a minute or so of load each; CI runs it.
test-slow: $(BIN)/.installed
	$(BIN)/pytest -q -m slow tests/integration

# The board's browser test drives Debian's Chromium (Playwright's own download needs the
# internet): installed here when missing and we are root, as on CI; otherwise the test skips,
# saying why (with CI set, it fails).
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y chromium || { apt-get update && apt-get install -y chromium; } \
		|| echo "WARNING: chromium not installed: the browser test will skip (fail on CI)" >&2; \
	fi

# The pipeline benchmark: G gunicorn processes, W RQ workers; BENCH_ARGS for more (see --help).
bench: $(BIN)/.installed
	$(BIN)/python -m bench.run --web $(G) --workers $(W) $(BENCH_ARGS)

# One Redis against a Redis Cluster of three primaries for the data, alternated (a few minutes).
bench-cluster: $(BIN)/.installed
	$(BIN)/python -m bench.cluster $(BENCH_ARGS)

# The fault suite (a minute of load per fault) and a 10-minute soak; a quick run is in `make test-slow`.
faults: $(BIN)/.installed
	$(BIN)/python -m bench.faults $(FAULTS_ARGS)

# Mutation testing (mutmut) of the core modules against the unit tests: slow (about 1.3 s a
# mutant with one child on 2 cores; ~3,000 mutants), so not in `make test` or CI. MUTANTS
# narrows it (make mutation MUTANTS='callstate.drain.*'); a rerun keeps the results in mutants/
# and tests only what is unchecked. `$(BIN)/mutmut show NAME` prints a survivor's diff.
MUTANTS ?=
MUTATION_CHILDREN ?= 1
mutation: $(BIN)/.installed
	$(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) $(if $(MUTANTS),'$(MUTANTS)')
	$(BIN)/mutmut results
