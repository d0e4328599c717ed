"""launch.py's launcher: the Ray cluster and placement, starting and supervising the roles, the warm start, run
outputs (metrics, progress, logs, the run folder) and the offline modes (eval, curate); one file per job. The top
floor of docs/architecture.md: it may import every package, and no role imports it."""
