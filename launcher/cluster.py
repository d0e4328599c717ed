"""The Ray side of a run: a private loopback cluster (temp dir and auth token in the run folder) or an existing one
(`run.ray_address=auto|HOST:PORT`), placement groups per role, and where each role landed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# What every Ray worker must inherit from launch.py's process (offline hubs, caches, temp dirs, import path).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                 "VLLM_HOST_IP", "HF_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR",
                 "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "FORAGE_LOG_LEVEL",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def is_loopback_address(address: str) -> bool:
    """True for HOST:PORT addresses on this machine's loopback (a test cluster); False for auto and real hosts."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host in LOOPBACK_HOSTS


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


class RayCluster:
    """Start a private Ray cluster on 127.0.0.1 (address "local") or join one; shutdown() ends only our driver's
    connection (and, for a private cluster, the cluster itself): a joined cluster keeps running."""

    def __init__(self, run: Mapping[str, Any], run_dir: Path, socket_dir: Path) -> None:
        address = str(run["ray_address"])
        if address == "local" or is_loopback_address(address):
            # Without this, Ray 2.60 resolves 127.0.0.1 to the machine's address and listens on every interface
            # (and, joining a loopback cluster, looks for a node at the machine's address). Set before `import ray`.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray

        self._ray = ray
        self.address = address
        if address == "local":
            token = secrets.token_hex(32)
            os.environ["RAY_AUTH_TOKEN"] = token
            # Owner-only from the first byte: other users of the machine must not join our cluster.
            fd = os.open(run_dir / "ray_auth_token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as token_file:
                token_file.write(token)
            ray.init(
                address="local", _temp_dir=str(Path(run["ray_temp_dir"] or socket_dir / "ray")),
                num_cpus=int(run["ray_num_cpus"]), include_dashboard=False,
                object_store_memory=int(run["ray_object_store_mb"]) << 20, _node_ip_address="127.0.0.1",
                configure_logging=False, log_to_driver=True, runtime_env={"env_vars": forwarded_env()},
            )
        else:
            # The cluster's token comes from RAY_AUTH_TOKEN (or Ray's token file) as for any Ray client.
            ray.init(address=address, configure_logging=False, log_to_driver=True,
                     runtime_env={"env_vars": forwarded_env()})
        log.info("ray %s: %d node(s), resources %s", "started" if address == "local" else f"joined at {address}",
                 len([n for n in ray.nodes() if n.get("Alive")]), ray.cluster_resources())

    def shutdown(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


# ---------------------------------------------------------------------------------------------- placement

def bundle(role: Mapping[str, Any]) -> dict[str, float]:
    """One Ray resource bundle from a conf/run placement entry ({num_cpus, num_gpus, resources})."""
    out = {"CPU": float(role.get("num_cpus", 1))}
    if float(role.get("num_gpus") or 0) > 0:
        out["GPU"] = float(role["num_gpus"])
    for name, amount in dict(role.get("resources") or {}).items():
        if float(amount) > 0:
            out[str(name)] = float(amount)
    return {k: v for k, v in out.items() if v > 0}


class Placement:
    """Placement groups this run created (removed by `remove()`), and the options that pin a role to a bundle."""

    def __init__(self, ready_timeout_s: float = 120.0) -> None:
        import ray

        self._ray = ray
        self._groups: list[Any] = []
        self._timeout = ready_timeout_s

    def group(self, name: str, bundles: list[dict[str, float]], strategy: str) -> Any:
        """A placement group of `bundles` (PACK: as few nodes as possible, SPREAD: as many); waits until placed."""
        from ray.util.placement_group import placement_group

        group = placement_group(bundles, strategy=strategy, name=f"forage-{name}-{secrets.token_hex(3)}")
        self._groups.append(group)
        try:
            self._ray.get(group.ready(), timeout=self._timeout)
        except self._ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(
                f"cannot place {name}: {len(bundles)} bundle(s) of {bundles[0]} ({strategy}) did not fit the cluster "
                f"within {self._timeout:.0f}s; cluster resources {self._ray.cluster_resources()}, available "
                f"{self._ray.available_resources()} (lower run.placement.{name} or add nodes)") from exc
        return group

    @staticmethod
    def options(group: Any, index: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}

    def release(self, group: Any) -> None:
        """Remove one group now (a phase that ended, e.g. the warm start) so that its resources free up."""
        from ray.util.placement_group import remove_placement_group

        if group in self._groups:
            self._groups.remove(group)
            remove_placement_group(group)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self._groups:
            try:
                remove_placement_group(group)
            except Exception as exc:  # the cluster may already be gone; nothing else of ours is held by it
                log.warning("could not remove placement group %s: %s", group.id, exc)
        self._groups = []


def where_am_i(_instance: Any = None) -> dict[str, Any]:
    """Node id, node address and pid of the calling Ray worker (run inside a role through __ray_call__)."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


def advertised(endpoint: str, node_ip: str) -> str:
    """A wildcard bind (tcp://0.0.0.0:P, tcp://*:P) as the address other nodes reach: tcp://<node_ip>:P."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{node_ip}:{endpoint[len(wildcard):]}"
    return endpoint
