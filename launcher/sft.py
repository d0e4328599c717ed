"""The warm start on Ray: `learner.world_size` SftRank actors (learner/sft.py) in one packed placement group placed
like the learner ranks, their rows streamed to a sink and the progress display; Ctrl-C stops the ranks (nothing
is saved). Used by launch.py for `algo=sft` and for the tiny model's automatic warm start before RL.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from launcher.progress import ProgressDisplay
from launcher.roles import Roles

log = logging.getLogger(__name__)


def sft_status(row: Mapping[str, Any]) -> str:
    """The one-line summary of a warm-start row."""
    phase = "pixels" if row.get("vision_phase") else "mixture"
    return (f"loss {row.get('loss', 0.0):.3f}  lr {row.get('lr', 0.0):.1e}  {phase}  "
            f"{row.get('tokens_per_s', 0.0):.0f} tok/s")


class RaySftRunner:
    """A models.ensure SftRunner that places the ranks with Ray: call it as
    `runner(base_model, world_root, out_dir, {"learner": ..., "sft": ...}, dtype) -> report`."""

    def __init__(self, roles: Roles, sink: Any, progress: bool) -> None:
        self.roles, self.sink, self.progress = roles, sink, progress

    def __call__(self, base: Path, world_root: Path, out: Path, cfg: dict, dtype: str) -> dict:
        from learner.sft import SftRank

        import ray

        world_size = int(cfg["learner"].get("world_size", 1))
        steps = int(cfg["sft"].get("steps", 0))
        group, master, port = self.roles.rank_world("sft", world_size)
        remote = ray.remote(SftRank)
        ranks = [remote.options(max_concurrency=2, **self.roles.rank_options(group, r))
                 .remote(r, world_size, master, port, str(base), str(world_root), cfg) for r in range(world_size)]
        log.info("warm start: %d step(s) on %d rank(s) from %s", steps, world_size, base)
        display = ProgressDisplay(steps, enabled=self.progress, status=sft_status, label="warm start",
                                  log_every=50)
        refs = [rank.run.remote(str(out), dtype) for rank in ranks]
        try:
            while True:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
                for row in ray.get(ranks[0].drain_metrics.remote()):
                    self.sink.write(row)
                    display.update(row)
                for ref in done:
                    ray.get(ref)  # a failed rank raises here, with its traceback
                if len(done) == len(refs):
                    break
            report = ray.get(refs[0])
        except KeyboardInterrupt:
            log.warning("interrupted: stopping the warm start (nothing is saved)")
            for rank in ranks:
                rank.stop.remote()
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise
        finally:
            display.close()
            for rank in ranks:
                try:
                    ray.kill(rank, no_restart=True)
                except Exception as exc:  # already gone: nothing of ours is left in it
                    log.warning("could not kill a warm-start rank: %s", exc)
            self.roles.placement.release(group)
        if not report.get("completed"):
            raise RuntimeError(f"warm start stopped after {report.get('steps')} of {steps} steps")
        return report
