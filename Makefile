# One command per job on a fresh machine: `make test` builds its own virtual environment, installs the package,
# prepares the data and runs every check. Variables can be overridden: `make test VENV=/opt/venv`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_CIFAR ?= ../shared/data/cifar10
export ADAAD_DATA ?= $(CURDIR)/data
export PYTHONHASHSEED := 0
export ADAAD_REQUIRE_DATA := 1

.PHONY: install data check-nbdev nbtest pytest test test-slow repro repro-eps teacher docs bench

LOCK ?= requirements-lock.txt
$(BIN)/.installed: settings.ini setup.py $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(BIN)/.installed

# CIFAR-10: the standard folder under $ADAAD_DATA; on the offline build machines it is rebuilt from their local copy
# (SHARED_CIFAR), elsewhere downloaded through torchvision. The tests need it: without it `make data` fails.
data: install
	@if [ -d "$(ADAAD_DATA)/cifar-10-batches-py" ]; then echo "data: $(ADAAD_DATA)/cifar-10-batches-py"; \
	elif [ -f "$(SHARED_CIFAR)/build_cifar10.py" ]; then $(BIN)/python $(SHARED_CIFAR)/build_cifar10.py "$(ADAAD_DATA)" >/dev/null && echo "data: rebuilt from $(SHARED_CIFAR)"; \
	else $(BIN)/python -c "from adaad.data import load_cifar; load_cifar('cifar10', 'test', root='$(ADAAD_DATA)', download=True)" && echo "data: downloaded to $(ADAAD_DATA)"; fi

check-nbdev: install
	bash tools/check_nbdev.sh $(BIN)

# Two notebooks at a time, one thread each (two threads each would wait on each other's cores).
nbtest: install data
	cd nbs && OMP_NUM_THREADS=1 ../$(BIN)/nbdev_test --n_workers 2 --path .

# The tests run in WORKERS processes (pytest-xdist); the networks several tests share are trained once, by the first
# worker that needs them, and loaded by the others (tests/conftest.py).
WORKERS ?= 2
pytest: install data
	$(BIN)/python -m pytest -n $(WORKERS)

test: check-nbdev nbtest pytest

test-slow: install data
	$(BIN)/python -m pytest -n $(WORKERS) -m slow

# The paper's table with a preset (quick, smoke, cpu-small, cpu-long, cpu-strong, cpu-strong-long, cpu-strong-field, gpu-small, paper,
# paper-cifar100): `make repro` runs `quick` (minutes on a CPU, from the shipped teacher), `make repro PRESET=cpu-strong`
# another. Progress streams to the terminal (a line per training and per attack). The notebook's own defaults are cut
# down for the notebook tests; here students and methods are the preset's (None). A
# fresh run goes to the ignored folder runs/results/<preset>/ (the executed notebook, the numbers, the figures) and is
# compared with the committed results/<preset>/ (vs_committed.md there); `make repro PRESET=... COMMIT=1` writes into
# results/<preset>/ itself (and the training-curve figure into figures/) (see nbs/15_repro.ipynb; the presets:
# nbs/14b_presets.ipynb).
# `make repro PRESET=paper DRY_RUN=1` runs every code path of the preset at toy size (a few images, one epoch of two
# steps, attacks cut to two steps) into runs/results/<preset>-dry-run/: minutes on a CPU, numbers meaningless.
# `make repro IMPORT=mymod` (or IMPORT=mod1,mod2) imports your own modules first (the notebook's `imports`), so the
# methods, attacks and architectures they register can be rows, attacks and students (REPRO_ARGS='-y ...' sets them);
# the modules are looked for on PYTHONPATH and in this folder. `DEVICE=cuda` (or cpu, cuda:1) picks the device; left
# empty, CUDA where visible, else the CPU (every progress line names it). The command for each preset:
# adaad.presets.LAUNCH. The same table by parallel one-thread workers: `adaad table --preset P --workers N`
# (notebooks 13 and 15b_jobs).
# `PRECISION=fp32` or `PRECISION=bf16` overrides the preset's precision (bf16 is refused where it weakens PGD-10 on the
# teacher); `adaad table --precision` does the same. `CPU_KERNELS=avx2` holds ATen, MKL and oneDNN to AVX2 on a CPU with
# AVX512: the float32 trainings of an AVX2 machine of the same model bit for bit (tests/test_golden.py checks it), so a
# table committed there can be rerun here; results.json and trainings.json record the variables (`kernel_limits`).
PRESET ?= quick
DEVICE ?=
PRECISION ?=
CPU_KERNELS ?=
REPRO_ARGS ?=
IMPORT ?=
COMMIT ?=
DRY_RUN ?=
ifneq ($(filter-out fp32 bf16,$(PRECISION)),)
$(error PRECISION must be fp32 or bf16 (or empty: the preset's), got '$(PRECISION)')
endif
ifneq ($(filter-out avx2,$(CPU_KERNELS)),)
$(error CPU_KERNELS must be avx2 (or empty: the CPU's own kernels), got '$(CPU_KERNELS)')
endif
KERNEL_ENV = $(if $(CPU_KERNELS),ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
REPRO_AMP = $(if $(filter bf16,$(PRECISION)),-p amp True,$(if $(filter fp32,$(PRECISION)),-p amp False))
ifneq ($(and $(COMMIT),$(DRY_RUN)),)
$(error DRY_RUN=1 checks that a preset runs, its numbers mean nothing and are never committed: drop COMMIT=1)
endif
REPRO_OUT = $(if $(DRY_RUN),runs/results/$(PRESET)-dry-run,$(if $(COMMIT),results/$(PRESET),runs/results/$(PRESET)))
REPRO_RUNS = runs/repro/$(PRESET)$(if $(DRY_RUN),-dry-run)
REPRO_CURVES = $(if $(COMMIT),$(if $(filter smoke,$(PRESET)),$(CURDIR)/$(REPRO_OUT)/training_curves,$(CURDIR)/figures/training_curves_$(PRESET)),$(CURDIR)/$(REPRO_OUT)/training_curves)
CHECK_PRESET = $(BIN)/python -c "import sys; from adaad.presets import unknown_preset; sys.exit(unknown_preset(sys.argv[1], 'PRESET'))" "$(PRESET)"
repro: install data
	@$(CHECK_PRESET)
	mkdir -p $(REPRO_OUT)
	$(if $(IMPORT),PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}") $(KERNEL_ENV) $(BIN)/papermill nbs/repro_table.ipynb $(REPRO_OUT)/repro_table.ipynb --cwd nbs -k python3 --log-output --no-progress-bar \
		-p preset $(PRESET) -p scratch False -p test_cut False -p progress True -p out_dir $(CURDIR)/$(REPRO_OUT) -p runs_dir $(CURDIR)/$(REPRO_RUNS) -p curves $(REPRO_CURVES) -p dry_run $(if $(DRY_RUN),True,False) $(if $(IMPORT),-p imports $(IMPORT)) $(if $(DEVICE),-p device $(DEVICE)) $(REPRO_AMP) \
		-p committed $(if $(or $(COMMIT),$(DRY_RUN)),None,$(CURDIR)/results/$(PRESET)) -y '{"methods": null, "students": null, "train_n": null, "n_test": null}' $(REPRO_ARGS)

# Remake a preset's shipped teacher (teachers/<name>.pt and its record teachers/<name>.json) from the training its preset
# records: `make teacher PRESET=quick` (about an hour on one core). The new file's SHA-256 then goes into the preset.
# ROLE=standard_teacher remakes the preset's naturally trained teacher instead (cpu-strong-field2's: about a quarter of
# an hour on one core).
ROLE ?= teacher
teacher: install data
	@$(CHECK_PRESET)
	$(BIN)/python -c "import sys; from adaad.repro import build_teacher; \
	r = build_teacher(sys.argv[1], progress=True, role=sys.argv[2]); \
	print(r['name'], r['sha256'], r['accuracy'])" "$(PRESET)" "$(ROLE)"

# The inner-eps sweep (AdaAD, RN-18 row of the preset) and its figure. Like `repro`, a fresh run goes to the ignored
# runs/results/<preset>-eps-sweep/; with COMMIT=1 it writes results/<preset>-eps-sweep/ and the figure
# figures/eps_sweep.{png,pdf} (results/smoke-eps-sweep/eps_sweep.* for the smoke preset, whose numbers only check the pipeline).
EPS_LIST ?= [2, 4, 6, 8, 10, 12, 14, 16]
EPS_STEPS ?= 10
EPS_OUT = $(if $(COMMIT),results/$(PRESET)-eps-sweep,runs/results/$(PRESET)-eps-sweep)
EPS_FIGURE ?= $(if $(COMMIT),$(if $(filter smoke,$(PRESET)),$(CURDIR)/results/smoke-eps-sweep/eps_sweep,$(CURDIR)/figures/eps_sweep),$(CURDIR)/$(EPS_OUT)/eps_sweep)
repro-eps: install data
	mkdir -p $(EPS_OUT)
	$(BIN)/papermill nbs/repro_eps_sweep.ipynb $(EPS_OUT)/repro_eps_sweep.ipynb --cwd nbs -k python3 \
		-p preset $(PRESET) -p scratch False -p out_dir $(CURDIR)/$(EPS_OUT) -p runs_dir $(CURDIR)/runs/repro/$(PRESET) \
		-y '{"eps_list": $(EPS_LIST), "steps": $(EPS_STEPS), "figure": "$(EPS_FIGURE)", "train_n": null, "n_test": null}' $(REPRO_ARGS)

# The documentation site: every notebook as an HTML page (math as MathML), index.html from nbs/index.ipynb, into _docs/.
docs: install
	$(BIN)/python tools/docs.py --out _docs

# Throughput benchmarks (not tests): bench/results/<date>-<device>.{json,md}. See bench/README.md.
BENCH_ARGS ?= --pairs small --eval --eval-n 200 --cw-steps 100 --aa reduced
bench: install data
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# The GPU benchmark, about 8 minutes on one CUDA GPU, each step under its own time limit (STEP_LIMIT=600 gives every
# step 600 s): bench/results/<date>-cuda-<step>.{json,md}. DRY_RUN=1 runs the same steps on the CPU with tiny sizes
# (1-2 minutes, into runs/bench-gpu-dry/) to check the script. See bench/README.md.
.PHONY: bench-gpu
bench-gpu: install data
	DRY_RUN='$(DRY_RUN)' STEP_LIMIT='$(STEP_LIMIT)' PY=$(BIN)/python bash bench/gpu.sh

# The first check on a machine with a GPU (bench/gpu_check.py), at most 8 minutes on one H100/H200: the step rate of
# the paper preset's AdaAD training (ResNet-18 <- WRN-34-20 of random weights, batch 128, fp32 as the preset trains, and
# bf16) and its first batches end to end (training, checkpoints, every attack of the paper suite on a few images), into
# runs/gpu-check/gpu_check.json. DRY_RUN=1 runs the same script on the CPU at tiny sizes (under a minute, into
# runs/gpu-check-dry/). Without a visible CUDA GPU (and without DRY_RUN) it stops at once and says so.
.PHONY: gpu-check
gpu-check: install data
	timeout 480 $(BIN)/python bench/gpu_check.py $(if $(DRY_RUN),--dry-run) $(if $(DEVICE),--device $(DEVICE))
