# The two commands of the README:
#   make report   set up .venv and run the main job (tl-degeneracy report on the bundled default model)
#   make test     set up both test environments (TransformerLens 4.x and 3.9) and run the test suite in each
PYTHON ?= python3
VENV ?= .venv
VENV_TL3 ?= .venv-tl3
TL4 ?= transformer-lens>=4.3,<5
TL3 ?= transformer-lens==3.9.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist; each test runs on one thread, so one per core: CI has 2). Files are the
# unit of distribution, so a module's fixtures are built once. TEST_JOBS=0 runs in this process.
TEST_JOBS ?= 2
XDIST = -n $(TEST_JOBS) --dist loadfile

.PHONY: setup setup-tl3 report test test-tl4 test-tl3 bench gpu-wheels clean

setup: $(VENV)/.installed
setup-tl3: $(VENV_TL3)/.installed

# bench = devinterp 2.0.1, the peer tests/test_devinterp_agreement.py compares against (it skips where
# devinterp is absent, e.g. in .venv-tl3). It adds xarray, zarr and their small deps; the bootstrap's
# constraints file keeps the installed torch.
$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) bash scripts/bootstrap.sh $(VENV) "$(TL4)" dev,gguf,bench
	touch $@

$(VENV_TL3)/.installed: pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) bash scripts/bootstrap.sh $(VENV_TL3) "$(TL3)" dev
	touch $@

report: setup
	$(VENV)/bin/tl-degeneracy report

test: test-tl4 test-tl3

test-tl4: setup
	$(VENV)/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The TransformerLens 3.9 run checks what depends on the TransformerLens version; the slower tests on
# no TransformerLens-specific path (marker tl_agnostic) ran in the 4.x environment already.
test-tl3: setup-tl3
	$(VENV_TL3)/bin/python -m pytest -q $(XDIST) -m "not slow and not tl_agnostic" $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/stats_throughput.py

# Wheels for benchmarks/gpu.sh on an offline GPU machine (Python $(GPU_PYTHON), x86-64 Linux).
GPU_PYTHON ?= 3.12
gpu-wheels:
	grep -v '^#' benchmarks/gpu-wheels.txt | xargs $(PYTHON) -m pip download -q --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl

clean:
	rm -rf $(VENV) $(VENV_TL3) reports
