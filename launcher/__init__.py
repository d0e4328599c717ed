"""Run-level helpers of launch.py: Ray cluster and placement, roles, metrics sinks, progress, eval/curate, plots.
May import the role packages; no role imports it."""
