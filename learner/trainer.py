"""One FSDP2 rank's model, optimiser and training step: proximal (and reference) log-probs without grad, then the
policy loss (+ KL, − entropy) over micro-batches with gradient accumulation, gradient clipping, and an AdamW step at
the scheduled learning rate. The process group must already be initialised.

`objective="sft"` (the warm start, learner/sft.py) trains the same way on the negative log-likelihood of the loss
tokens instead: the same plan, collation, FSDP2 collectives, clipping and schedule, no proximal pass.

Every rank calls `train_step` with the *whole* batch; the deterministic plan (learner.packing.plan_step) gives each
rank its share and the same number of micro-batches, so the FSDP2 collectives line up.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from learner.checkpoint import LearnerState, load_checkpoint, save_checkpoint
from learner.config import AlgoConfig, LearnerConfig
from learner.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss
from learner.packing import Collator, MicroBatch, Sample, plan_step

log = logging.getLogger(__name__)

METRIC_KEYS = ("tokens", "clip_frac", "is_weight_mean", "is_weight_max", "masked_frac", "approx_kl")
OBJECTIVES = ("policy", "sft")


class BatchError(RuntimeError):
    """Some rank could not turn its share of the batch into model inputs; raised on every rank alike."""


def lr_factor(step: int, warmup_steps: int, schedule: str, decay_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based): linear warm-up over `warmup_steps` from
    1/warmup_steps to 1, then over `decay_steps` steps with p = min(1, (step − warmup_steps)/decay_steps) and
    m = min_lr_ratio:  constant 1;  linear 1 − (1 − m)·p;  cosine m + (1 − m)·½(1 + cos πp).  After the decay
    the factor stays at m."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, linear or cosine")


def load_model(model_path: str, dtype: torch.dtype = torch.float32,
               attn_implementation: Optional[str] = None) -> nn.Module:
    """An HF image-text-to-text model from a local folder (weights kept in fp32 for the optimiser)."""
    from transformers import AutoModelForImageTextToText

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype, **extra)


def shard_model(model: nn.Module, device_type: str, world_size: int, precision: str = "fp32") -> nn.Module:
    """FSDP2: one unit per transformer block (the classes HF lists in `_no_split_modules`: decoder layers and
    vision blocks), then the root, which holds embeddings, merger, norm and the (possibly tied) head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    kwargs: dict = {"mesh": mesh}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no blocks to shard (_no_split_modules={block_classes})")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def forward_logprobs(model: nn.Module, batch: MicroBatch, device: torch.device, dtype: torch.dtype,
                     entropy_grad: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(x_t | x_<t), entropy of π(· | x_<t)) per sample token, both [S, T] in the batch's sample layout.

    The logits at t − 1 score token t; position 0 of a row (no context) gets 0. The entropy carries a gradient
    only when `entropy_grad` (an entropy bonus is on); otherwise it is a metric. Logits are divided by
    `temperature` first, so that π matches the behaviour policy the engine sampled from."""
    logits = model(**batch.model_inputs(device, dtype), use_cache=False).logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, 1:].to(device)
    shifted = logits[:, :-1]
    picked = torch.gather(shifted, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.nn.functional.pad(picked - torch.logsumexp(shifted, dim=-1), (1, 0))
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = torch.nn.functional.pad(entropy_from_logits(shifted), (1, 0))
    index = batch.token_index.to(device)
    return logp.reshape(-1)[index], entropy.reshape(-1)[index]


def token_logprobs(model: nn.Module, batch: MicroBatch, device: torch.device, dtype: torch.dtype,
                   temperature: float = 1.0) -> torch.Tensor:
    """log π(x_t | x_<t) per sample token, [S, T] (see forward_logprobs)."""
    return forward_logprobs(model, batch, device, dtype, temperature=temperature)[0]


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, agg: str, total: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of the loss tokens, aggregated like the policy loss (`total` = the whole batch's
    denominator), with the policy loss's metric keys (the ratio metrics are 0: there is no ratio)."""
    if not torch.isfinite(torch.where(mask, logp.detach(), 0.0)).all():
        raise ValueError("non-finite log-probs on loss tokens")
    metrics = dict.fromkeys(METRIC_KEYS, 0.0)
    metrics["tokens"] = float(mask.sum())
    return aggregate(-logp, mask, agg, total), metrics


class Trainer:
    """Model + optimiser of one rank; `train_step(samples)` is a collective over the FSDP2 world."""

    def __init__(self, model_path: str, learner: LearnerConfig, algo: AlgoConfig,
                 device: Optional[torch.device] = None, objective: str = "policy") -> None:
        from transformers import AutoConfig, AutoImageProcessor

        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; expected one of {OBJECTIVES}")
        if objective == "sft" and (algo.needs_proximal or algo.needs_reference or algo.temperature != 1.0):
            raise ValueError("objective=sft needs an AlgoConfig without proximal pass, reference or temperature "
                             "(correction=bypass, kl_coef=0, temperature=1); see learner.sft.SftConfig.algo_config")
        self.learner, self.algo, self.objective = learner, algo, objective
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or torch.device("cpu")
        torch.manual_seed(learner.seed)
        config = AutoConfig.from_pretrained(model_path)
        self.vocab_size = int(config.get_text_config().vocab_size)
        self.image_token_id = int(config.image_token_id)
        pad = config.get_text_config().pad_token_id
        self.model = load_model(model_path, attn_implementation=learner.attn_implementation).to(self.device)
        shard_model(self.model, self.device.type, self.world_size, learner.precision)
        self.compute_dtype = torch.bfloat16 if learner.precision == "bf16" else torch.float32
        self.reference: Optional[nn.Module] = None
        if algo.needs_reference:
            self.reference = load_model(learner.ref_model_path or model_path,
                                        attn_implementation=learner.attn_implementation).to(self.device)
            self.reference.requires_grad_(False)
            shard_model(self.reference, self.device.type, self.world_size, learner.precision)
            self.reference.eval()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=learner.lr, betas=learner.adam_betas, weight_decay=learner.weight_decay
        )
        self.collator = Collator(AutoImageProcessor.from_pretrained(model_path), self.image_token_id,
                                 0 if pad is None else int(pad), rope_index=self._rope_index(),
                                 packed=learner.packing)
        self.steps = 0

    def _rope_index(self):
        inner = getattr(self.model, "model", None)
        rope_index = getattr(inner, "get_rope_index", None)
        if self.learner.packing and rope_index is None:
            raise ValueError(f"learner.packing=true needs a model with model.get_rope_index (Qwen2-VL family); "
                             f"{type(self.model).__name__} has none: set learner.packing=false")
        return rope_index

    def lr_at(self, step: int) -> float:
        cfg = self.learner
        return cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.lr_schedule, cfg.decay_steps, cfg.min_lr_ratio)

    def train_step(self, samples: Sequence[Sample]) -> dict[str, float]:
        """One optimiser step on the whole batch `samples` (this rank trains its share). Returns reduced metrics."""
        algo = self.algo
        plan = plan_step(samples, self.world_size, self.rank, self.learner.micro_batch_tokens, self.learner.packing)
        error: Optional[Exception] = None
        batches: list[MicroBatch] = []
        try:
            batches = [self.collator([samples[i] for i in indices]) for indices in plan.micro_batches]
        except ValueError as exc:  # e.g. ImageTokenMismatch on this rank's share
            error = exc
        # Agree before the first FSDP2 collective: a rank that cannot collate must not leave the others hanging.
        self._agree(error, "collate")
        self.model.train()
        prox: list[Optional[torch.Tensor]] = [None] * len(batches)
        ref: list[Optional[torch.Tensor]] = [None] * len(batches)
        with torch.no_grad():
            if algo.needs_proximal:
                prox = [token_logprobs(self.model, mb, self.device, self.compute_dtype, algo.temperature)
                        for mb in batches]
            if self.reference is not None:
                ref = [token_logprobs(self.reference, mb, self.device, self.compute_dtype, algo.temperature)
                       for mb in batches]

        denominator = max(1, plan.total_tokens if algo.agg == "token_mean" else plan.total_seqs)
        self.optimizer.zero_grad(set_to_none=True)
        # loss, tokens, clipped, is_weight, masked, approx_kl, kl, entropy, model_tokens
        sums = torch.zeros(9, dtype=torch.float64)
        weight_max = torch.zeros(1, dtype=torch.float64)
        for mb, prox_mb, ref_mb in zip(batches, prox, ref):
            logp, entropy = forward_logprobs(self.model, mb, self.device, self.compute_dtype,
                                             entropy_grad=algo.entropy_coef > 0, temperature=algo.temperature)
            mask = mb.loss_mask.to(self.device)
            kl_sum = entropy_sum = 0.0
            try:
                if self.objective == "sft":
                    loss, m = sft_loss(logp, mask, algo.agg, denominator)
                else:
                    loss, m = policy_loss(logp, prox_mb, mb.behav_logp.to(self.device),
                                          mb.advantages.to(self.device), mask, algo, total=denominator)
                if ref_mb is not None:
                    kl = kl_penalty(logp, ref_mb, algo.kl_kind, mask)
                    loss = loss + algo.kl_coef * aggregate(kl, mask, algo.agg, denominator)
                    kl_sum = float(kl.detach().sum())
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * aggregate(entropy, mask, algo.agg, denominator)
                entropy_sum = float(torch.where(mask, entropy.detach(), 0.0).sum())
            except ValueError as exc:  # non-finite log-probs: keep the collectives in step, fail after the loop
                error = error or exc
                loss, m = logp.sum() * 0.0, dict.fromkeys(METRIC_KEYS, 0.0)
            # FSDP2 averages gradients over ranks; each rank's loss is its share of one global mean, so scale back.
            (loss * self.world_size).backward()
            n = m["tokens"]
            sums += torch.tensor([float(loss.detach()), n, m["clip_frac"] * n, m["is_weight_mean"] * n,
                                  m["masked_frac"] * n, m["approx_kl"] * n, kl_sum, entropy_sum, mb.model_tokens],
                                 dtype=torch.float64)
            weight_max = torch.maximum(weight_max, torch.tensor([m["is_weight_max"]], dtype=torch.float64))

        try:
            self._agree(error, "compute the loss of")
        except BatchError:
            self.optimizer.zero_grad(set_to_none=True)  # drop the partial (possibly NaN) gradients
            raise
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.learner.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.lr_at(self.steps)
        # The norm is global (same on every rank), so all ranks agree on skipping a non-finite step.
        skipped = not math.isfinite(grad_norm)
        if skipped:
            log.error("non-finite gradient norm %s at step %d: skipping the optimiser step", grad_norm, self.steps)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.steps += 1

        sums, weight_max = sums.to(self.device), weight_max.to(self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(weight_max, op=dist.ReduceOp.MAX)
        loss_sum, tokens, clipped, weights, masked, approx, kl, entropy, model_tokens = sums.tolist()
        safe = max(tokens, 1.0)
        return {
            "loss": loss_sum,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped_nonfinite": float(skipped),
            "clip_frac": clipped / safe,
            "is_weight_mean": weights / safe,
            "is_weight_max": float(weight_max.item()),
            "masked_frac": masked / safe,
            "approx_kl": approx / safe,
            "kl_ref": kl / safe,
            "entropy": entropy / safe,
            "micro_batches": float(len(batches)),
            "loss_tokens": tokens,
            "model_tokens": model_tokens,
        }

    def grad_norm(self) -> float:
        """Global L2 norm of the current gradients (collective); after `train_step` these are the clipped ones."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ---------------------------------------------------------------------------------------- checkpoints
    def save(self, root: str, version: int, state: Optional[LearnerState], groups_blob: Optional[bytes],
             keep: int) -> Path:
        """Collective: model, optimiser and RNG of every rank, plus rank 0's `state` and groups (learner/checkpoint)."""
        return save_checkpoint(root, version, self.model, self.optimizer, state, groups_blob, keep)

    def load(self, path: str | Path) -> tuple[LearnerState, bytes]:
        """Collective: restore from a checkpoint directory; the step count (lr schedule) comes back too."""
        state, blob = load_checkpoint(path, self.model, self.optimizer)
        self.steps = state.steps
        return state, blob

    def _agree(self, error: Optional[Exception], what: str) -> None:
        """Raise BatchError on every rank if any rank failed (one all-reduce; a no-op collective when none did)."""
        failed = torch.tensor([float(error is not None)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            detail = f"{type(error).__name__}: {error}" if error else "failed on another rank"
            raise BatchError(f"rank {self.rank} could not {what} this batch: {detail}") from error
