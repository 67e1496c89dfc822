# The two commands of the README: `make run` (the main job on its embedded default) and `make test`.
.PHONY: setup run test lint format

# Local Ray instances bind to 127.0.0.1 only (Ray's switch for Windows/macOS clusters, off, does this on Linux).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
# Python writes the bytecode of this project's modules once (setup compiles the installed packages'); a machine that
# sets PYTHONDONTWRITEBYTECODE would otherwise have every process (each Ray worker) compile them again.
unexport PYTHONDONTWRITEBYTECODE

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/python sweeps/finetune_grid.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/python -m pytest -q

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Benchmarks (benchmarks/README.md): each prints ratios measured side by side in one run; not part of `make test`.
.PHONY: bench-taps bench-data bench-train-step bench-probes bench-seg-heads bench-gpu

bench-taps: setup
	.venv/bin/python benchmarks/bench_taps.py

bench-data: setup
	.venv/bin/python benchmarks/bench_data.py

bench-train-step: setup
	.venv/bin/python benchmarks/bench_train_step.py

bench-probes: setup
	.venv/bin/python benchmarks/bench_probes.py

bench-seg-heads: setup
	.venv/bin/python benchmarks/bench_seg_heads.py

bench-gpu: setup
	.venv/bin/python benchmarks/gpu.py
