"""forage's entry point: build the run from conf/, start Ray, place every role, stream metrics, stop cleanly.

    python launch.py run.max_steps=3 run.out_dir=runs/demo       # the embedded default (CPU, tiny model)
    python launch.py --cfg job                                    # print the resolved config

Reads like DESIGN.md's diagram: world + model -> tool servers -> learner ranks -> rollout actors -> metrics loop.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("forage.launch")


def main(cfg: DictConfig) -> int:
    run_dir = prepare_run_dir(cfg)
    sockets = SocketAlias(run_dir)
    configure_process_env(cfg, sockets.path)
    memory = MemorySampler(cfg.run.memory_sample_s)
    cluster: LocalCluster | None = None
    roles: Roles | None = None
    try:
        world, model_path = build_world_and_model(cfg)
        cluster = start_ray(cfg, run_dir, sockets.path)
        roles = Roles()
        tools = roles.start_tool_servers(cfg, world)
        learner = roles.start_learner(cfg, model_path)
        roles.start_actors(cfg, model_path, world, tools, learner, sockets.path)
        return stream_metrics(cfg, run_dir, roles, memory)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping every role (actors flush, learner stops, tool servers drain)")
        return 130
    finally:
        ignore_signals_while_stopping()
        if roles is not None:
            roles.stop()
        if cluster is not None:
            cluster.shutdown()
        memory.stop()
        sockets.remove()
        log.info("peak memory of all forage processes: %.2f GiB (PSS)", memory.peak_gib)
        write_summary(run_dir, memory)


def ignore_signals_while_stopping() -> None:
    """A second Ctrl-C must not abandon the shutdown half-way and leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- run folder, env

def prepare_run_dir(cfg: DictConfig) -> Path:
    # Absolute paths before anything resolves: Ray workers do not share our working directory.
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    cfg.run.cache_dir = str(Path(cfg.run.cache_dir).resolve())
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run folder: %s", run_dir)
    return run_dir


def configure_process_env(cfg: DictConfig, run_dir: Path) -> None:
    # `run_dir` here is the socket-safe alias of the run folder: vLLM puts IPC sockets in $TMPDIR.
    """Environment inherited by every process we start: offline hubs, caches and temp files inside our folders."""
    cache = Path(cfg.run.cache_dir).resolve()
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
        "HF_HOME": str(cache / "hf"), "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
        "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "FORAGE_LOG_LEVEL": str(cfg.run.log_level),
    })
    # Our packages must be importable in Ray workers and vLLM's worker processes wherever they start.
    root = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def build_world_and_model(cfg: DictConfig) -> tuple[Any, Path]:
    """The synthetic world (corpora + questions) and the model folder, both cached under run.cache_dir."""
    from data import WorldConfig, ensure_world
    from models import ModelConfig, ensure_model

    cache = Path(cfg.run.cache_dir)
    world_cfg = _plain(cfg.data)
    world_cache = Path(world_cfg.pop("cache_root", None) or cache)
    started = time.monotonic()
    log.info("preparing the synthetic world (first time: about a minute; cached after)")
    world = ensure_world(WorldConfig(**world_cfg), world_cache)
    log.info("world ready in %.1fs: %s", time.monotonic() - started, world.root)
    started = time.monotonic()
    log.info("preparing the model (the tiny model's first build and warm start take a few minutes; cached after)")
    model_path = ensure_model(ModelConfig.from_dict(_plain(cfg.model)), world, cache)
    log.info("model ready in %.1fs: %s", time.monotonic() - started, model_path)
    return world, model_path


# ---------------------------------------------------------------------------------------------- Ray

class LocalCluster:
    """A private Ray cluster on 127.0.0.1 whose temp dir and auth token live in the run folder (or a joined one)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, socket_dir: Path) -> None:
        import ray

        self._ray = ray
        address = str(cfg.run.ray_address)
        if address == "local":
            token = secrets.token_hex(32)
            os.environ["RAY_AUTH_TOKEN"] = token
            # Owner-only from the first byte: other users of the machine must not join our cluster.
            fd = os.open(run_dir / "ray_auth_token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as token_file:
                token_file.write(token)
            ray.init(
                address="local", _temp_dir=str(Path(cfg.run.ray_temp_dir or socket_dir / "ray")),
                num_cpus=int(cfg.run.ray_num_cpus),
                include_dashboard=False, object_store_memory=int(cfg.run.ray_object_store_mb) << 20,
                _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=True,
                runtime_env={"env_vars": _forwarded_env()},
            )
        else:
            ray.init(address=address, runtime_env={"env_vars": _forwarded_env()})
        log.info("ray ready: %s", ray.cluster_resources())

    def shutdown(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


class SocketAlias:
    """A path to the run folder short enough for unix sockets (AF_UNIX paths: at most 107 bytes).

    Ray binds <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store and vLLM binds $TMPDIR/<uuid>, so a
    deep run folder breaks both. Then we create a symlink /tmp/forage-<hash> -> run folder and hand out that path:
    every socket and file still lands inside the run folder; the link itself is removed when the run ends."""

    MAX_LEN = 40  # leaves room for Ray's 66-byte session/socket suffix (and vLLM's 44) below 107

    def __init__(self, run_dir: Path) -> None:
        self._link: Path | None = None
        self.path = run_dir
        if len(str(run_dir)) > self.MAX_LEN:
            link = Path(tempfile.gettempdir()) / f"forage-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]}"
            if link.is_symlink() and link.resolve() != run_dir:
                link.unlink()
            if not link.exists():
                link.symlink_to(run_dir, target_is_directory=True)
            self._link = self.path = link
            log.info("socket-safe alias of the run folder: %s -> %s", link, run_dir)

    def remove(self) -> None:
        if self._link is not None and self._link.is_symlink():
            self._link.unlink()


def start_ray(cfg: DictConfig, run_dir: Path, socket_dir: Path) -> LocalCluster:
    if str(cfg.run.ray_address) == "local":
        # Without this, Ray 2.60 resolves 127.0.0.1 to the machine's address and listens on every interface.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return LocalCluster(cfg, run_dir, socket_dir)


def _forwarded_env() -> dict[str, str]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
            "VLLM_HOST_IP", "HF_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "FORAGE_LOG_LEVEL",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    return {k: os.environ[k] for k in keys if k in os.environ}


class Roles:
    """Handles to every Ray actor this run started, so that stop() ends exactly those."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self.tool_servers: list[Any] = []
        self.learner_ranks: list[Any] = []
        self.actors: list[Any] = []
        self.learner_run: list[Any] = []
        self.actor_runs: list[Any] = []

    def start_tool_servers(self, cfg: DictConfig, world: Any) -> dict[str, list[str]]:
        from tool_servers.backends import TOOL_SECTIONS
        from tool_servers.server import ToolServerRole

        remote = self._ray.remote(num_cpus=0.25)(ToolServerRole)
        corpora = {"image_search": str(world.image_corpus), "text_search": str(world.text_corpus)}
        limits = _plain(cfg.tool_servers.limits)
        token = tool_token(cfg)
        endpoints: dict[str, list[str]] = {}
        for tool, section in TOOL_SECTIONS.items():
            backend_cfg = _plain(cfg.tool_servers[section])
            backend_cfg["corpus"] = backend_cfg.get("corpus") or corpora[tool]
            replicas = [remote.remote(tool, backend_cfg, limits=limits, token=token)
                        for _ in range(int(backend_cfg["replicas"]))]
            self.tool_servers += replicas
            endpoints[tool] = self._ray.get([r.start.remote() for r in replicas])
        log.info("tool servers up: %s", endpoints)
        return endpoints

    def start_learner(self, cfg: DictConfig, model_path: Path) -> dict[str, str]:
        from learner.role import LearnerRank

        world_size = int(cfg.learner.world_size)
        port = _free_port()
        remote = self._ray.remote(num_cpus=1, max_concurrency=4)(LearnerRank)
        learner_cfg = {"learner": _plain(cfg.learner), "algo": _plain(cfg.algo)}
        self.learner_ranks = [
            remote.remote(rank, world_size, "127.0.0.1", port, str(model_path), learner_cfg)
            for rank in range(world_size)
        ]
        endpoints = self._ray.get(self.learner_ranks[0].endpoints.remote())
        self._ray.get([rank.publish_initial.remote() for rank in self.learner_ranks])  # a collective
        log.info("learner up: %d ranks, endpoints %s", world_size, endpoints)
        return endpoints

    def start_actors(self, cfg: DictConfig, model_path: Path, world: Any, tools: dict[str, list[str]],
                     learner: dict[str, str], run_dir: Path) -> None:
        from actors.actor import RolloutActor

        remote = self._ray.remote(num_cpus=1)(RolloutActor)
        actor_cfg = {"actors": _plain(cfg.actors), "algo": _plain(cfg.algo)}
        self.actors = [
            remote.remote(f"actor{i}", str(model_path), str(world.questions), tools, learner, actor_cfg, str(run_dir))
            for i in range(int(cfg.actors.num_actors))
        ]
        self._ray.get([a.start.remote() for a in self.actors])
        log.info("%d rollout actor(s) ready", len(self.actors))
        max_steps = int(cfg.run.max_steps)
        self.learner_run = [rank.run.remote(max_steps) for rank in self.learner_ranks]
        self.actor_runs = [a.run.remote() for a in self.actors]

    def drain_learner_metrics(self) -> list[dict]:
        return self._ray.get(self.learner_ranks[0].drain_metrics.remote()) if self.learner_ranks else []

    def actor_metrics(self) -> list[dict]:
        return self._ray.get([a.metrics.remote() for a in self.actors], timeout=30)

    def check_failures(self) -> bool:
        """Raise the first role error; True once every learner rank returned."""
        refs = self.learner_run + self.actor_runs
        done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            self._ray.get(ref)  # re-raises a role's exception here, with its traceback
        return bool(self.learner_run) and all(ref in done for ref in self.learner_run)

    def stop(self) -> None:
        """Actors stop taking admissions and flush; then the learner and tool servers stop; then all are killed."""
        ray = self._ray
        for handles, method, timeout in ((self.actors, "stop", 60), (self.learner_ranks, "stop", 30),
                                         (self.tool_servers, "stop", 15)):
            try:
                ray.get([getattr(h, method).remote() for h in handles], timeout=timeout)
            except Exception as exc:  # a role that already died or hangs must not keep the rest alive
                log.warning("%s() did not finish cleanly on %d role(s): %s", method, len(handles), exc)
        for handle in self.actors + self.learner_ranks + self.tool_servers:
            ray.kill(handle, no_restart=True)


def tool_token(cfg: DictConfig) -> str | None:
    """The tool servers' shared token, read from the environment variable named in conf (never from a file)."""
    name = cfg.tool_servers.get("token_env")
    if not name:
        return None
    if not os.environ.get(name):
        raise SystemExit(f"tool_servers.token_env={name!r} but that environment variable is empty or unset")
    return os.environ[name]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


# ---------------------------------------------------------------------------------------------- metrics loop

class MemorySampler:
    """Peak proportional set size (PSS) of this process and all its descendants: Ray, roles, vLLM engines."""

    def __init__(self, every_s: float) -> None:
        import psutil

        self._psutil = psutil
        self.peak_gib = 0.0
        self.current_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="memory-sampler", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def sample(self) -> float:
        me = self._psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        self.current_gib = total / 2**30
        self.peak_gib = max(self.peak_gib, self.current_gib)
        return self.current_gib

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def stream_metrics(cfg: DictConfig, run_dir: Path, roles: Roles, memory: MemorySampler) -> int:
    """Append one metrics.jsonl row per learner step until max_steps; fail fast if any role dies."""
    started = time.monotonic()
    deadline = started + float(cfg.run.timeout_s)
    max_steps = int(cfg.run.max_steps)
    steps = 0
    with open(run_dir / "metrics.jsonl", "a", buffering=1) as out:
        while True:
            finished = roles.check_failures()
            rows = roles.drain_learner_metrics()
            actor_view = summarize_actors(roles.actor_metrics()) if rows else {}
            for row in rows:
                row.update(actor_view)
                row.update(wall_time_s=round(time.monotonic() - started, 3), peak_mem_gib=round(memory.peak_gib, 3))
                out.write(json.dumps(row, sort_keys=True) + "\n")
                steps = int(row["step"])
                if cfg.run.progress:
                    log.info("step %d/%d  version %d  reward %.3f  acc %.2f  SR %.2f  tokens %d  stale %.2f  "
                             "idle %.0f%%  %.1fs  mem %.1f GiB", steps, max_steps, row["policy_version"],
                             row["reward_mean"], row["accuracy"], row["search_ratio"], row["tokens_generated"],
                             row["staleness_mean"], 100 * row["learner_idle_frac"], row["step_time_s"],
                             memory.peak_gib)
            if finished and steps >= max_steps:
                log.info("reached %d steps in %.0fs", steps, time.monotonic() - started)
                return 0
            if time.monotonic() > deadline:
                log.error("timed out after %.0fs at step %d of %d", cfg.run.timeout_s, steps, max_steps)
                return 1
            time.sleep(0.5)


def summarize_actors(snapshots: list[dict]) -> dict[str, float]:
    """The actors' side of a metrics row: the policy versions they run and totals of their counters."""
    if not snapshots:
        return {}
    view = {
        "actor_policy_version_min": min(s.get("actor_policy_version", -1) for s in snapshots),
        "actor_policy_version_max": max(s.get("actor_policy_version", -1) for s in snapshots),
    }
    for key in ("weight_updates", "weight_errors", "episodes", "tool_errors", "groups_played"):
        view[f"actor_{key}"] = sum(s.get(f"actor_{key}", 0.0) for s in snapshots)
    update_p50 = [s["actor_weight_update_s_p50"] for s in snapshots if "actor_weight_update_s_p50" in s]
    if update_p50:
        view["actor_weight_update_s_p50"] = max(update_p50)
    return view


def write_summary(run_dir: Path, memory: MemorySampler) -> None:
    summary = {"peak_mem_gib": round(memory.peak_gib, 3)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def check_config(cfg: DictConfig) -> None:
    """Cross-group consistency that no single group's dataclass can see."""
    if cfg.run.mode != "async":
        raise SystemExit(f"run.mode={cfg.run.mode!r} is not available yet; supported: 'async'")
    if float(cfg.actors.sampling.temperature) != float(cfg.algo.temperature):
        raise SystemExit(
            f"actors.sampling.temperature={cfg.actors.sampling.temperature} but algo.temperature="
            f"{cfg.algo.temperature}: the learner must score with the temperature the actors sample at; set both")


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(str(cfg.run.log_level))
    check_config(cfg)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    code = main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    _hydra_entry()
