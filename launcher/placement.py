"""Where each role runs: one Ray resource bundle per role instance from conf/run's `placement` entries, placement
groups per role (removed at the end of the run), the Ray options that pin an instance to its bundle, the rendezvous
of learner-like ranks (rank 0's node and port), and where a role landed (node, address, pid).
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any, Mapping

from protocol.sockets import free_port

log = logging.getLogger(__name__)


def bundle(role: Mapping[str, Any]) -> dict[str, float]:
    """One Ray resource bundle from a conf/run placement entry ({num_cpus, num_gpus, resources})."""
    out = {"CPU": float(role.get("num_cpus", 1))}
    if float(role.get("num_gpus") or 0) > 0:
        out["GPU"] = float(role["num_gpus"])
    for name, amount in dict(role.get("resources") or {}).items():
        if float(amount) > 0:
            out[str(name)] = float(amount)
    return {k: v for k, v in out.items() if v > 0}


def resource_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Ray actor/task options asking for exactly one bundle's worth of resources."""
    resources = bundle(spec)
    options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0.0)}
    if "GPU" in resources:
        options["num_gpus"] = resources.pop("GPU")
    if resources:
        options["resources"] = resources
    return options


class Placement:
    """Placement groups this run created (removed by `remove()`), and the options that pin a role to a bundle.
    `run` is conf/run: its `placement` entries, `placement_timeout_s` and `learner_port`."""

    def __init__(self, run: Mapping[str, Any]) -> None:
        import ray

        self._ray = ray
        self.run = run
        self._groups: list[Any] = []
        self._timeout = float(run["placement_timeout_s"])

    def spec(self, role: str) -> Mapping[str, Any]:
        """conf/run's placement entry of `role` (tool_servers, learner, actors)."""
        return self.run["placement"][role]

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

    def rank_world(self, name: str, world_size: int) -> tuple[Any, str, int]:
        """(placement group, rank 0's node address, rendezvous port) of `world_size` learner-placed ranks: one packed
        group of `run.placement.learner` bundles (the RL learner and the warm start both use it)."""
        spec = self.spec("learner")
        group = self.group(name, [bundle(spec)] * world_size, str(spec["strategy"]))
        master = self._bundle_node_ip(group, 0)
        port = free_port() if master in ("127.0.0.1", "localhost") else int(self.run["learner_port"])
        return group, master, port

    def rank_options(self, group: Any, rank: int) -> dict[str, Any]:
        """Ray options pinning rank `rank` to its learner bundle of `group`."""
        return {**resource_options(self.spec("learner")), **self.options(group, rank)}

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

    def _bundle_node_ip(self, group: Any, index: int) -> str:
        from ray.util.placement_group import placement_group_table

        node_id = placement_group_table(group)["bundles_to_node_id"][index]
        for node in self._ray.nodes():
            if node["NodeID"] == node_id:
                return str(node["NodeManagerAddress"])
        raise RuntimeError(f"placement group bundle {index} is on node {node_id}, which the cluster does not list")


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
