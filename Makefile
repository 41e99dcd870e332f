# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
#
# The venv sees the site-packages of the Python that creates it (--system-site-packages, plus
# the active virtualenv's if there is one), so a torch you already have is used, never replaced.
# Only when no torch is importable does it install $(TORCH_SPEC); here that finds a local CPU
# build instead of several GB of CUDA wheels. Elsewhere, point pip at a CPU wheel index with
# TORCH_PIP_ARGS="--index-url <url>".

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# The test suite runs on this many processes (pytest-xdist): 2 halves its time on a 2-core CPU.
TEST_WORKERS ?= 2
DEMO_ARGS ?=

.PHONY: venv test demo mnist bench bench-report bench-peers traffic lint format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PYTHON) scripts/parent_env_pth.py > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_fastvae_parent_env.pth"
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,bench,demo]"
	@touch $@

test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The toy-2D study (fastvae.toy2d): under 10 minutes on a 2-core CPU; CUDA when present.
demo: venv
	$(PY) -m fastvae.toy2d --out toy2d-results $(DEMO_ARGS)

# The IWAE paper's MNIST table (fastvae.mnist): fetches MNIST into the cache folder when needed.
# The default CPU schedule (10 epochs, 8 runs, k = 5000 test NLL) takes about 2 hours on a
# 2-core CPU; MNIST_ARGS="--full" is the paper's 3,280-epoch schedule, for a GPU.
MNIST_ARGS ?=

mnist: venv
	$(PY) -m fastvae.mnist --out mnist-results $(MNIST_ARGS)

# The results file is named after the device: cpu, or e.g. nvidia-h100-80gb-hbm3.
BENCH_DEVICE = $(shell $(PY) -c "import re, torch; name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; print(re.sub('[^a-z0-9]+', '-', name.lower()).strip('-'))" 2>/dev/null)

# Each case: a warm-up call, one call for peak memory, then at least BENCH_MIN_ROUNDS timed
# rounds and at most BENCH_MAX_TIME seconds of them (whichever is longer): about 10 minutes on a
# 2-core CPU, most of it torch.compile compiling the training steps (less with a warm
# inductor cache), and about 3 more for bench_host.py's 96 host-code cases. The report
# (benchmarks/RESULTS.md and charts) is written even when a case fails; make still fails then.
BENCH_MIN_ROUNDS ?= 5
BENCH_MAX_TIME ?= 1.0
BENCH_ARGS ?=

bench: venv
	@mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,ops \
		--benchmark-min-rounds=$(BENCH_MIN_ROUNDS) --benchmark-max-time=$(BENCH_MAX_TIME) \
		--benchmark-json=benchmarks/results/$(BENCH_DEVICE)-$$(date +%Y-%m-%d).json \
		$(BENCH_ARGS) $(PYTEST_ARGS); \
	status=$$?; $(PY) -m benchmarks.report || status=1; exit $$status

# RESULTS.md and the charts again, from the latest result file of each device.
bench-report: venv
	$(PY) -m benchmarks.report

# Memory traffic and launches, counted on the CPU, not timed (benchmarks/traffic.py): fastvae's
# kernels in Triton's interpreter (every load and store), the aten ops of fastvae and of the
# eager recipes, inductor's own counts for torch.compile; then RESULTS.md gets a section with
# a time MODEL of an H100 / H200 (benchmarks/targets.json). Writes
# benchmarks/results/traffic-cpu-<date>.json. fastvae is counted up to 2^19 elements per tensor
# (the interpreter runs one program at a time). About 5 minutes on a 2-core CPU the first time,
# most of it torch.compile; under 2 minutes later, reusing compile counts where the eager
# recipe is unchanged. TRAFFIC_ARGS: e.g. --max-elements 0 (every size: the large ones take
# minutes each), --recompile, --no-compile, --only 'op/log_mean_exp/*'.
TRAFFIC_ARGS ?=

traffic: venv
	@mkdir -p benchmarks/results
	TRITON_INTERPRET=1 $(PY) -m benchmarks.traffic $(TRAFFIC_ARGS)
	$(PY) -m benchmarks.report

# The libraries bench_train.py compares against (benchmark-only; missing ones skip their rows).
# pythae 0.1.2 goes in with --no-deps: its models need only pydantic 2 and cloudpickle, and its
# other requirements (scikit-learn, imageio, a dataclasses backport) are not used here.
bench-peers: venv
	$(PY) -m pip install "pyro-ppl>=1.9" "pydantic>=2" "cloudpickle>=2.1"
	$(PY) -m pip install --no-deps "pythae==0.1.2"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks toy2d-results mnist-results
