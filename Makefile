# The two commands: `make run` (the main job on the embedded default) and `make test` (the whole suite).
# Each sets up .venv from the pinned requirements first (idempotent; a no-op when nothing changed).
.PHONY: setup run test test-fast bench

setup:
	@scripts/setup_venv.sh cpu

run: setup
	.venv/bin/python launch.py $(ARGS)

test: setup
	.venv/bin/python -m pytest tests -q $(ARGS)

test-fast: setup
	.venv/bin/python -m pytest tests -q -m "not slow and not e2e" $(ARGS)

# Every benchmark behind a figure of docs/benchmarks.md, one after another (hours on 2 cores; the async/sync one
# alone runs launch.py 16 times). Outputs under runs/bench/; BENCH_ARGS goes to bench/async_vs_sync.py (e.g.
# BENCH_ARGS=--quick). bench/gpu_check.py needs a CUDA machine and is run there by hand.
bench: setup
	@mkdir -p runs/bench
	PYTHONPATH=. .venv/bin/python bench/tool_servers.py --seconds 3
	PYTHONPATH=. .venv/bin/python bench/learner.py --ranks 1 2
	PYTHONPATH=. .venv/bin/python bench/actors.py --out runs/bench/actors.json
	PYTHONPATH=. .venv/bin/python bench/async_vs_sync.py $(BENCH_ARGS)
