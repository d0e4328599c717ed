"""Checkpoint naming, bucketing (row chunks for big tensors), the zmq endpoint, the fs transport and the nccl
transport's control flow with a fake communicator (single process, real sockets)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from learner.weights import FsWeightPublisher, ZmqWeightPublisher, make_buckets, make_publisher, to_checkpoint_names
from learner.weights_nccl import NcclWeightPublisher, update_info
from learner_worlds import Dealer
from protocol import (
    ErrorReply,
    NamedArray,
    ProtocolError,
    WeightAnnounce,
    WeightBucket,
    WeightNone,
    WeightQuery,
    decode,
    encode,
)
from protocol.weights import FS_MANIFEST, assemble_weight_buckets, load_fs_weights, read_fs_manifest


def checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_checkpoint_names_equal_the_saved_safetensors_keys(tiny_vlm) -> None:
    from transformers import AutoModelForImageTextToText

    path, _ = tiny_vlm
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    names = to_checkpoint_names(model, model.state_dict())
    saved = checkpoint_tensors(path)
    assert set(names) == set(saved)
    assert "lm_head.weight" not in names  # tied to the embeddings, not written by save_pretrained
    assert any(k.startswith("visual.") for k in names) and any(k.startswith("model.layers.") for k in names)
    assert all(torch.equal(names[k], saved[k]) for k in saved)


def test_buckets_respect_the_size_and_round_trip_in_bf16() -> None:
    state = {"a": torch.randn(4, 4), "b": torch.randn(8), "big": torch.randn(64), "c": torch.arange(3)}
    # bf16 sizes a/b/big = 32/16/128 bytes, c stays int64 = 24: [a, b] = 48; big (> 80) in chunks of 40 elements
    # (80 bytes) and 24 (48 bytes); c fits beside the second chunk (48 + 24 <= 80)
    buckets = make_buckets(7, state, bucket_bytes=80, dtype="bfloat16")
    assert [[t.name for t in b.tensors] for b in buckets] == [["a", "b"], ["big"], ["big", "c"]]
    assert [(t.row_offset, t.total_rows) for t in buckets[1].tensors + buckets[2].tensors] == [(0, 64), (40, 64),
                                                                                                (0, 0)]
    assert {(b.version, b.num_buckets) for b in buckets} == {(7, 3)}
    version, back = assemble_weight_buckets(list(reversed(buckets)))
    assert version == 7 and back["c"].dtype == torch.int64 and torch.equal(back["c"], state["c"])
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"], state["a"].to(torch.bfloat16))
    with pytest.raises(ProtocolError, match="inconsistent"):
        assemble_weight_buckets(buckets[:2])


@pytest.fixture
def publisher():
    pub = ZmqWeightPublisher(bucket_mb=64 / (1024 * 1024))  # 64-byte buckets: several per version
    yield pub
    pub.close()


def query(publisher: ZmqWeightPublisher, have_version: int, payload: bytes | None = None) -> list:
    dealer = Dealer(publisher.endpoint, timeout_ms=5000)
    try:
        return dealer.ask(payload if payload is not None else encode(WeightQuery(actor_id="t",
                                                                                 have_version=have_version)))
    finally:
        dealer.close()


def test_publisher_serves_the_latest_version_only_when_newer(publisher) -> None:
    assert query(publisher, -1) == [WeightNone(version=-1)]
    state = {"w": torch.ones(10), "v": torch.zeros(10)}
    publisher.publish(0, state)
    buckets = query(publisher, -1)
    assert len(buckets) == 2 and all(isinstance(b, WeightBucket) for b in buckets)
    version, back = assemble_weight_buckets(buckets)
    assert version == 0 and torch.equal(back["w"], state["w"])
    assert query(publisher, 0) == [WeightNone(version=0)]
    publisher.publish(1, {"w": torch.full((10,), 2.0), "v": torch.zeros(10)})
    version, back = assemble_weight_buckets(query(publisher, 0))
    assert version == 1 and back["w"][0].item() == 2.0
    with pytest.raises(ValueError, match="not newer"):
        publisher.publish(1, state)
    assert publisher.metrics.snapshot()["weights_encode_s_count"] == 2


def test_publisher_answers_garbage_with_an_error_and_keeps_serving(publisher) -> None:
    reply = query(publisher, 0, payload=b"\xc1")
    assert isinstance(reply[0], ErrorReply) and reply[0].code == "bad_request"
    assert query(publisher, 5) == [WeightNone(version=-1)]
    assert publisher.metrics.counter("weights_bad_frames") == 1


def test_a_query_below_every_version_before_the_first_publish_gets_weight_none(publisher) -> None:
    """Nothing published yet: whatever have_version says, the answer is WeightNone (it used to be no reply at all
    for have_version < -1, counted as weights_served; found by tests/faults/test_fuzz_listeners.py)."""
    for have_version in (-2, -2**63, -1, 7):
        assert query(publisher, have_version) == [WeightNone(version=-1)]
    assert publisher.metrics.counter("weights_queries") == 4 and publisher.metrics.counter("weights_served") == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_checkpoint_names_match_for_both_tiny_model_families(family: str, tmp_path) -> None:
    tiny = pytest.importorskip("models.tiny")
    from transformers import AutoModelForImageTextToText

    texts = ["the red square is a shape; search for the blue circle and answer with a reason"] * 40
    path = tiny.build_tiny_model(tiny.TinyModelConfig(family=family, vocab_size=300, tokenizer_min_frequency=2),
                                 texts, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert set(to_checkpoint_names(model, model.state_dict())) == set(checkpoint_tensors(str(path)))


# ------------------------------------------------------------------------------------------ row chunks (zmq)

def test_a_tensor_larger_than_a_bucket_travels_as_row_chunks_and_reassembles() -> None:
    state = {"emb": torch.arange(40, dtype=torch.float32).reshape(10, 4), "bias": torch.ones(3), "s": torch.tensor(2.0)}
    # emb is 160 bytes > 48: rows of 16 bytes, 3 rows per chunk -> 4 chunks (3, 3, 3, 1 rows), each its own bucket
    buckets = make_buckets(3, state, bucket_bytes=48)
    layout = [[(t.name, t.row_offset, t.total_rows, t.array.shape) for t in b.tensors] for b in buckets]
    assert layout[0] == [("bias", 0, 0, [3])]
    assert [entry[0] for entry in layout[1:5]] == [("emb", 0, 10, [3, 4]), ("emb", 3, 10, [3, 4]),
                                                   ("emb", 6, 10, [3, 4]), ("emb", 9, 10, [1, 4])]
    assert layout[4][1][0] == "s"  # a small tensor shares the last chunk's bucket
    assert all(sum(len(t.array.data) for t in b.tensors) <= 48 for b in buckets)
    frames = [encode(b) for b in buckets]  # through the codec's chunk validation
    version, back = assemble_weight_buckets([decode(f, WeightBucket) for f in reversed(frames)])
    assert version == 3 and set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_broken_chunk_sets_are_refused() -> None:
    buckets = make_buckets(0, {"w": torch.randn(6, 2)}, bucket_bytes=16)  # 3 chunks of 2 rows
    assert len(buckets) == 3
    gap = [buckets[0], buckets[2]]
    for b in gap:
        b.num_buckets = 2
    gap[1].index = 1
    with pytest.raises(ProtocolError, match="does not continue"):
        assemble_weight_buckets(gap)
    bad = WeightBucket(version=0, index=0, num_buckets=1, tensors=[NamedArray(
        name="w", array=buckets[1].tensors[0].array, row_offset=5, total_rows=6)])
    with pytest.raises(ProtocolError, match="outside"):
        decode(encode(bad), WeightBucket)  # rows [5, 7) of 6


def test_the_endpoint_refuses_a_bucket_size_that_cannot_fit_a_frame() -> None:
    with pytest.raises(ValueError, match="frame limit"):
        ZmqWeightPublisher(bucket_mb=8.0, max_frame_bytes=4 * 1024 * 1024)


# ------------------------------------------------------------------------------------------------ fs transport

def test_fs_transport_writes_versions_atomically_announces_and_prunes(tmp_path) -> None:
    endpoint = ZmqWeightPublisher(bucket_mb=64 / (1024 * 1024), dtype="bfloat16")
    try:
        publisher = make_publisher("fs", endpoint, weight_dir=str(tmp_path / "w"), keep=2)
        assert isinstance(publisher, FsWeightPublisher)
        assert load_fs_weights(tmp_path / "w") is None and read_fs_manifest(tmp_path / "w") is None
        state = {"a": torch.randn(8, 4), "b": torch.randn(8), "i": torch.arange(5)}
        for version in range(3):
            publisher.publish(version, {k: v + version if v.is_floating_point() else v for k, v in state.items()})
        manifest = read_fs_manifest(tmp_path / "w")
        # 64-byte shards in bf16: a (64 B), b (16 B) + i (40 B int64)
        assert manifest.version == 2 and manifest.folder == "v00000002" and len(manifest.files) == 2
        assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [FS_MANIFEST, "v00000001", "v00000002"]
        version, back = load_fs_weights(tmp_path / "w", have_version=1)
        assert version == 2 and back["a"].dtype == torch.bfloat16 and back["i"].dtype == torch.int64
        assert torch.equal(back["a"], (state["a"] + 2).to(torch.bfloat16)) and torch.equal(back["i"], state["i"])
        assert load_fs_weights(tmp_path / "w", have_version=2) is None
        (announce,) = query(endpoint, 0)
        assert announce == WeightAnnounce(version=2, transport="fs", location=str((tmp_path / "w").resolve()))
        with pytest.raises(ValueError, match="not newer"):
            publisher.publish(2, state)
        (tmp_path / "w" / FS_MANIFEST).write_text("{not json")
        with pytest.raises(ProtocolError, match="malformed"):
            read_fs_manifest(tmp_path / "w")
    finally:
        endpoint.close()


def test_fs_reader_reports_a_pruned_version(tmp_path) -> None:
    publisher = FsWeightPublisher(tmp_path, bucket_mb=1.0, keep=1)
    publisher.publish(0, {"w": torch.ones(2)})
    import shutil

    shutil.rmtree(tmp_path / "v00000000")  # what a reader sees when the writer pruned under it
    with pytest.raises(ProtocolError, match="vanished"):
        load_fs_weights(tmp_path)


# ---------------------------------------------------------------------------------- nccl transport (no NCCL)

class FakeGroup:
    """Records what would be broadcast; `gate` lets the test hold a broadcast 'in flight'."""

    def __init__(self) -> None:
        import threading

        self.sent: list[tuple[str, torch.Tensor]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.opened: tuple | None = None


def test_nccl_control_flow_announces_assigns_ranks_and_coalesces(publisher) -> None:
    group = FakeGroup()

    def open_group(address: str, port: int, world_size: int) -> FakeGroup:
        group.opened = (address, port, world_size)
        return group

    def send(g: FakeGroup, items, buffer_bytes: int, num_buffers: int) -> None:
        assert g is group and buffer_bytes == 1024 and num_buffers == 2
        g.gate.wait(10)
        g.sent.extend(items)

    nccl = NcclWeightPublisher(publisher, "127.0.0.1", 29555, engine_ranks=2, bucket_bytes=1024, dtype="bfloat16",
                               open_group=open_group, send=send)
    try:
        assert query(publisher, -1) == [WeightNone(version=-1)]
        state = {"b": torch.ones(2, 3), "a": torch.arange(4)}
        nccl.publish(0, state)
        assert nccl.wait_sent(0, timeout=10)
        assert group.opened == ("127.0.0.1", 29555, 3)
        assert [name for name, _ in group.sent] == ["a", "b"] and group.sent[1][1].dtype == torch.bfloat16
        (first,) = query(publisher, -1)  # an actor's first query: its NCCL init info and the update info
        assert isinstance(first, WeightAnnounce) and first.transport == "nccl" and first.version == 0
        assert first.init["rank_offset"] == 1 and first.init["world_size"] == 3 and first.init["packed"]
        assert (first.names, first.dtype_names, first.shapes) == (["a", "b"], ["int64", "bfloat16"], [[4], [2, 3]])
        assert update_info({"a": torch.arange(4), "b": torch.ones(2, 3, dtype=torch.bfloat16)}) == {
            "names": first.names, "dtype_names": first.dtype_names, "shapes": first.shapes}
        # A second actor gets the next rank; a third one does not fit the 2-engine group.
        assert query_as(publisher, "actor1", -1)[0].init["rank_offset"] == 2
        assert query_as(publisher, "t", -1)[0].init["rank_offset"] == 1  # stable per actor
        (refused,) = query_as(publisher, "actor9", -1)
        assert isinstance(refused, ErrorReply) and "full" in refused.message
        assert query(publisher, 0) == [WeightNone(version=0)]

        # While version 1 is in flight, versions 2 and 3 arrive: only 3 is sent next (2 is skipped, counted).
        group.gate.clear()
        group.sent.clear()
        nccl.publish(1, {"a": torch.arange(4), "b": torch.zeros(2, 3)})
        assert wait_until(lambda: isinstance(query(publisher, 0)[0], WeightAnnounce))
        assert query(publisher, 0)[0].version == 1  # announced while the broadcast runs
        nccl.publish(2, state)
        nccl.publish(3, state)
        group.gate.set()
        assert nccl.wait_sent(3, timeout=10) and nccl.version == 3
        assert len(group.sent) == 4  # versions 1 and 3, two tensors each
        assert publisher.metrics.counter("weights_versions_skipped") == 1
        with pytest.raises(ValueError, match="not newer"):
            nccl.publish(3, state)
    finally:
        group.gate.set()
        nccl.close()  # also closes the endpoint (idempotent; the fixture closes it again)


def test_an_nccl_send_failure_surfaces_at_the_next_publish(publisher) -> None:
    def send(group, items, buffer_bytes, num_buffers):
        raise RuntimeError("NCCL error: remote process exited")

    nccl = NcclWeightPublisher(publisher, "127.0.0.1", 29556, engine_ranks=1, open_group=lambda *a: object(),
                               send=send)
    nccl.publish(0, {"w": torch.ones(1)})
    assert not nccl.wait_sent(0, timeout=10)
    with pytest.raises(RuntimeError, match="remote process exited"):
        nccl.publish(1, {"w": torch.ones(1)})
    nccl.close()
    with pytest.raises(ValueError, match="divisible"):
        NcclWeightPublisher(publisher, "127.0.0.1", 1, engine_ranks=3, ranks_per_engine=2)


def query_as(publisher: ZmqWeightPublisher, actor_id: str, have_version: int) -> list:
    return query(publisher, have_version, encode(WeightQuery(actor_id=actor_id, have_version=have_version)))


def wait_until(condition, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
