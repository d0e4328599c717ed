"""Which failed tool calls are outages (the service's fault) and which are the caller's malformed request, as a
ToolClient meets them against real ToolServers on 127.0.0.1 (actors mark an episode cut by an outage tool_failed)."""
from __future__ import annotations

import asyncio

import pytest

from protocol import ERROR_CODES
from protocol.sockets import free_port
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.local_text import LocalTextSearch
from tool_servers.errors import INFRASTRUCTURE_CODES, REQUEST_CODES, ToolCallError
from tool_servers.limits import ServerLimits
from ts_helpers import FakeBackend, client_of, run, serving


def test_every_code_is_either_an_outage_or_a_rejected_request():
    assert INFRASTRUCTURE_CODES | REQUEST_CODES == set(ERROR_CODES) and not INFRASTRUCTURE_CODES & REQUEST_CODES
    assert REQUEST_CODES == {"bad_request", "too_large"}
    for code in ERROR_CODES:
        error = ToolCallError(code, "x")
        assert error.infrastructure is (code in INFRASTRUCTURE_CODES)
    import pickle

    assert pickle.loads(pickle.dumps(ToolCallError("timeout", "x"))).infrastructure  # e.g. across Ray


@pytest.fixture(scope="module")
def backends(image_corpus, text_corpus):
    return {"image_search": LocalImageSearch(image_corpus, top_k=3), "text_search": LocalTextSearch(text_corpus)}


async def _failure(client, tool: str, args: dict, deadline_s: float = 1.0) -> ToolCallError:
    with pytest.raises(ToolCallError) as info:
        await client.call(tool, args, deadline_s=deadline_s)
    return info.value


def test_a_malformed_call_is_the_callers_fault(backends):
    """A query of no words, a query over max_query_chars, an image that is not one: rejected, not an outage."""
    async def main():
        async with serving(backends, limits=ServerLimits(max_query_chars=32)) as (_, endpoint), \
                client_of(endpoint) as client:
            for tool, args, code in [("text_search", {"query": "!!! ???"}, "bad_request"),
                                     ("text_search", {"query": "otter " * 10}, "too_large"),
                                     ("image_search", {"image": b"no such image"}, "bad_request")]:
                error = await _failure(client, tool, args)
                assert (error.code, error.infrastructure) == (code, False), error
    run(main())


def test_an_outage_is_infrastructure(backends):
    """Every replica down, a backend slower than the deadline, a backend that raises, a full queue, a tool the
    deployment lacks, a wrong token: each an infrastructure failure, whatever the query."""
    async def main():
        async with client_of(f"tcp://127.0.0.1:{free_port()}", retries=0) as client:  # nothing listens there
            error = await _failure(client, "text_search", {"query": "otter"}, deadline_s=0.3)
            assert (error.code, error.infrastructure) == ("timeout", True)
        slow, broken = FakeBackend(delay_s=1.0), FakeBackend(fail="batch")
        async with serving({"slow": slow, "broken": broken, **backends},
                           limits=ServerLimits(max_queue=1, max_batch=1)) as (_, endpoint), \
                client_of(endpoint, retries=0) as client:
            error = await _failure(client, "slow", {"query": "otter"}, deadline_s=0.3)
            assert (error.code, error.infrastructure) == ("timeout", True)
            error = await _failure(client, "broken", {"query": "otter"})
            assert (error.code, error.infrastructure) == ("backend_error", True)
            error = await _failure(client, "web_search", {"query": "otter"})
            assert (error.code, error.infrastructure) == ("unknown_tool", True)
            await asyncio.sleep(1.0)  # the slow batch above is done: its queue is empty again
            results = await asyncio.gather(*(client.call("slow", {"query": f"q{k}"}, deadline_s=3.0)
                                             for k in range(4)), return_exceptions=True)
            full = [r for r in results if isinstance(r, ToolCallError)]
            assert full and all((r.code, r.infrastructure) == ("overloaded", True) for r in full), results
        async with serving(backends, token="s3cret") as (_, endpoint), client_of(endpoint, token="wrong") as client:
            error = await _failure(client, "text_search", {"query": "otter"})
            assert (error.code, error.infrastructure) == ("unauthorized", True)
    run(main())
