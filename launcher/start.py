"""Starting every role launch.py runs, as Ray actors placed by conf/run's `placement` (launcher/placement.py): tool
server replicas (spread), learner ranks (one placement group, packed), rollout actors (one placement group, spread,
restarted by Ray when their process dies), and the one-off eval or curate worker (placed like an actor). `Roles`
holds their handles and where each runs (roles.json); launcher/supervise.py keeps them going and stops them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from launcher.logs import STAGES, logged_actor, logged_task, role_log_dir
from launcher.placement import Placement, advertised, bundle, resource_options, where_am_i
from protocol.sockets import token_from_env

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)


class Roles:
    """Handles to every Ray actor this run started, the placement groups they live in, and where each runs."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        import ray

        self._ray = ray
        self.cfg = cfg
        self.placement = Placement(cfg["run"])
        self.tool_servers: list[Any] = []
        self.tool_names: list[str] = []
        self.learner_ranks: list[Any] = []
        self.actors: list[Any] = []
        self.where: dict[str, list[dict[str, Any]]] = {"tool_servers": [], "learner": [], "actors": []}
        self.learner_token: str | None = None  # learner rank 0's shared token, handed to the actors (never written)
        self.log_dir = role_log_dir(cfg["run"])  # <run>/logs: each role's output (None: to the console)

    def start_tool_servers(self, world: Any) -> dict[str, list[str]]:
        """`replicas` servers per tool, spread over the nodes; returns {tool: [endpoint, ...]}."""
        from tool_servers.backends import TOOL_SECTIONS
        from tool_servers.server import ToolServerRole
        from tool_servers.snapshot import SnapshotConfig

        cfg, run = self.cfg, self.cfg["run"]
        corpora = {"image_search": str(world.image_corpus), "text_search": str(world.text_corpus)}
        token = tool_token(cfg["tool_servers"])
        snapshot = SnapshotConfig.from_mapping(cfg["tool_servers"])  # record / replay (absolute paths)
        options = {"scheduling_strategy": "SPREAD", **resource_options(self.placement.spec("tool_servers"))}
        endpoints: dict[str, list[str]] = {}
        for tool, section in TOOL_SECTIONS.items():
            backend_cfg = dict(cfg["tool_servers"][section])
            backend_cfg["corpus"] = backend_cfg.get("corpus") or corpora[tool]
            replicas = [self._ray.remote(logged_actor(ToolServerRole, f"{tool}{i}", self.log_dir)).options(**options)
                        .remote(tool, backend_cfg, f"tcp://{run['bind_host']}:*", limits=cfg["tool_servers"]["limits"],
                                token=token, snapshot=snapshot, replica=i)
                        for i in range(int(backend_cfg["replicas"]))]
            self.tool_servers += replicas
            self.tool_names += [tool] * len(replicas)
            bound = self._ray.get([r.start.remote() for r in replicas])
            places = self._where(replicas)
            endpoints[tool] = [advertised(e, p["node_ip"]) for e, p in zip(bound, places)]
            self.where["tool_servers"] += [{**p, "tool": tool, "endpoint": e} for p, e in zip(places, endpoints[tool])]
        stage.info("tool servers up: %s", endpoints)
        return endpoints

    def start_learner(self, model_path: Path) -> dict[str, str]:
        """`learner.world_size` FSDP2 ranks in one packed placement group; returns rank 0's endpoints. Rank 0 gets the
        shared token of `learner.token_env` (read from this process's environment)."""
        from learner.role import LearnerRank
        cfg = self.cfg
        world_size = int(cfg["learner"]["world_size"])
        # Read here, where the operator set the variable: ranks on other nodes do not inherit launch.py's environment.
        self.learner_token = learner_token(cfg["learner"])
        group, master, port = self.placement.rank_world("learner", world_size)
        learner_cfg = {"learner": dict(cfg["learner"]), "algo": dict(cfg["algo"])}
        self.learner_ranks = [
            self._ray.remote(logged_actor(LearnerRank, f"learner{rank}", self.log_dir))
            .options(max_concurrency=4, **self.placement.rank_options(group, rank))
            .remote(rank, world_size, master, port, str(model_path), learner_cfg,
                    token=self.learner_token if rank == 0 else None)
            for rank in range(world_size)
        ]
        endpoints = self._ray.get(self.learner_ranks[0].endpoints.remote())
        self._ray.get([rank.publish_initial.remote() for rank in self.learner_ranks])  # a collective
        self.where["learner"] = [{**p, "rank": r} for r, p in enumerate(self._where(self.learner_ranks))]
        rank0_ip = self.where["learner"][0]["node_ip"]
        endpoints = {k: advertised(v, rank0_ip) if k in ("trajectories", "weights") else v
                     for k, v in endpoints.items()}
        stage.info("learner up: %d rank(s) (master %s:%d), endpoints %s", world_size, master, port, endpoints)
        return endpoints

    def start_actors(self, model_path: Path, questions: Path, tools: dict[str, list[str]],
                     learner: dict[str, str], run_dir: Path) -> None:
        """`actors.num_actors` rollout actors in one spread placement group, started (engines up). Ray restarts a
        dead actor process up to `run.actor_max_restarts` times in its bundle (same constructor arguments, hence the
        same spool folder); the supervisor (launcher/supervise.py) then starts and runs it again."""
        from actors.actor import RolloutActor

        cfg, spec = self.cfg, self.placement.spec("actors")
        count = int(cfg["actors"]["num_actors"])
        group = self.placement.group("actors", [bundle(spec)] * count, str(spec["strategy"]))
        actor_cfg = {"actors": dict(cfg["actors"]), "algo": dict(cfg["algo"]),
                     "tokens": actor_tokens(cfg, self.learner_token)}
        self.actors = [
            self._ray.remote(logged_actor(RolloutActor, f"actor{i}", self.log_dir))
            .options(**actor_restart_options(cfg["run"]), **resource_options(spec), **Placement.options(group, i))
            .remote(f"actor{i}", str(model_path), str(questions), tools, learner, actor_cfg, str(run_dir))
            for i in range(count)
        ]
        self._ray.get([a.start.remote() for a in self.actors])
        self.where["actors"] = [{**p, "actor_id": f"actor{i}"} for i, p in enumerate(self._where(self.actors))]
        stage.info("%d rollout actor(s) ready", len(self.actors))

    def run_offline(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` (eval or curate: one engine, no learner) in a Ray task placed like a rollout actor; block until
        it returns (Ctrl-C cancels it)."""
        spec = self.placement.spec("actors")
        group = self.placement.group(name, [bundle(spec)], "PACK")
        task = self._ray.remote(logged_task(fn, name, self.log_dir))
        task = task.options(max_retries=0, **resource_options(spec), **Placement.options(group, 0))
        ref = task.remote(*args, **kwargs)
        try:
            return self._ray.get(ref)
        except KeyboardInterrupt:
            self._ray.cancel(ref)  # KeyboardInterrupt in the task: its engine and clients close in `finally`
            self._ray.wait([ref], timeout=60)
            raise

    def _where(self, handles: list[Any]) -> list[dict[str, Any]]:
        return self._ray.get([h.__ray_call__.remote(where_am_i) for h in handles], timeout=60)


def actor_restart_options(run: Mapping[str, Any]) -> dict[str, int]:
    """Ray options of a rollout actor: Ray restarts its process (re-running the constructor) up to
    `run.actor_max_restarts` times; calls are never retried by Ray (at most once): the supervisor re-issues start()
    and run() on the new process itself."""
    restarts = int(run["actor_max_restarts"])
    if restarts < 0:
        raise ValueError(f"run.actor_max_restarts must be >= 0, got {restarts}")
    return {"max_restarts": restarts, "max_task_retries": 0}


def tool_token(tool_servers: Mapping[str, Any]) -> str | None:
    """The tool servers' shared token, read from the environment variable named in conf (never from a file)."""
    try:
        return token_from_env(tool_servers.get("token_env"), "tool_servers.token_env")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def learner_token(learner: Mapping[str, Any]) -> str | None:
    """The learner endpoints' shared token, read from the environment variable `learner.token_env` names."""
    try:
        return token_from_env(learner.get("token_env"), "learner.token_env")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def actor_tokens(cfg: Mapping[str, Any], learner: str | None = None) -> dict[str, str | None]:
    """The secrets a rollout actor or an eval/curate worker sends (actors.config.ActorTokens): the learner's and the
    tool servers'. They travel as arguments of the Ray call, never in conf/ or a file of the run folder."""
    return {"learner": learner, "tools": tool_token(cfg["tool_servers"])}
