# fastmtl: `make test` and `make bench` set up an environment, then run.
#   make test            .venv with torch==$(TORCH_VERSION) (CPU build) + triton, then all tests
#   make test VENV=      the current python as it is (GPU machines: no registry); the package is
#                        installed with --no-deps --no-build-isolation
#   make bench           set-up, then the benchmark table (fastmtl-bench)
#   make check-cuda      compile csrc/ against a CUDA torch in its own venv (compile only)
#   make aot / aot-full  compile every Triton kernel for sm_80 and sm_90 (no GPU needed)
#   make gpu-check       on a GPU machine: build, CUDA tests per backend, GPU benchmark
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.7.1
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_VENV ?= .cuda-venv
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 9.0
PYTEST_ARGS ?=
TEST_THREADS ?= 1 3

ifeq ($(strip $(VENV)),)
PYTHON ?= python3
SETUP_STAMP :=
else
PYTHON := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.fastmtl-setup
endif

.PHONY: setup test test-threads test-kernels aot aot-full aot-compat gpu-check lint bench check-cuda clean

ifeq ($(strip $(VENV)),)
setup:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
else
setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build
	$(PYTHON) -m pip install -q torch==$(TORCH_VERSION) triton==$(TRITON_VERSION)
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[triton,test,bench,compare,plot]" \
		torch==$(TORCH_VERSION) triton==$(TRITON_VERSION)
	touch $@
endif

# All tests on the default backends, then the op tests again with every Triton kernel run by
# Triton's CPU interpreter (process-wide, so a second pytest process over the `kernels` mark).
test: setup
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)
	TRITON_INTERPRET=1 FASTMTL_BACKEND=triton $(PYTHON) -m pytest tests -m kernels $(PYTEST_ARGS)

# The first pass again under other torch thread counts (OMP_NUM_THREADS: 1, and 3 on CI's 2
# cores): a test whose outcome hangs on the summation order of a parallel reduction fails here.
test-threads: setup
	for n in $(TEST_THREADS); do \
		echo "== torch threads: $$n"; \
		OMP_NUM_THREADS=$$n $(PYTHON) -m pytest tests -q -m "not aot and not gpu_check" $(PYTEST_ARGS) || exit 1; \
	done

test-kernels: setup
	TRITON_INTERPRET=1 FASTMTL_BACKEND=triton $(PYTHON) -m pytest tests -m kernels $(PYTEST_ARGS)

# Every Triton kernel compiled for sm_80 and sm_90 with no GPU (fastmtl.kernels.aot): the quick
# subset (also part of `make test`), or every T, dtype and autotune config; prints the table.
aot: setup
	FASTMTL_AOT_TABLE=1 $(PYTHON) -m pytest tests/test_aot.py -s -q $(PYTEST_ARGS)

aot-full: setup
	FASTMTL_AOT=full FASTMTL_AOT_TABLE=1 $(PYTHON) -m pytest tests/test_aot.py -s -q $(PYTEST_ARGS)

# The same with the GPU machines' triton (AOT_TRITON) in its own venv: `make aot-compat`, or
# `make aot-compat FASTMTL_AOT=full`.
AOT_TRITON ?= 3.6.0
AOT_VENV ?= .aot-venv
aot-compat:
	test -x $(AOT_VENV)/bin/python || python3 -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) triton==$(AOT_TRITON) \
		numpy pytest pytest-benchmark setuptools wheel
	$(AOT_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	FASTMTL_AOT_TABLE=1 $(AOT_VENV)/bin/python -m pytest tests/test_aot.py -s -q $(PYTEST_ARGS)

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PYTHON) -m fastmtl.bench.cli

# On a GPU machine (no registry; torch, triton, pytest there): install, build the CUDA extension,
# the cuda-marked tests with each backend, the GPU benchmark; JSON + summary in GPU_CHECK_OUT.
# Without a GPU it runs end to end and reports the GPU stages as skipped.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= bench-results/gpu-check
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# Compile-only check of csrc/ against a CUDA build of torch (nothing built here can run here).
check-cuda:
	test -x $(CUDA_VENV)/bin/python || python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(CUDA_TORCH_VERSION)')" 2>/dev/null \
		|| $(CUDA_VENV)/bin/python -m pip install -q torch==$(CUDA_TORCH_VERSION) numpy setuptools wheel ninja
	rm -rf build/cuda-check
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" FASTMTL_BUILD_CUDA=1 \
		MAX_JOBS=2 $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cuda-check/tmp \
		--build-lib build/cuda-check/lib
	# Load it (no GPU needed): catches undefined symbols, and a build that silently built nothing
	$(CUDA_VENV)/bin/python -c "import glob, importlib.util, torch; \
		spec = importlib.util.spec_from_file_location('fastmtl._C', \
			glob.glob('build/cuda-check/lib/fastmtl/_C*.so')[0]); \
		m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); \
		assert all(callable(getattr(m, f, None)) for f in ('gram', 'combine', 'project', 'trial_points', 'adatask')), dir(m)"
	@echo "check-cuda: csrc/ compiled against torch $(CUDA_TORCH_VERSION) and loads"

clean:
	rm -rf build dist *.egg-info .pytest_cache
