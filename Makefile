# The two commands of the README: `make run` (the main job on its embedded default) and `make test`.
.PHONY: setup run test lint format

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
