"""Checkpoint naming, bucketing and the zmq weight publisher (single process, real sockets)."""
from __future__ import annotations

import pytest
import torch
import zmq
from safetensors import safe_open

from learner.weights import ZmqWeightPublisher, buckets_to_state_dict, make_buckets, to_checkpoint_names
from protocol import ErrorReply, LearnerOutbound, WeightBucket, WeightNone, WeightQuery, decode, encode


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
    # bf16 sizes a/b/big = 32/16/128 bytes, c stays int64 = 24: [a, b] = 48; big alone (> 80); c after big
    buckets = make_buckets(7, state, bucket_bytes=80, dtype="bfloat16")
    assert [[t.name for t in b.tensors] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    assert {(b.version, b.num_buckets) for b in buckets} == {(7, 3)}
    version, back = buckets_to_state_dict(list(reversed(buckets)))
    assert version == 7 and back["c"].dtype == torch.int64 and torch.equal(back["c"], state["c"])
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"], state["a"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="inconsistent"):
        buckets_to_state_dict(buckets[:2])


@pytest.fixture
def publisher():
    pub = ZmqWeightPublisher(bucket_mb=64 / (1024 * 1024))  # 64-byte buckets: several per version
    yield pub
    pub.close()


def query(publisher: ZmqWeightPublisher, have_version: int, payload: bytes | None = None) -> list:
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(publisher.endpoint)
    try:
        socket.send(payload if payload is not None else encode(WeightQuery(actor_id="t", have_version=have_version)))
        replies = [decode(socket.recv(), LearnerOutbound)]
        while isinstance(replies[0], WeightBucket) and len(replies) < replies[0].num_buckets:
            replies.append(decode(socket.recv(), LearnerOutbound))
        return replies
    finally:
        socket.close()
        context.term()


def test_publisher_serves_the_latest_version_only_when_newer(publisher) -> None:
    assert query(publisher, -1) == [WeightNone(version=-1)]
    state = {"w": torch.ones(10), "v": torch.zeros(10)}
    publisher.publish(0, state)
    buckets = query(publisher, -1)
    assert len(buckets) == 2 and all(isinstance(b, WeightBucket) for b in buckets)
    version, back = buckets_to_state_dict(buckets)
    assert version == 0 and torch.equal(back["w"], state["w"])
    assert query(publisher, 0) == [WeightNone(version=0)]
    publisher.publish(1, {"w": torch.full((10,), 2.0), "v": torch.zeros(10)})
    version, back = buckets_to_state_dict(query(publisher, 0))
    assert version == 1 and back["w"][0].item() == 2.0
    with pytest.raises(ValueError, match="not newer"):
        publisher.publish(1, state)
    assert publisher.metrics.snapshot()["weights_encode_s_count"] == 2


def test_publisher_answers_garbage_with_an_error_and_keeps_serving(publisher) -> None:
    reply = query(publisher, 0, payload=b"\xc1")
    assert isinstance(reply[0], ErrorReply) and reply[0].code == "bad_request"
    assert query(publisher, 5) == [WeightNone(version=-1)]
    assert publisher.metrics.counter("weights_bad_frames") == 1


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_checkpoint_names_match_for_both_tiny_model_families(family: str, tmp_path) -> None:
    tiny = pytest.importorskip("models.tiny")
    from transformers import AutoModelForImageTextToText

    texts = ["the red square is a shape; search for the blue circle and answer with a reason"] * 40
    path = tiny.build_tiny_model(tiny.TinyModelConfig(family=family, vocab_size=300, tokenizer_min_frequency=2),
                                 texts, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert set(to_checkpoint_names(model, model.state_dict())) == set(checkpoint_tensors(str(path)))
