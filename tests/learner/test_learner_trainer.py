"""The trainer in a 1-rank gloo world inside the test process: the lr schedule by hand, gradient clipping, packed
vs padded steps, the reference-model KL and entropy terms, and a checkpoint round trip that continues bit for bit."""
from __future__ import annotations

import math
import os

import msgspec
import numpy as np
import pytest
import torch
import torch.distributed as dist

from learner.batch import samples_from_groups
from learner.checkpoint import CheckpointError, LearnerState, list_checkpoints, resolve_checkpoint
from learner.config import AlgoConfig, LearnerConfig
from learner.trainer import Trainer, lr_factor
from learner_worlds import make_group, make_trajectory
from protocol.sockets import free_port


# ------------------------------------------------------------------------------------------------ lr schedule

def test_warmup_then_linear_and_cosine_decay_by_hand() -> None:
    # warm-up 4: (s + 1)/4 for s = 0..3
    assert [lr_factor(s, 4, "cosine", 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # after warm-up, p = (s − 4)/10: linear 1 − 0.9p; cosine 0.1 + 0.9·½(1 + cos πp)
    assert lr_factor(9, 4, "linear", 10, 0.1) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(9, 4, "cosine", 10, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(14, 4, "cosine", 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(1000, 4, "linear", 10, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert lr_factor(1000, 0, "constant", 10, 0.1) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 0, "step", 10, 0.0)
    with pytest.raises(ValueError, match="step"):
        lr_factor(-1, 0, "constant", 10, 0.0)


# ------------------------------------------------------------------------------------------ a 1-rank world

@pytest.fixture(scope="module")
def world():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_trainer(path: str, learner: dict | None = None, algo: dict | None = None) -> Trainer:
    learner_cfg = LearnerConfig.from_dict({"world_size": 1, "lr": 1e-2, "micro_batch_tokens": 64, **(learner or {})})
    return Trainer(path, learner_cfg, AlgoConfig.from_dict(algo))


def batch(ids: dict[str, int], seed: int = 1) -> list:
    groups = [make_group(f"g{seed}", ids, seed=seed), make_group(f"h{seed}", ids, seed=seed + 1, with_image=False,
                                                                  rewards=(0.0, 1.0, 0.5, 0.0))]
    return samples_from_groups(groups, AlgoConfig())


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in trainer.model.state_dict().items()}


def test_gradients_are_clipped_to_the_configured_norm(world, tiny_vlm) -> None:
    path, ids = tiny_vlm
    trainer = make_trainer(path, {"grad_clip": 1e-3})
    metrics = trainer.train_step(batch(ids))
    assert metrics["grad_norm"] > 1e-2  # the pre-clip norm is reported
    assert trainer.grad_norm() == pytest.approx(1e-3, rel=1e-4)  # what the optimiser stepped with
    loose = make_trainer(path, {"grad_clip": 1e6})
    metrics = loose.train_step(batch(ids))
    assert loose.grad_norm() == pytest.approx(metrics["grad_norm"], rel=1e-5)


def test_lr_follows_the_schedule_and_packing_matches_padding(world, tiny_vlm) -> None:
    path, ids = tiny_vlm
    schedule = {"warmup_steps": 2, "lr_schedule": "linear", "decay_steps": 2, "min_lr_ratio": 0.5}
    packed = make_trainer(path, {**schedule, "packing": True})
    padded = make_trainer(path, {**schedule, "packing": False})
    rows = [(packed.train_step(batch(ids, seed)), padded.train_step(batch(ids, seed))) for seed in (1, 2, 3, 4)]
    assert [r[0]["lr"] for r in rows] == pytest.approx([5e-3, 1e-2, 1e-2, 7.5e-3])
    assert packed.optimizer.param_groups[0]["lr"] == pytest.approx(7.5e-3)
    for p, q in rows:
        assert p["loss"] == pytest.approx(q["loss"], abs=1e-5) and p["grad_norm"] == pytest.approx(q["grad_norm"],
                                                                                                   rel=1e-4)
        assert p["model_tokens"] < q["model_tokens"]  # packing computes no padding
    # Adam divides by sqrt(v): on parameters with near-zero gradients float noise (~1e-7) in the two summation
    # orders moves an update by a fraction of lr = 1e-2, so compare parameters at 1% of one step.
    a, b = parameters(packed), parameters(padded)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for name, p in trainer.model.named_parameters() if p.grad is not None}


def test_a_tool_failed_episode_contributes_exactly_zero_gradient(world, tiny_vlm) -> None:
    """Two groups, then the same two with one more episode that a tool outage cut short (an extreme reward, tokens
    of its own): the gradient, the loss and the step are bit for bit those of the groups without it. The same
    episode unflagged does move them (the comparison can fail)."""
    path, ids = tiny_vlm
    clean = [make_group("g", ids, rewards=(1.0, 0.0, 0.0, 1.0)),
             make_group("h", ids, seed=2, with_image=False, rewards=(0.0, 1.0, 0.5, 0.0))]
    extra = make_trajectory(np.random.default_rng(9), ids, reward=7.0, gen_len=9)

    def plus(trajectory) -> list:
        return [msgspec.structs.replace(clean[0], trajectories=[*clean[0].trajectories, trajectory]), clean[1]]

    runs = {}
    for name, groups in {"clean": clean, "outage": plus(msgspec.structs.replace(extra, tool_failed=True)),
                         "counted": plus(extra)}.items():
        trainer = make_trainer(path, {"grad_clip": 1e6})
        metrics = trainer.train_step(samples_from_groups(groups, AlgoConfig()))
        runs[name] = (metrics, gradients(trainer), parameters(trainer))
    (clean_m, clean_g, clean_p), (out_m, out_g, out_p) = runs["clean"], runs["outage"]
    assert clean_g and clean_g.keys() == out_g.keys()
    assert all(torch.equal(clean_g[k], out_g[k]) for k in clean_g)
    assert all(torch.equal(clean_p[k], out_p[k]) for k in clean_p)
    assert (out_m["loss"], out_m["loss_tokens"], out_m["grad_norm"]) == \
        (clean_m["loss"], clean_m["loss_tokens"], clean_m["grad_norm"])
    counted_m, counted_g, _ = runs["counted"]
    assert counted_m["loss_tokens"] == clean_m["loss_tokens"] + 9
    assert not all(torch.equal(clean_g[k], counted_g[k]) for k in clean_g)


def test_reference_kl_starts_at_zero_and_grows_and_entropy_is_reported(world, tiny_vlm) -> None:
    path, ids = tiny_vlm
    trainer = make_trainer(path, {"lr": 5e-2}, {"kl_coef": 0.1, "kl_kind": "low_var_kl", "entropy_coef": 0.01})
    assert trainer.reference is not None
    first = trainer.train_step(batch(ids))
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-7) and first["entropy"] > 0.1
    second = trainer.train_step(batch(ids))
    assert second["kl_ref"] > 1e-4
    plain = make_trainer(path)
    assert plain.reference is None and plain.train_step(batch(ids))["kl_ref"] == 0.0


def test_a_checkpoint_round_trip_continues_exactly(world, tiny_vlm, tmp_path) -> None:
    path, ids = tiny_vlm
    cfg = {"lr_schedule": "cosine", "warmup_steps": 1, "decay_steps": 3, "weight_decay": 0.01}
    first = make_trainer(path, cfg)
    first.train_step(batch(ids, 1))
    state = LearnerState(version=1, steps=first.steps, admission={"accepted": 3}, seen_group_ids=["g1", "h1"])
    saved = first.save(str(tmp_path), 1, state, b"opaque-groups", keep=2)
    assert saved.name == "step_00000001" and list_checkpoints(tmp_path) == [saved]
    first.train_step(batch(ids, 2))
    expected = parameters(first)

    resumed = make_trainer(path, cfg)
    loaded, blob = resumed.load(resolve_checkpoint("latest", str(tmp_path)))
    assert loaded == state and blob == b"opaque-groups" and resumed.steps == 1
    resumed.train_step(batch(ids, 2))
    got = parameters(resumed)
    assert max((got[k] - expected[k]).abs().max().item() for k in got) == 0.0

    # keep=2 prunes the oldest; a partial directory never counts as a checkpoint
    for version in (2, 3):
        resumed.save(str(tmp_path), version, state, b"", keep=2)
    (tmp_path / ".step_00000004.tmp").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert resolve_checkpoint("latest", str(tmp_path)).name == "step_00000003"
    assert resolve_checkpoint(None, str(tmp_path)) is None
    assert resolve_checkpoint("latest", str(tmp_path / "empty")) is None
    with pytest.raises(CheckpointError, match="not a learner checkpoint"):
        resolve_checkpoint(str(tmp_path / ".step_00000004.tmp"), None)
