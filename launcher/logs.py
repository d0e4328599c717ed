"""Where a run's logs go (README "Logs").

Quiet console (the default): the console shows the start-up stages one line each (logger `forage.launch`), the
progress bar (or one line per step), forage's warnings and errors from any role prefixed with the role (and any
library's errors), and the end-of-run summary. Everything else goes to files (library warnings included): the
launcher's own log to <run>/logs/launcher.log (conf/hydra/job_logging/forage.yaml), and each role process's whole
output (its logs and its libraries': vLLM, Ray, torch, transformers; prints and C-level output, its child
processes' too, e.g. vLLM's engine core) to <run>/logs/<role>.log, e.g. actor0.log, learner0.log, image_search0.log,
warm_start0.log, eval.log.

`run.verbose=true` streams everything to the console as before (launcher.log is still written).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

STAGES = "forage.launch"  # start-up stages and the run's end: shown at INFO on a quiet console
PROGRESS = "forage.progress"  # launcher/progress.py's line per step where there is no terminal
# Loggers of forage's own code (a role's warnings from these reach the console; its libraries' stay in its file).
FORAGE_LOGGERS = ("protocol", "episode", "data", "models", "tool_servers", "actors", "learner", "launcher", "forage")
LOG_DIR = "logs"


class RunLogFile(logging.FileHandler):
    """A FileHandler that creates its folder (<run>/logs/ does not exist when Hydra configures logging)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = "utf-8", delay: bool = False) -> None:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, mode, encoding, delay)


def is_forage(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in FORAGE_LOGGERS


def worth_the_console(record: logging.LogRecord) -> bool:
    """Forage's warnings and errors, and any library's errors (a library's warnings stay in the log file)."""
    return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and is_forage(record))


class _QuietConsole(logging.Filter):
    """Passes what is `worth_the_console`, and INFO of the stage and progress loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return worth_the_console(record) or record.name in (STAGES, PROGRESS)


class _ConsoleFormat(logging.Formatter):
    """`HH:MM:SS message` for stage lines; `HH:MM:SS LEVEL logger: message` for warnings and errors."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        time = self.formatTime(record, self.datefmt)
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{time} {record.levelname} {record.name}: {text}"
        return f"{time} {text}"


def quiet_console(verbose: bool) -> None:
    """In launch.py's process: unless `verbose`, the console handlers show only what `_QuietConsole` passes, in
    `_ConsoleFormat`; file handlers (launcher.log) keep everything."""
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.addFilter(_QuietConsole())
            handler.setFormatter(_ConsoleFormat())


def adopt_ray_logger(verbose: bool) -> None:
    """Ray's `ray` logger prints to stderr through its own handler and does not propagate; on a quiet console its
    records go through ours instead (launcher.log; the console only for errors). Call after `import ray`."""
    if verbose:
        return
    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def role_log_dir(run: dict[str, Any]) -> Path | None:
    """<run>/logs when the console is quiet, None when `run.verbose` (roles then write to the console as before)."""
    return None if run.get("verbose") else Path(run["out_dir"]) / LOG_DIR


def route_role_output(role: str, log_dir: str | os.PathLike, level: str | None = None) -> None:
    """In a role's process: its file descriptors 1 and 2 go to <log_dir>/<role>.log (appended: a restarted process
    adds to it), so everything it or its children print lands there; Python logging writes everything at `level`
    (FORAGE_LOG_LEVEL by default) there too, and warnings and errors of forage's loggers also to the original
    stderr as `[role] LEVEL logger: message` (any library's errors too), which Ray streams to the launcher's console."""
    path = Path(log_dir) / f"{role}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    root.setLevel(level or os.environ.get("FORAGE_LOG_LEVEL", "INFO"))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    to_file = logging.StreamHandler(sys.stderr)
    to_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(to_file)
    to_console = logging.StreamHandler(console)
    to_console.addFilter(worth_the_console)
    to_console.setFormatter(logging.Formatter(f"[{role}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_console)


def logged_actor(cls: type, role: str, log_dir: Path | None) -> type:
    """`cls` for ray.remote: a subclass whose constructor first routes its process's output (`route_role_output`),
    so a process Ray restarts routes its output again; `cls` itself when `log_dir` is None (verbose). The name stays
    (Ray titles the process ray::<name>)."""
    if log_dir is None:
        return cls

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        route_role_output(role, log_dir)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__})


def logged_task(fn: Callable[..., Any], role: str, log_dir: Path | None) -> Callable[..., Any]:
    """`fn` for a Ray task that routes its process's output first; `fn` itself when `log_dir` is None."""
    if log_dir is None:
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        route_role_output(role, log_dir)
        return fn(*args, **kwargs)

    return run
