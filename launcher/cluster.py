"""The Ray side of a run: a private loopback cluster (temp dir and auth token in the run folder) or an existing one
(`run.ray_address=auto|HOST:PORT`), and the environment every process of the run inherits (offline hubs, caches and
temp files inside our folders, the import path). Where each role runs: launcher/placement.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from launcher.logs import STAGES, adopt_ray_logger

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)

# What every Ray worker must inherit from launch.py's process (offline hubs, caches, temp dirs, import path).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                 "VLLM_HOST_IP", "HF_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR",
                 "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "FORAGE_LOG_LEVEL",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def configure_process_env(run: Mapping[str, Any], run_dir: Path) -> None:
    """Environment inherited by every process we start: offline hubs, caches and temp files inside our folders.
    `run` is conf/run; `run_dir` is the socket-safe alias of the run folder: vLLM puts IPC sockets in $TMPDIR."""
    cache = Path(run["cache_dir"]).resolve()
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
        "HF_HOME": str(cache / "hf"), "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
        "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "FORAGE_LOG_LEVEL": str(run["log_level"]),
    })
    if str(run["bind_host"]) not in ("127.0.0.1", "localhost"):
        os.environ.pop("VLLM_HOST_IP")  # a multi-host run: each engine's node address, not loopback
    # Our packages must be importable in Ray workers and vLLM's worker processes wherever they start.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


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

        adopt_ray_logger(bool(run.get("verbose")))
        if not sys.stdout.isatty():
            # Ray colours the "(Role pid=N)" prefix of forwarded lines; in a log file or a pipe those are escape codes.
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
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
        stage.info("ray %s: %d node(s), resources %s", "started" if address == "local" else f"joined at {address}",
                 len([n for n in ray.nodes() if n.get("Alive")]), ray.cluster_resources())

    def shutdown(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()

