# The two commands README names. Both run the whole set-up first (idempotent).
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test lint lab

setup:
	@./scripts/setup.sh

run: setup
	.venv/bin/headscope analyze --out headscope-out

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest --timeout=1200

lint: setup
	.venv/bin/ruff check .

lab: setup
	.venv/bin/jupyter lab notebooks
