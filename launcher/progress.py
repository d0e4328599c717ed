"""The live console view of a run: a rich progress bar with step, policy version, reward, accuracy, search ratio,
throughput and staleness on a terminal; one log line per learner step elsewhere (CI logs, files, pipes).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Mapping

from launcher.logs import PROGRESS

log = logging.getLogger(PROGRESS)


def status_text(row: Mapping[str, Any]) -> str:
    """The one-line summary of a metrics row (shared by the live bar and the log line)."""
    return (f"v{int(row.get('policy_version', 0))}  reward {row.get('reward_mean', 0.0):.3f}  "
            f"acc {row.get('accuracy', 0.0):.2f}  SR {row.get('search_ratio', 0.0):.2f}  "
            f"{row.get('rollout_tokens_per_s', 0.0):.0f} tok/s  {row.get('rollout_groups_per_s', 0.0):.2f} groups/s  "
            f"stale {row.get('staleness_mean', 0.0):.2f}  idle {100 * row.get('learner_idle_frac', 0.0):.0f}%  "
            f"mem {row.get('peak_mem_gib', 0.0):.1f} GiB")


class ProgressDisplay:
    """`update(row)` after every metrics row; `close()` at the end. Live only when the console is a terminal."""

    def __init__(self, max_steps: int, enabled: bool = True, console: Any = None,
                 status: Callable[[Mapping[str, Any]], str] = status_text, label: str = "step",
                 log_every: int = 1) -> None:
        self.max_steps = max_steps
        self.enabled = enabled
        self.status, self.label = status, label
        self.log_every = max(1, log_every)  # without a terminal: a log line every this many steps (and the last)
        self._progress: Any = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        if not enabled:
            return
        from rich.console import Console

        console = console or Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("{task.fields[status]}"), console=console, redirect_stdout=True,
                                  redirect_stderr=True)
        self._task = self._progress.add_task("training", total=max_steps, status="waiting for the first step")
        self._progress.start()
        self._route_logging_through(console)

    @property
    def live(self) -> bool:
        return self._progress is not None

    def update(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=int(row.get("step", 0)), status=self.status(row))
        else:
            step = int(row.get("step", 0))
            if step % self.log_every == 0 or step in (1, self.max_steps):
                log.info("%s %d/%d  %s", self.label, step, self.max_steps, self.status(row))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers = []

    def _route_logging_through(self, console: Any) -> None:
        """Console log handlers hold the stream they were created with; point them at rich's redirected
        stdout/stderr while the bar is live, so log lines print above the bar instead of through it."""
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream in (sys.__stdout__, sys.__stderr__):
                target = sys.stdout if handler.stream is sys.__stdout__ else sys.stderr
                self._handlers.append((handler, handler.setStream(target)))
