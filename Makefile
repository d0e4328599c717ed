# The two commands: `make run` (the main job on the embedded default) and `make test` (the whole suite).
# Each sets up .venv from the pinned requirements first (idempotent; a no-op when nothing changed).
.PHONY: setup run test test-fast

setup:
	@scripts/setup_venv.sh cpu

run: setup
	.venv/bin/python launch.py $(ARGS)

test: setup
	.venv/bin/python -m pytest tests -q $(ARGS)

test-fast: setup
	.venv/bin/python -m pytest tests -q -m "not slow and not e2e" $(ARGS)
