"""The warm start inside the learner (learner/sft.py): the SFT objective trains through the FSDP2 Trainer on oracle
trajectories (their tokenisation is tested in tests/data/test_data_trajectories.py), the saved folder loads like
the base, stop() saves nothing, and two ranks equal one."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from data.oracle import OracleConfig, oracle_episode
from episode.oracle import oracle_trajectory
from episode.tokenizer import EpisodeTokenizer
from learner.packing import Collator
from learner.sft import SftConfig, SftRank, lr_schedule, run_sft_local, sample_from_trajectory, save_hf_folder
from learner.trainer import sft_loss
from protocol.sockets import free_port

KINDS = ("pixels", "image_search", "image_text_search", "text_search")


def test_sft_loss_by_hand():
    logp = torch.log(torch.tensor([[1.0, 0.5, 0.25], [1.0, 0.125, 1.0]]))
    mask = torch.tensor([[False, True, True], [False, True, False]])
    loss, metrics = sft_loss(logp, mask, "token_mean", 3.0)
    assert loss.item() == pytest.approx((np.log(2) + np.log(4) + np.log(8)) / 3)
    assert metrics["tokens"] == 3.0
    bad = logp.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sft_loss(bad, mask, "token_mean", 3.0)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = lr_schedule(SftConfig(steps=20, vision_steps=0, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1))
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(lr=0.0), dict(steps=5, vision_steps=6),
                                 dict(fresh_name_fraction=2.0), dict(min_lr_ratio=1.5), dict(name="grpo")])
def test_bad_sft_config_is_rejected(bad):
    with pytest.raises(ValueError):
        SftConfig(**bad)


def test_unknown_sft_keys_are_rejected():
    with pytest.raises(ValueError, match="stpes"):
        SftConfig.from_dict({"stpes": 3})


def test_one_rank_trains_saves_a_loadable_folder_and_the_loss_falls(sft_world, tmp_path):
    from transformers import AutoModelForImageTextToText

    paths, world, model = sft_world
    cfg = {"learner": {"world_size": 1}, "sft": {"steps": 8, "vision_steps": 4, "batch_size": 4, "lr": 3e-3,
                                             "vision_drills": 0.0, "drills": 0.0}}
    rank = SftRank(0, 1, "127.0.0.1", free_port(), str(model), str(paths.root), cfg)
    report = rank.run(str(tmp_path / "warm"))
    rows = rank.drain_metrics()
    assert report["completed"] and report["steps"] == 8 and report["files"] == ["model.safetensors"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["vision_phase"] for r in rows] == [1.0] * 4 + [0.0] * 4
    assert all(r["loss_tokens"] > 0 and np.isfinite(r["loss"]) for r in rows)
    assert report["final_loss"] < report["first_loss"] - 1.0
    # The folder loads with no missing or unexpected weights, and scores fresh oracle samples better than the base.
    tok = EpisodeTokenizer.from_pretrained(tmp_path / "warm")
    rng = np.random.default_rng(5)
    episodes = [oracle_episode(next(q for q in world.questions if q["kind"] == kind and q["split"] == "test"), world,
                               rng, OracleConfig()) for kind in KINDS]
    samples = [sample_from_trajectory(oracle_trajectory(tok, e), "s") for e in episodes]
    collate = Collator(tok.processor.image_processor, tok.image_pad_id, 0)
    batch = collate(samples)

    def nll(path) -> float:
        net, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            logits = net(**batch.model_inputs(torch.device("cpu"), torch.float32)).logits
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        logp = torch.nn.functional.pad(logp, (1, 0)).reshape(-1)[batch.token_index]
        return float(-(logp[batch.loss_mask]).mean())

    assert nll(tmp_path / "warm") < nll(model) - 1.0


def test_stop_ends_the_run_and_saves_nothing(sft_world, tmp_path):
    paths, _, model = sft_world
    rank = SftRank(0, 1, "127.0.0.1", free_port(), str(model), str(paths.root),
                   {"learner": {"world_size": 1}, "sft": {"steps": 5, "vision_steps": 1, "batch_size": 2}})
    rank.stop()
    report = rank.run(str(tmp_path / "warm"))
    assert report == {**report, "completed": False, "steps": 0}
    assert not (tmp_path / "warm").exists()


def test_saved_folder_shards_big_weights_and_keeps_the_config(sft_world, tmp_path, monkeypatch):
    import json

    from learner import sft as sft_module

    _, _, model = sft_world
    tensors = {"a.weight": torch.ones(4, 4), "b.weight": torch.zeros(8), "c.steps": torch.arange(3)}
    monkeypatch.setattr(sft_module, "SHARD_BYTES", 64)
    files = save_hf_folder(tensors, model, tmp_path, "bfloat16")
    assert len(files) == 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "forage_build.json").exists()
    with pytest.raises(ValueError, match="float8"):
        save_hf_folder(tensors, model, tmp_path, "float8")


@pytest.mark.slow
def test_two_ranks_equal_one_process(sft_world, tmp_path):
    """run_sft_local spawns real gloo ranks: 2 ranks (each trains half of every batch) end with the weights of 1."""
    from safetensors.torch import load_file

    paths, _, model = sft_world
    sft = {"steps": 3, "vision_steps": 1, "batch_size": 4}
    rows: list[dict] = []
    one = run_sft_local(model, paths.root, tmp_path / "one", {"learner": {"world_size": 1}, "sft": sft})
    two = run_sft_local(model, paths.root, tmp_path / "two", {"learner": {"world_size": 2}, "sft": sft},
                        on_row=rows.append)
    assert one["steps"] == two["steps"] == 3 and two["world_size"] == 2
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base = load_file(model / "model.safetensors")
    assert set(a) == set(b) == set(base)
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Adam divides by sqrt(v): float-order gradient differences (reduction order) show up at ~lr·1e-2.
    assert moved > 1e-4 and apart < 1e-4 and apart < moved / 20, (moved, apart)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)


def test_a_failing_rank_fails_the_local_run(sft_world, tmp_path):
    paths, _, model = sft_world
    with pytest.raises(RuntimeError, match="warm start failed"):
        run_sft_local(tmp_path / "no-model", paths.root, tmp_path / "out",
                      {"learner": {"world_size": 1}, "sft": {"steps": 1, "vision_steps": 0}})
    with pytest.raises(ValueError, match="batch_size"):
        run_sft_local(model, paths.root, tmp_path / "out", {"sft": {"batch_size": 0}})
