"""Command line: `python -m tool_servers serve|query|stats ...` — run a tool server alone, or call one."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tool_servers.backends import TOOL_SECTIONS, build_backend
from tool_servers.client import ToolClient
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits
from tool_servers.server import ToolServer

log = logging.getLogger("tool_servers")


def _scalar(text: str) -> Any:
    """KEY=VALUE values: int, float, true/false/null, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--{what} expects KEY=VALUE, got {item!r}")
        out[key] = _scalar(value)
    return out


def _token(env_var: str | None) -> str | None:
    if env_var is None:
        return None
    token = os.environ.get(env_var)
    if not token:
        raise SystemExit(f"--token-env {env_var}: the variable is unset or empty")
    return token


async def _serve(args: argparse.Namespace) -> int:
    cfg = {"backend": args.backend, "corpus": args.corpus, **_pairs(args.knob, "knob")}
    if args.top_k is not None:
        cfg["top_k"] = args.top_k
    backend = build_backend(args.tool, cfg)
    server = ToolServer({args.tool: backend}, bind=args.bind, token=_token(args.token_env),
                        limits=ServerLimits.from_mapping(_pairs(args.limit, "limit")))
    endpoint = await server.start()
    print(f"serving {args.tool} on {endpoint}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("got %s, stopping", signal.Signals(s).name),
                                                    asyncio.ensure_future(server.stop())))
    await server.serve_forever()
    return 0


async def _query(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise SystemExit("query needs exactly one of --query or --image")
    call_args = {"query": args.query} if args.query is not None else {"image": Path(args.image).read_bytes()}
    client = ToolClient(args.endpoint, token=_token(args.token_env), default_deadline_s=args.deadline)
    try:
        reply = await client.call(args.tool, call_args)
    except ToolCallError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(f"{len(reply.items)} results in {reply.server_ms:.1f} ms (server)")
    for i, item in enumerate(reply.items):
        print(f"[{i}] {item.title}  {item.url}")
        if item.text:
            print(f"    {item.text}")
        if item.image is not None:
            where = ""
            if args.save_images:
                path = Path(args.save_images) / f"result_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(item.image)
                where = f" -> {path}"
            print(f"    image: {len(item.image)} bytes{where}")
    return 0


async def _stats(args: argparse.Namespace) -> int:
    client = ToolClient(args.endpoint, token=_token(args.token_env))
    try:
        stats = await client.stats(timeout_s=args.deadline)
    finally:
        await client.close()
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0 if len(stats) == len(args.endpoint) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tool_servers", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one tool server until SIGINT/SIGTERM")
    serve.add_argument("--tool", required=True, choices=sorted(TOOL_SECTIONS))
    serve.add_argument("--backend", default="local")
    serve.add_argument("--corpus", required=True, help="parquet (image_search) or JSONL (text_search)")
    serve.add_argument("--bind", default="tcp://127.0.0.1:*")
    serve.add_argument("--token-env", help="environment variable holding the shared token")
    serve.add_argument("--top-k", type=int)
    serve.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE", help="backend knob")
    serve.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE", help="ServerLimits field")

    query = sub.add_parser("query", help="call a tool once and print the results")
    query.add_argument("--endpoint", action="append", required=True, help="replica endpoint (repeatable)")
    query.add_argument("--tool", required=True)
    query.add_argument("--query")
    query.add_argument("--image", help="image file to search with")
    query.add_argument("--deadline", type=float, default=10.0, help="seconds")
    query.add_argument("--token-env")
    query.add_argument("--save-images", help="directory to write result thumbnails to")

    stats = sub.add_parser("stats", help="print each replica's counters and latencies as JSON")
    stats.add_argument("--endpoint", action="append", required=True)
    stats.add_argument("--deadline", type=float, default=2.0)
    stats.add_argument("--token-env")

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = {"serve": _serve, "query": _query, "stats": _stats}[args.command]
    return asyncio.run(command(args))


if __name__ == "__main__":
    sys.exit(main())
