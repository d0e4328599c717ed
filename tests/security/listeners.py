"""Every listener forage opens, in one process per side, for the security tests (run as a script, never imported by
forage): `tools` = a tool server replica (ToolServerRole, simulated backend) plus the gateway's HTTP and MCP faces in
front of it; `learner` = rank 0's trajectory endpoint (TrajectoryService) and weights endpoint (ZmqWeightPublisher).

Prints one JSON line {pid, endpoints} once everything listens, one line {metrics} on each SIGUSR1, and on SIGTERM
stops, prints {metrics} and exits 0. With --token-env VAR every listener requires the token in VAR;
--tool-latency-ms sets the simulated backend's time per request (default 50). Limits are small so the size tests
stay cheap. tests/listenerkit.py starts it (`Listeners`) for the security and fault suites.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TOOL_LIMITS = {"max_frame_bytes": 64 * 1024, "hard_frame_bytes": 1024 * 1024}
GATEWAY_BODY_BYTES = 64 * 1024
TRAJECTORY_FRAME_BYTES = 1024 * 1024


Counters = Callable[[], dict[str, Any]]


async def tools_side(token: str | None, stop: asyncio.Event, serving: Callable[[Counters], None],
                     args: argparse.Namespace) -> Counters:
    from tool_servers.gateway import ToolGateway, start_gateway
    from tool_servers.server import ToolServerRole

    backend = {"backend": "simulated", "latency_ms": args.tool_latency_ms}
    role = ToolServerRole("text_search", backend, limits=TOOL_LIMITS, token=token)
    tool_endpoint = role.start()
    gateway = ToolGateway.from_endpoints({"text_search": [tool_endpoint]}, token=token, default_deadline_s=5.0)
    servers = await start_gateway(gateway, http=("127.0.0.1", 0), mcp_http=("127.0.0.1", 0), token=token,
                                  max_body_bytes=GATEWAY_BODY_BYTES)
    def counters() -> dict[str, Any]:
        return {"tool_server": role.stats(), "gateway": gateway.metrics.snapshot()}

    serving(counters)
    announce({"tool_server": tool_endpoint, "http": servers.http_url, "mcp": servers.mcp_url})
    await stop.wait()
    await servers.stop()
    await gateway.close()
    role.stop()
    return counters


async def learner_side(token: str | None, stop: asyncio.Event, serving: Callable[[Counters], None],
                       args: argparse.Namespace) -> Counters:
    from learner.admission import AdmissionController
    from learner.service import TrajectoryService
    from learner.weights import ZmqWeightPublisher

    service = TrajectoryService(AdmissionController(groups_per_step=1, max_staleness=0), token=token,
                                max_frame_bytes=TRAJECTORY_FRAME_BYTES)
    weights = ZmqWeightPublisher(token=token, metrics=service.metrics)
    def counters() -> dict[str, Any]:
        return {"learner": service.metrics.snapshot()}

    serving(counters)
    announce({"trajectories": service.endpoint, "weights": weights.endpoint})
    await stop.wait()
    service.close()
    weights.close()
    return counters


def announce(endpoints: dict[str, Any]) -> None:
    print(json.dumps({"pid": os.getpid(), "endpoints": endpoints}), flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["tools", "learner"])
    parser.add_argument("--token-env")
    parser.add_argument("--tool-latency-ms", type=float, default=50.0,
                        help="the simulated backend's time per request (the fuzz wants 0)")
    args = parser.parse_args()
    token = os.environ[args.token_env] if args.token_env else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    side = tools_side if args.side == "tools" else learner_side

    def serving(counters: Counters) -> None:
        loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps({"metrics": counters()}), flush=True))

    counters = await side(token, stop, serving, args)
    print(json.dumps({"metrics": counters()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
