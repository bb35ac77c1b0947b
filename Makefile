# radflow — `make demo` and `make test` work on a machine with only python3, pip and make.
PYTHON ?= python3
UV := $(PYTHON) -m uv
STUDIES ?= 1,200,2000   # make bench-scale STUDIES=1,1000,10000 for the 10,000-study point
export UV_PYTHON := $(PYTHON)
export UV_LINK_MODE := copy
# Bytecode at install time: with PYTHONDONTWRITEBYTECODE=1 (set on these machines) Python never
# caches it, and every process (each served flow run is one) compiled prefect, anthropic,
# openai, pydicom... from source again: `import flows.screen` took 8.5 s instead of 4.2 s.
export UV_COMPILE_BYTECODE := 1

.PHONY: demo test test-unit lint format bench-screen bench-preprocess bench-scale bench-startup bench-pool bench-reliability bench-pacs bench-compare bench-limits bench-sr orthanc clean help schema config-doc
.DEFAULT_GOAL := help

help:
	@echo "make demo    run the screening flow on sample studies against the simulator"
	@echo "make test    run the whole test suite (starts and stops its own servers)"
	@echo "make lint    ruff lint + format check"
	@echo "make schema  regenerate schemas/report.schema.json (report.json's published schema)"
	@echo "make config-doc  regenerate docs/config.md (every config key) from the settings"
	@echo "make bench-screen  flow vs plain asyncio, 200 studies x 2 models, 1 s latency"
	@echo "make bench-preprocess  preprocessing vs decode floor vs naive float64, pydicom-data"
	@echo "make bench-scale  1, 200, 2000 tiny studies: marginal time per study, peak RSS"
	@echo "                  (STUDIES=1,1000,10000: the 10,000-study point, opt-in, long)"
	@echo "make bench-startup  radflow screen on one study: wall time and peak RSS of the process"
	@echo "make bench-pool   preprocessing in threads vs a process pool (runner.preprocess)"
	@echo "make bench-reliability  hostile inputs, faults, crash/resume, PHI, injection, secrets"
	@echo "make bench-pacs   screening time and bytes per study: DICOMweb (Orthanc) vs folder"
	@echo "make bench-compare  provider comparison and --estimate: two simulated models"
	@echo "make bench-limits  cost per call of limits: global (Prefect global limits)"
	@echo "make bench-sr     CPU per DICOM SR: build_sr vs highdicom's ComprehensiveSR constructor"

# uv itself comes from pip when missing; the environment lives in .venv/ (uv default).
.venv/.synced: pyproject.toml uv.lock Makefile
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv \
		|| $(PYTHON) -m pip install --quiet --user --break-system-packages uv
	@test -d .venv || $(UV) venv --quiet --python $(PYTHON)
	$(UV) sync --frozen --quiet
	@touch $@

# our own modules' bytecode (the editable install is not compiled by uv); stale files are
# recompiled in memory by Python, so this only ever saves time
.venv/.compiled: .venv/.synced $(shell find flows tasks simulator -name "*.py")
	@.venv/bin/python -m compileall -q flows tasks simulator >/dev/null
	@touch $@

demo: .venv/.compiled
	.venv/bin/radflow demo --out demo-output

# the PACS tests and bench-pacs run a real Orthanc: on Debian, get it (and its DICOMweb
# plugin) once; it is started by the tests on a free loopback port, never as a service
orthanc:
	@test -x /usr/sbin/Orthanc -a -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
		|| ! command -v apt-get >/dev/null 2>&1 \
		|| (apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb) >/dev/null 2>&1) \
		|| echo "orthanc could not be installed: the PACS tests will be skipped"

test: .venv/.compiled orthanc
	@# the UI check of tests/test_events_e2e.py drives headless Chromium; on Debian, get it once
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 \
		|| (apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the flow-run page screenshot check will be skipped"
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15

test-unit: .venv/.compiled
	.venv/bin/python -m pytest -q -m "not e2e"

lint: .venv/.synced
	.venv/bin/ruff check flows tasks simulator tests benchmarks infra
	.venv/bin/ruff format --check flows tasks simulator tests benchmarks infra

format: .venv/.synced
	.venv/bin/ruff format flows tasks simulator tests benchmarks infra
	.venv/bin/ruff check --fix flows tasks simulator tests benchmarks infra

schema: .venv/.compiled  ## regenerate schemas/report.schema.json from the pydantic Report model
	.venv/bin/python -c "from tasks.reports.write import write_schema_file; print(write_schema_file())"

config-doc: .venv/.compiled  ## regenerate docs/config.md from the settings' Field descriptions
	.venv/bin/python -c "from tasks.core.settings_doc import write_config_doc; print(write_config_doc())"

bench-screen: .venv/.compiled  ## throughput of the screening flow vs a plain-asyncio loop
	.venv/bin/python -m benchmarks.screen --studies 200 --latency 1 --concurrency 32

bench-preprocess: .venv/.compiled  ## preprocessing time vs the decode floor and a naive pipeline
	.venv/bin/python -m benchmarks.preprocess --repeat 3

bench-scale: .venv/.compiled  ## linear time and flat memory up to 2,000 studies (STUDIES=1,1000,10000: the long 10k point)
	.venv/bin/python -m benchmarks.scale --sizes $(STUDIES) --shard-size 250

bench-startup: .venv/.compiled  ## wall time and peak RSS of `radflow screen` on one study (a new process)
	.venv/bin/python -m benchmarks.startup --repeat 5

bench-pool: .venv/.compiled  ## preprocessing: threads vs a process pool on this machine's cores
	.venv/bin/python -m benchmarks.pool

bench-reliability: .venv/.compiled  ## per point: what was tried and the measured outcome
	.venv/bin/python -m benchmarks.reliability

bench-pacs: .venv/.compiled orthanc  ## the same studies screened from Orthanc and from a folder
	.venv/bin/python -m benchmarks.pacs --slices 300 --studies 4

bench-compare: .venv/.compiled  ## two simulated models at two latencies and prices; --estimate
	.venv/bin/python -m benchmarks.compare --synthetic 16 --fast 0.3 --slow 1.2

bench-limits: .venv/.compiled  ## per call: a Prefect global concurrency / rate-limit slot
	.venv/bin/python -m benchmarks.limits --calls 200 --parallel 8

bench-sr: .venv/.compiled  ## CPU per SR: build_sr against highdicom's constructor, same reports
	.venv/bin/python -m benchmarks.sr --rounds 5

clean:
	rm -rf .venv demo-output bench-output .pytest_cache
