# conv2former-pretrain: `make demo` and `make test` set up .venv (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST := DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest
# 2 CPU ranks with DeepSpeed (one OpenMP thread each: 2 ranks x 2 threads on 2 cores is 4x slower)
DEEPSPEED := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/deepspeed --num_gpus 2

.PHONY: demo test coverage test-fast test-slow test-slurm test-timm-latest test-timm-all test-triton-host lint bench table install offline-bundle gpu-kit clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dali,s3,dev]'
	@touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the built-in demo dataset, with runs/demo/report.md; `make demo FRESH=1` starts over.
demo: $(STAMP)
	$(PY) launch/demo.py $(if $(FRESH),--fresh)

# Every test, the slow end-to-end ones included (CI runs this through .ci/run), in TEST_WORKERS pytest-xdist workers
# that each take whole test files (a file's fixtures are built once; docs/performance.md "Test time per file").
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --durations=15

# The whole suite under coverage, subprocesses (every launched rank, data_prep, the launchers) measured too: statement
# coverage of conv2former/, launch/ and data_prep/ in .coverage-data/ (report.txt, coverage.json). Compare two runs
# with tools/coverage_compare.py BEFORE.json AFTER.json (the statements covered before and no longer). PYTHONPATH:
# every process imports this checkout's package (a git worktree sharing another checkout's venv would otherwise import
# that checkout's, through its editable install, and its subprocesses would go unmeasured).
COVERAGE_DATA := $(CURDIR)/.coverage-data
coverage: $(STAMP)
	rm -rf $(COVERAGE_DATA) && mkdir -p $(COVERAGE_DATA)
	PYTHONPATH=$(CURDIR) COVERAGE_FILE=$(COVERAGE_DATA)/coverage DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
		$(PY) -m coverage run --source=$(CURDIR)/conv2former,$(CURDIR)/launch,$(CURDIR)/data_prep \
		-m pytest --durations=15 $(ARGS)
	$(PY) -m coverage combine -q --data-file=$(COVERAGE_DATA)/coverage
	$(PY) -m coverage report --data-file=$(COVERAGE_DATA)/coverage > $(COVERAGE_DATA)/report.txt; tail -1 $(COVERAGE_DATA)/report.txt
	$(PY) -m coverage json -q --data-file=$(COVERAGE_DATA)/coverage -o $(COVERAGE_DATA)/coverage.json

# The quick loop (~2.5 minutes on 2 cores): every test not marked slow; it lists those that took over the budget.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-slurm: $(STAMP)
	$(PYTEST) -m slurm

# timm's own tests/test_models.py (fetched from PyPI into .timm-tests/, sha256-checked) on our variants: the newest
# timm release (a new contract is seen before users see it), and every variant with the pinned timm (minutes).
test-timm-latest: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) tools/timm_model_tests.py --timm latest

test-timm-all: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) tools/timm_model_tests.py --variants all

# The Triton kernels' interpreter tests under the GPU hosts' own versions (torch 2.11, triton 3.6) in .venv-host
# (about 5 GB, made once); the result is in docs/gpu_reservation.md. numpy < 2.4: triton 3.6's interpreter turns a
# 1-element array into a loop bound, an error since numpy 2.4 (the interpreter only; compiled kernels never do).
HOST_TORCH ?= 2.11.0
HOST_TRITON ?= 3.6.0
test-triton-host:
	@test -x .venv-host/bin/python || ($(PYTHON) -m venv .venv-host && .venv-host/bin/pip install -q \
		torch==$(HOST_TORCH) triton==$(HOST_TRITON) "numpy<2.4" $$(grep "^timm==" constraints.txt) pytest pytest-timeout)
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 .venv-host/bin/python -m pytest -p no:cacheprovider tests/test_triton_depthwise.py

# ruff: the formatter's check and the lint rules of pyproject.toml; mypy --strict on conv2former/, launch/ and
# data_prep/ (CI runs this before
# the tests).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

table: $(STAMP)
	$(PY) -m conv2former.complexity --table

# Benchmarks on this machine (7 min on 2 cores, measured); `make bench RECORD=1` adds the rows to benchmarks/results/.
# On a GPU machine run benchmarks/gpu_suite.sh instead (DALI mixed decoding, bf16 Conv2Former-L, MFU, ZeRO 1/2/3).
bench: $(STAMP)
	OMP_NUM_THREADS=$$(nproc) $(PY) benchmarks/model_speed.py --variant conv2former_t --baseline convnext_tiny $(if $(RECORD),--record)
	OMP_NUM_THREADS=$$(nproc) $(PY) benchmarks/profile_step.py --variant conv2former_l --batch 4 $(if $(RECORD),--record)
	OMP_NUM_THREADS=$$(nproc) $(PY) benchmarks/profile_step.py --variant conv2former_l --batch 4 --plain-depthwise $(if $(RECORD),--record)
	OMP_NUM_THREADS=$$(nproc) $(PY) benchmarks/depthwise_formulations.py --variant conv2former_t $(if $(RECORD),--record)
	$(PY) benchmarks/shard_speed.py --images 2000 --workers $$(nproc) $(if $(RECORD),--record)
	$(PY) benchmarks/loader_speed.py --backend all --mode train --workers $$(nproc) $(if $(RECORD),--record)
	$(PY) benchmarks/loader_speed.py --backend all --mode eval --workers $$(nproc) $(if $(RECORD),--record)
	$(PY) benchmarks/train_speed.py $(if $(RECORD),--record)

# Wheels for a GPU host without package access (docs/offline_install.md); install there with
# launch/install_offline.sh dist/offline. CUDA=12|13, PYVER (the host's Python), GLIBC (its ldd --version),
# PART_MIB (cut into parts of at most N MiB).
CUDA ?= 13
PYVER ?= 3.12
GLIBC ?= 2.28
offline-bundle: $(STAMP)
	$(PY) tools/offline_bundle.py --cuda $(CUDA) --python-version $(PYVER) --glibc $(GLIBC) $(if $(PART_MIB),--part-mib $(PART_MIB))

# The files a GPU reservation carries to run benchmarks/gpu_checklist.py (docs/performance.md): dist/gpu-kit/core
# (<= 16 MiB) and dist/gpu-kit/dali (chunks <= 62 MiB); install there with launch/install_gpu_kit.sh dist/gpu-kit.
gpu-kit: $(STAMP)
	$(PY) tools/gpu_kit.py build --out dist/gpu-kit --python-version $(PYVER) --cuda $(CUDA)

clean:
	rm -rf $(VENV) .pytest_cache
