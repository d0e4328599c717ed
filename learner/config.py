"""Typed learner configuration: `LearnerConfig` (conf/learner/*) and `AlgoConfig` (conf/algo/*), built from plain dicts.

Every field has a sane default and is validated on construction; unknown keys are rejected so a typo in conf/
fails loudly instead of silently using a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TypeVar

CORRECTIONS = ("decoupled", "decoupled_mis", "bypass", "naive")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
KL_KINDS = ("low_var_kl", "kl", "mse", "abs")
STALE_POLICIES = ("drop_counted", "train", "error")
BACKENDS = ("gloo", "nccl")
PRECISIONS = ("fp32", "bf16")
PUBLISH_DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
WEIGHT_TRANSPORTS = ("zmq", "fs", "nccl")

C = TypeVar("C")


def _from_dict(cls: type[C], values: Mapping[str, Any] | None) -> C:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)


@dataclass(frozen=True)
class AlgoConfig:
    """GRPO + off-policy correction knobs. Field names of the loss part are what `losses.policy_loss` reads."""

    name: str = "grpo"  # conf/algo/<name>.yaml; the supervised warm start (algo=sft) is learner.sft.SftConfig
    group_size: int = 4
    groups_per_step: int = 2
    max_staleness: int = 1
    stale_policy: str = "drop_counted"
    # loss
    correction: str = "decoupled"
    clip_low: float = 0.2
    clip_high: float = 0.28
    is_cap: float = 2.0
    mis_low: float = 0.5
    mis_high: float = 2.0
    dual_clip: Optional[float] = None
    agg: str = "token_mean"
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0
    # advantages
    eps: float = 1e-6
    temperature: float = 1.0  # logits are divided by this before log-probs; must equal the actors' sampling temperature
    std_normalize: bool = True

    def __post_init__(self) -> None:
        if self.name != "grpo":
            raise ValueError(f"algo.name={self.name!r}: the RL learner runs algo=grpo (algo=sft is learner.sft)")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"algo.correction={self.correction!r}; expected one of {CORRECTIONS}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"algo.agg={self.agg!r}; expected one of {AGGREGATIONS}")
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"algo.kl_kind={self.kl_kind!r}; expected one of {KL_KINDS}")
        if self.stale_policy not in STALE_POLICIES:
            raise ValueError(f"algo.stale_policy={self.stale_policy!r}; expected one of {STALE_POLICIES}")
        if self.group_size < 1 or self.groups_per_step < 1 or self.max_staleness < 0:
            raise ValueError(
                f"need group_size>=1, groups_per_step>=1, max_staleness>=0; got {self.group_size}, "
                f"{self.groups_per_step}, {self.max_staleness}"
            )
        if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
            raise ValueError(f"need 0<=clip_low<1 and clip_high>=0; got {self.clip_low}, {self.clip_high}")
        if self.is_cap <= 0.0:
            raise ValueError(f"algo.is_cap must be > 0, got {self.is_cap}")
        if not 0.0 <= self.mis_low < self.mis_high:
            raise ValueError(f"need 0<=mis_low<mis_high; got {self.mis_low}, {self.mis_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algo.dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        if self.kl_coef < 0.0 or self.entropy_coef < 0.0:
            raise ValueError(f"need kl_coef>=0 and entropy_coef>=0; got {self.kl_coef}, {self.entropy_coef}")
        if self.temperature <= 0.0:
            raise ValueError(f"algo.temperature must be > 0, got {self.temperature}")
        if self.eps <= 0.0:
            raise ValueError(f"algo.eps must be > 0, got {self.eps}")

    @property
    def needs_proximal(self) -> bool:
        """Whether the loss reads proximal log-probs (a no-grad forward at the start of each step)."""
        return self.correction != "bypass"

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model is loaded for the KL term."""
        return self.kl_coef > 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "AlgoConfig":
        return _from_dict(cls, values)


@dataclass(frozen=True)
class LearnerConfig:
    """FSDP2 world, optimiser, batching, weight transport and checkpoint knobs of the learner ranks."""

    world_size: int = 2
    # optimiser and schedule
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    decay_steps: int = 1000
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    # batching
    micro_batch_tokens: int = 4096
    packing: bool = False
    attn_implementation: Optional[str] = None
    # weights out
    weight_transport: str = "zmq"
    weight_bucket_mb: float = 64.0
    publish_dtype: str = "float32"
    weight_dir: Optional[str] = None
    weight_keep_versions: int = 2
    nccl_master_port: int = 0
    nccl_engine_ranks: int = 1
    # checkpoints
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    resume_from: Optional[str] = None
    journal: bool = True  # with checkpoint_dir: every acked group on disk until a checkpoint holds it (crash-safe)
    ledger: Optional[str] = None  # rank 0's group ledger file (JSON lines, protocol/ledger.py); None = none
    ref_model_path: Optional[str] = None
    # processes
    threads: int = 1
    backend: str = "gloo"
    precision: str = "fp32"
    seed: int = 0
    take_timeout_s: float = 1.0
    collective_timeout_s: float = 1800.0
    bind_host: str = "127.0.0.1"
    token_env: Optional[str] = None  # environment variable holding the endpoints' shared token (never the token)
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.threads < 1:
            raise ValueError(f"need world_size>=1 and threads>=1; got {self.world_size}, {self.threads}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(
                f"need lr>0, warmup_steps>=0, weight_decay>=0, grad_clip>0; got {self.lr}, {self.warmup_steps}, "
                f"{self.weight_decay}, {self.grad_clip}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"learner.lr_schedule={self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if self.decay_steps < 1 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"need decay_steps>=1 and 0<=min_lr_ratio<=1; got {self.decay_steps}, "
                             f"{self.min_lr_ratio}")
        if self.micro_batch_tokens < 1 or self.weight_bucket_mb <= 0:
            raise ValueError(
                f"need micro_batch_tokens>=1, weight_bucket_mb>0; got {self.micro_batch_tokens}, "
                f"{self.weight_bucket_mb}"
            )
        if self.weight_transport not in WEIGHT_TRANSPORTS:
            raise ValueError(f"learner.weight_transport={self.weight_transport!r}; expected one of "
                             f"{WEIGHT_TRANSPORTS}")
        if self.weight_transport == "fs" and not self.weight_dir:
            raise ValueError("learner.weight_transport=fs needs learner.weight_dir (a directory every actor can read)")
        if self.weight_keep_versions < 1 or self.nccl_engine_ranks < 1 or not 0 <= self.nccl_master_port < 65536:
            raise ValueError(f"need weight_keep_versions>=1, nccl_engine_ranks>=1, 0<=nccl_master_port<65536; got "
                             f"{self.weight_keep_versions}, {self.nccl_engine_ranks}, {self.nccl_master_port}")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ValueError(f"need checkpoint_every>=0 and checkpoint_keep>=1; got {self.checkpoint_every}, "
                             f"{self.checkpoint_keep}")
        if not self.checkpoint_dir and (self.checkpoint_every > 0 or self.resume_from == "latest"):
            raise ValueError(f"checkpoint_every={self.checkpoint_every} / resume_from={self.resume_from!r} need "
                             f"learner.checkpoint_dir")
        if self.backend not in BACKENDS:
            raise ValueError(f"learner.backend={self.backend!r}; expected one of {BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"learner.precision={self.precision!r}; expected one of {PRECISIONS}")
        if self.publish_dtype not in PUBLISH_DTYPES:
            raise ValueError(f"learner.publish_dtype={self.publish_dtype!r}; expected one of {PUBLISH_DTYPES}")
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LearnerConfig":
        return _from_dict(cls, values)
