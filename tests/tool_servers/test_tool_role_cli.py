"""ToolServerRole (a server on its own thread), SyncToolClient, and `python -m tool_servers` as a process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq

from protocol.images import encode_png
from tool_servers.client import SyncToolClient
from tool_servers.discovery import read_discovery
from tool_servers.errors import ToolCallError
from tool_servers.server import ToolServerRole
from ts_helpers import draw_entity, perturb

REPO = Path(__file__).resolve().parents[2]


def test_role_serves_blocking_clients_from_many_threads(text_corpus, image_corpus):
    text = ToolServerRole("text_search", {"backend": "local", "corpus": str(text_corpus), "replicas": 1, "top_k": 1},
                          limits={"max_queue": 64})
    image = ToolServerRole("image_search", {"backend": "local", "corpus": str(image_corpus), "top_k": 2})
    try:
        text_endpoint, image_endpoint = text.start(), image.start()
        with SyncToolClient([text_endpoint], default_deadline_s=5.0) as client:
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda _: client.call("text_search", {"query": "otter"}), range(40)))
            assert all(r.items[0].title == "Pondle" and len(r.items) == 1 for r in replies)
            with pytest.raises(ToolCallError) as info:
                client.call("text_search", {"query": ""})
            assert info.value.code == "bad_request"
            assert client.stats()[text_endpoint]["requests"] == 41
        with SyncToolClient(image_endpoint) as client:
            reply = client.call("image_search", {"image": encode_png(perturb(draw_entity(3), seed=3))})
            assert [i.title for i in reply.items][0] == "Entity 3" and len(reply.items) == 2
        stats = text.stats()
        assert stats["replies_ok"] == 40 and stats["error_bad_request"] == 1 and "latency_ms_p99" in stats
    finally:
        text.stop()
        image.stop()
    assert not any(t.name.startswith("tool-server-") for t in threading.enumerate())


def test_role_reports_config_errors_at_start(text_corpus):
    with pytest.raises(ValueError, match="corpus is null"):
        ToolServerRole("text_search", {"backend": "local", "corpus": None}).start()
    with pytest.raises(ValueError, match="unknown tool server limits"):
        ToolServerRole("text_search", {"corpus": str(text_corpus)}, limits={"queue": 3})
    first = ToolServerRole("text_search", {"corpus": str(text_corpus)})
    endpoint = first.start()
    try:
        second = ToolServerRole("text_search", {"corpus": str(text_corpus)}, bind=endpoint)
        with pytest.raises(zmq.ZMQError, match="in use"):
            second.start()
        first.stop()
        assert second.start() == endpoint  # a failed start leaves the role startable
        second.stop()
    finally:
        first.stop()


def test_cli_serves_queries_and_stops_on_sigterm(text_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TS_TOKEN": "tok"}
    log_path = tmp_path / "serve.log"
    serve = [sys.executable, "-m", "tool_servers", "serve", "--tool", "text_search", "--corpus", str(text_corpus),
             "--token-env", "TS_TOKEN", "--top-k", "1", "--knob", "max_chars=40"]
    with open(log_path, "w") as log, \
            subprocess.Popen(serve, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True) as server:
        try:
            first = server.stdout.readline()
            assert first.startswith("serving text_search on tcp://127.0.0.1:"), first + log_path.read_text()
            query = [sys.executable, "-m", "tool_servers", "query", "--endpoint", first.split()[-1],
                     "--tool", "text_search", "--token-env", "TS_TOKEN", "--query", "who built the clock tower"]
            out = subprocess.run(query, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert "[0] Harrow" in out.stdout and "[1]" not in out.stdout
            out = subprocess.run(query, cwd=REPO, env={**env, "TS_TOKEN": "nope"}, capture_output=True, text=True,
                                 timeout=30)
            assert out.returncode == 1 and "error unauthorized" in out.stderr
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0, log_path.read_text()
        finally:
            if server.poll() is None:
                server.kill()


def test_cli_with_config_cache_and_discovery(text_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    discovery = tmp_path / "replicas.json"
    serve = [sys.executable, "-m", "tool_servers", "serve", "--tool", "text_search", "--config",
             str(REPO / "conf/tool_servers/local.yaml"), "--corpus", str(text_corpus), "--cache-entries", "16",
             "--discovery", str(discovery)]
    with subprocess.Popen(serve, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as server:
        try:
            endpoint = server.stdout.readline().split()[-1]
            assert read_discovery(discovery) == {"text_search": [endpoint]}
            query = [sys.executable, "-m", "tool_servers", "query", "--discovery", str(discovery),
                     "--tool", "text_search", "--query", "Who built the clock tower"]
            outs = [subprocess.run(query, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
                    for _ in range(2)]
            assert all(o.returncode == 0 and "[0] Harrow" in o.stdout for o in outs), outs
            # top_k 1 and a one-sentence snippet from the conf file: the page's sentence about the clock tower
            assert "[1] " not in outs[0].stdout and "Harrow has a famous clock tower" in outs[0].stdout
            assert "capital of Quell" not in outs[0].stdout
            assert "from cache" not in outs[0].stdout and "from cache" in outs[1].stdout
            stats = subprocess.run([sys.executable, "-m", "tool_servers", "stats", "--discovery", str(discovery),
                                    "--tool", "text_search"], cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=30)
            assert stats.returncode == 0 and json.loads(stats.stdout)[endpoint]["cache_hits"] == 1
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
            assert read_discovery(discovery) == {}  # a stopped replica takes itself out
        finally:
            if server.poll() is None:
                server.kill()


def test_cli_builds_the_wiki_corpus(tmp_path):
    out = tmp_path / "wiki.jsonl"
    done = subprocess.run([sys.executable, "-m", "tool_servers", "build-corpus", "wiki", str(out), "--limit", "20"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "wrote 20 pages" in done.stdout, done.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"wiki-en-us-{k}" for k in range(20)]


def test_cli_gateway_fronts_a_served_tool(text_corpus):
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    serve = [sys.executable, "-m", "tool_servers", "serve", "--tool", "text_search", "--corpus", str(text_corpus)]
    with subprocess.Popen(serve, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as server:
        try:
            endpoint = server.stdout.readline().split()[-1]
            gateway_cmd = [sys.executable, "-m", "tool_servers", "gateway", "--endpoint", f"text_search={endpoint}",
                           "--http", "127.0.0.1:0"]
            with subprocess.Popen(gateway_cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) as gateway:
                try:
                    line = gateway.stdout.readline()
                    url = line.split()[2]
                    assert line.startswith("gateway: http http://127.0.0.1:") and line.split()[-1] == "off"
                    body = json.dumps({"query": "who built the clock tower"}).encode()
                    request = urllib.request.Request(f"{url}/v1/tools/text_search", data=body, method="POST")
                    with urllib.request.urlopen(request, timeout=10) as response:
                        answer = json.loads(response.read())
                    assert answer["ok"] and answer["items"][0]["title"] == "Harrow"
                    gateway.send_signal(signal.SIGTERM)
                    assert gateway.wait(timeout=10) == 0
                finally:
                    if gateway.poll() is None:
                        gateway.kill()
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
        finally:
            if server.poll() is None:
                server.kill()
