"""Every role launch.py starts, as Ray actors placed by conf/run's `placement`: tool server replicas (spread),
learner ranks (one placement group, packed), rollout actors (one placement group, spread), and the one-off eval or
curate worker (placed like an actor). `stop()` ends exactly these, in the order that loses no data.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping

from cockpit.cluster import Placement, advertised, bundle, where_am_i

log = logging.getLogger(__name__)


class Roles:
    """Handles to every Ray actor and placement group this run created."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        import ray

        self._ray = ray
        self.cfg = cfg
        self.placement = Placement(float(cfg["run"]["placement_timeout_s"]))
        self.tool_servers: list[Any] = []
        self.tool_names: list[str] = []
        self.learner_ranks: list[Any] = []
        self.actors: list[Any] = []
        self.learner_run: list[Any] = []
        self.actor_runs: list[Any] = []
        self.where: dict[str, list[dict[str, Any]]] = {"tool_servers": [], "learner": [], "actors": []}

    # ------------------------------------------------------------------------------------------ starting

    def start_tool_servers(self, world: Any) -> dict[str, list[str]]:
        """`replicas` servers per tool, spread over the nodes; returns {tool: [endpoint, ...]}."""
        from tool_servers.backends import TOOL_SECTIONS
        from tool_servers.server import ToolServerRole

        cfg, run = self.cfg, self.cfg["run"]
        corpora = {"image_search": str(world.image_corpus), "text_search": str(world.text_corpus)}
        token = tool_token(cfg["tool_servers"])
        remote = self._ray.remote(ToolServerRole).options(scheduling_strategy="SPREAD",
                                                           **_resource_options(run["placement"]["tool_servers"]))
        endpoints: dict[str, list[str]] = {}
        for tool, section in TOOL_SECTIONS.items():
            backend_cfg = dict(cfg["tool_servers"][section])
            backend_cfg["corpus"] = backend_cfg.get("corpus") or corpora[tool]
            replicas = [remote.remote(tool, backend_cfg, f"tcp://{run['bind_host']}:*",
                                      limits=cfg["tool_servers"]["limits"], token=token)
                        for _ in range(int(backend_cfg["replicas"]))]
            self.tool_servers += replicas
            self.tool_names += [tool] * len(replicas)
            bound = self._ray.get([r.start.remote() for r in replicas])
            places = self._where(replicas)
            endpoints[tool] = [advertised(e, p["node_ip"]) for e, p in zip(bound, places)]
            self.where["tool_servers"] += [{**p, "tool": tool, "endpoint": e} for p, e in zip(places, endpoints[tool])]
        log.info("tool servers up: %s", endpoints)
        return endpoints

    def start_learner(self, model_path: Path) -> dict[str, str]:
        """`learner.world_size` FSDP2 ranks in one packed placement group; returns rank 0's endpoints."""
        from learner.role import LearnerRank

        cfg, spec = self.cfg, self.cfg["run"]["placement"]["learner"]
        world_size = int(cfg["learner"]["world_size"])
        group = self.placement.group("learner", [bundle(spec)] * world_size, str(spec["strategy"]))
        master = self._bundle_node_ip(group, 0)
        port = _free_port() if master in ("127.0.0.1", "localhost") else int(cfg["run"]["learner_port"])
        learner_cfg = {"learner": dict(cfg["learner"]), "algo": dict(cfg["algo"])}
        remote = self._ray.remote(LearnerRank)
        self.learner_ranks = [
            remote.options(max_concurrency=4, **_resource_options(spec), **Placement.options(group, rank))
            .remote(rank, world_size, master, port, str(model_path), learner_cfg)
            for rank in range(world_size)
        ]
        endpoints = self._ray.get(self.learner_ranks[0].endpoints.remote())
        self._ray.get([rank.publish_initial.remote() for rank in self.learner_ranks])  # a collective
        self.where["learner"] = [{**p, "rank": r} for r, p in enumerate(self._where(self.learner_ranks))]
        rank0_ip = self.where["learner"][0]["node_ip"]
        endpoints = {k: advertised(v, rank0_ip) if k in ("trajectories", "weights") else v
                     for k, v in endpoints.items()}
        log.info("learner up: %d rank(s) (master %s:%d), endpoints %s", world_size, master, port, endpoints)
        return endpoints

    def start_actors(self, model_path: Path, questions: Path, tools: dict[str, list[str]],
                     learner: dict[str, str], run_dir: Path) -> None:
        """`actors.num_actors` rollout actors in one spread placement group, started (engines up)."""
        from actors.actor import RolloutActor

        cfg, spec = self.cfg, self.cfg["run"]["placement"]["actors"]
        count = int(cfg["actors"]["num_actors"])
        group = self.placement.group("actors", [bundle(spec)] * count, str(spec["strategy"]))
        actor_cfg = {"actors": dict(cfg["actors"]), "algo": dict(cfg["algo"])}
        remote = self._ray.remote(RolloutActor)
        self.actors = [
            remote.options(**_resource_options(spec), **Placement.options(group, i))
            .remote(f"actor{i}", str(model_path), str(questions), tools, learner, actor_cfg, str(run_dir))
            for i in range(count)
        ]
        self._ray.get([a.start.remote() for a in self.actors])
        self.where["actors"] = [{**p, "actor_id": f"actor{i}"} for i, p in enumerate(self._where(self.actors))]
        log.info("%d rollout actor(s) ready", len(self.actors))

    def start_training(self, max_steps: int) -> None:
        self.learner_run = [rank.run.remote(max_steps) for rank in self.learner_ranks]
        self.actor_runs = [a.run.remote() for a in self.actors]

    def run_offline(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` (eval or curate: one engine, no learner) in a Ray task placed like a rollout actor; block until
        it returns (Ctrl-C cancels it)."""
        spec = self.cfg["run"]["placement"]["actors"]
        group = self.placement.group(name, [bundle(spec)], "PACK")
        task = self._ray.remote(fn).options(max_retries=0, **_resource_options(spec), **Placement.options(group, 0))
        ref = task.remote(*args, **kwargs)
        try:
            return self._ray.get(ref)
        except KeyboardInterrupt:
            self._ray.cancel(ref)  # KeyboardInterrupt in the task: its engine and clients close in `finally`
            self._ray.wait([ref], timeout=60)
            raise

    # ------------------------------------------------------------------------------------------ watching

    def drain_learner_metrics(self) -> list[dict]:
        return self._ray.get(self.learner_ranks[0].drain_metrics.remote()) if self.learner_ranks else []

    def actor_metrics(self) -> list[dict]:
        return self._ray.get([a.metrics.remote() for a in self.actors], timeout=30)

    def tool_stats(self) -> list[tuple[str, dict]]:
        """(tool, server stats) per replica; a replica that does not answer in 10 s is left out (and logged)."""
        refs = [server.stats.remote() for server in self.tool_servers]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=10)
        out = []
        for tool, ref in zip(self.tool_names, refs):
            if ref in ready:
                try:
                    out.append((tool, self._ray.get(ref)))
                except Exception as exc:  # a dead replica shows up in check_failures/tool errors; keep the loop
                    log.warning("tool server stats of %s failed: %s", tool, exc)
        return out

    def check_failures(self) -> bool:
        """Raise the first role error; True once every learner rank returned."""
        refs = self.learner_run + self.actor_runs
        done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            self._ray.get(ref)  # re-raises a role's exception here, with its traceback
        return bool(self.learner_run) and all(ref in done for ref in self.learner_run)

    def write_manifest(self, run_dir: Path) -> None:
        """roles.json: every role's node, address and pid (what the operator and the tests check placement by)."""
        (run_dir / "roles.json").write_text(json.dumps(self.where, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------ stopping

    def stop(self) -> None:
        """Actors stop taking admissions and flush their finished groups (the learner still acks them); the learner
        stops and writes its final checkpoint; tool servers drain; then every handle is killed and the placement
        groups removed. Nothing else in the cluster is touched."""
        ray = self._ray
        learner_done = bool(self.learner_run) and not ray.wait(
            self.learner_run, num_returns=len(self.learner_run), timeout=0)[1]
        # After max_steps the learner's intake is closed: no ack can come, so actors spool at once instead of waiting.
        self._call_all(self.actors, "stop", 90, 0.0 if learner_done else None)
        self._call_all(self.learner_ranks, "stop", 30)
        if self.learner_run:  # run() returns after the final checkpoint
            _, pending = ray.wait(self.learner_run, num_returns=len(self.learner_run), timeout=120)
            if pending:
                log.warning("%d learner rank(s) still running after 120 s; the final checkpoint may be missing",
                            len(pending))
        self._call_all(self.tool_servers, "stop", 15)
        for handle in self.actors + self.learner_ranks + self.tool_servers:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as exc:
                log.warning("could not kill a role: %s", exc)
        self.placement.remove()

    def _call_all(self, handles: list[Any], method: str, timeout: float, *args: Any) -> None:
        try:
            self._ray.get([getattr(h, method).remote(*args) for h in handles], timeout=timeout)
        except Exception as exc:  # a role that already died or hangs must not keep the rest alive
            log.warning("%s() did not finish cleanly on %d role(s): %s", method, len(handles), exc)

    # ------------------------------------------------------------------------------------------ helpers

    def _where(self, handles: list[Any]) -> list[dict[str, Any]]:
        return self._ray.get([h.__ray_call__.remote(where_am_i) for h in handles], timeout=60)

    def _bundle_node_ip(self, group: Any, index: int) -> str:
        from ray.util.placement_group import placement_group_table

        node_id = placement_group_table(group)["bundles_to_node_id"][index]
        for node in self._ray.nodes():
            if node["NodeID"] == node_id:
                return str(node["NodeManagerAddress"])
        raise RuntimeError(f"placement group bundle {index} is on node {node_id}, which the cluster does not list")


def tool_token(tool_servers: Mapping[str, Any]) -> str | None:
    """The tool servers' shared token, read from the environment variable named in conf (never from a file)."""
    name = tool_servers.get("token_env")
    if not name:
        return None
    if not os.environ.get(name):
        raise SystemExit(f"tool_servers.token_env={name!r} but that environment variable is empty or unset")
    return os.environ[name]


def _resource_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Ray actor/task options asking for exactly one bundle's worth of resources."""
    resources = bundle(spec)
    options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0.0)}
    if "GPU" in resources:
        options["num_gpus"] = resources.pop("GPU")
    if resources:
        options["resources"] = resources
    return options


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
