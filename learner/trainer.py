"""One FSDP2 rank's model, optimiser and training step: proximal log-probs without grad, then the policy loss
over micro-batches, gradient clipping and an AdamW step. The process group must already be initialised.

Every rank calls `train_step` with the *whole* batch; the deterministic plan (learner.batch.plan_step) gives each
rank its share and the same number of micro-batches, so the FSDP2 collectives line up.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from learner.batch import Collator, MicroBatch, Sample, plan_step
from learner.config import AlgoConfig, LearnerConfig
from learner.losses import policy_loss

log = logging.getLogger(__name__)


class BatchError(RuntimeError):
    """Some rank could not turn its share of the batch into model inputs; raised on every rank alike."""


def load_model(model_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF image-text-to-text model from a local folder (weights kept in fp32 for the optimiser)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)


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


def token_logprobs(model: nn.Module, batch: MicroBatch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """log π(x_t | x_<t) at every position t ≥ 1 from the logits at t − 1; position 0 (no context) is 0. [B, T]"""
    logits = model(**batch.model_inputs(device, dtype), use_cache=False).logits.float()
    targets = batch.input_ids[:, 1:].to(device)
    picked = torch.gather(logits[:, :-1], -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits[:, :-1], dim=-1)
    return torch.nn.functional.pad(logp, (1, 0))


class Trainer:
    """Model + optimiser of one rank; `train_step(samples)` is a collective over the FSDP2 world."""

    def __init__(self, model_path: str, learner: LearnerConfig, algo: AlgoConfig,
                 device: Optional[torch.device] = None) -> None:
        from transformers import AutoConfig, AutoImageProcessor

        self.learner, self.algo = learner, algo
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or torch.device("cpu")
        torch.manual_seed(learner.seed)
        config = AutoConfig.from_pretrained(model_path)
        self.vocab_size = int(config.get_text_config().vocab_size)
        self.image_token_id = int(config.image_token_id)
        pad = config.get_text_config().pad_token_id
        self.model = load_model(model_path).to(self.device)
        shard_model(self.model, self.device.type, self.world_size, learner.precision)
        self.compute_dtype = torch.bfloat16 if learner.precision == "bf16" else torch.float32
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=learner.lr, betas=learner.adam_betas, weight_decay=learner.weight_decay
        )
        warmup = learner.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        self.collator = Collator(AutoImageProcessor.from_pretrained(model_path), self.image_token_id,
                                 0 if pad is None else int(pad))
        self.steps = 0

    def train_step(self, samples: Sequence[Sample]) -> dict[str, float]:
        """One optimiser step on the whole batch `samples` (this rank trains its share). Returns reduced metrics."""
        plan = plan_step(samples, self.world_size, self.rank, self.learner.micro_batch_tokens)
        error: Optional[Exception] = None
        try:
            batches = [self.collator([samples[i] for i in indices]) for indices in plan.micro_batches]
        except ValueError as exc:  # e.g. ImageTokenMismatch on this rank's share
            error = exc
        # Agree before the first FSDP2 collective: a rank that cannot collate must not leave the others hanging.
        self._agree(error, "collate")
        self.model.train()
        prox: list[Optional[torch.Tensor]] = [None] * len(batches)
        if self.algo.needs_proximal:
            with torch.no_grad():
                prox = [token_logprobs(self.model, mb, self.device, self.compute_dtype) for mb in batches]

        denominator = max(1, plan.total_tokens if self.algo.agg == "token_mean" else plan.total_seqs)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(6, dtype=torch.float64)  # loss, tokens, clipped, is_weight, masked, kl
        weight_max = torch.zeros(1, dtype=torch.float64)
        for mb, prox_mb in zip(batches, prox):
            logp = token_logprobs(self.model, mb, self.device, self.compute_dtype)
            try:
                loss, m = policy_loss(
                    logp, prox_mb, mb.behav_logp.to(self.device), mb.advantages.to(self.device),
                    mb.loss_mask.to(self.device), self.algo, total=denominator,
                )
            except ValueError as exc:  # non-finite log-probs: keep the collectives in step, fail after the loop
                error = error or exc
                loss, m = logp.sum() * 0.0, dict.fromkeys(("tokens", "clip_frac", "is_weight_mean",
                                                           "is_weight_max", "masked_frac", "approx_kl"), 0.0)
            # FSDP2 averages gradients over ranks; each rank's loss is its share of one global mean, so scale back.
            (loss * self.world_size).backward()
            n = m["tokens"]
            sums += torch.tensor([float(loss.detach()), n, m["clip_frac"] * n, m["is_weight_mean"] * n,
                                  m["masked_frac"] * n, m["approx_kl"] * n], dtype=torch.float64)
            weight_max = torch.maximum(weight_max, torch.tensor([m["is_weight_max"]], dtype=torch.float64))

        try:
            self._agree(error, "compute the loss of")
        except BatchError:
            self.optimizer.zero_grad(set_to_none=True)  # drop the partial (possibly NaN) gradients
            raise
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.learner.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        # The norm is global (same on every rank), so all ranks agree on skipping a non-finite step.
        skipped = not math.isfinite(grad_norm)
        if skipped:
            log.error("non-finite gradient norm %s at step %d: skipping the optimiser step", grad_norm, self.steps)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.steps += 1

        sums, weight_max = sums.to(self.device), weight_max.to(self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(weight_max, op=dist.ReduceOp.MAX)
        loss_sum, tokens, clipped, weights, masked, kl = sums.tolist()
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
            "approx_kl": kl / safe,
            "micro_batches": float(len(batches)),
            "loss_tokens": tokens,
        }

    def _agree(self, error: Optional[Exception], what: str) -> None:
        """Raise BatchError on every rank if any rank failed (one all-reduce; a no-op collective when none did)."""
        failed = torch.tensor([float(error is not None)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            detail = f"{type(error).__name__}: {error}" if error else "failed on another rank"
            raise BatchError(f"rank {self.rank} could not {what} this batch: {detail}") from error
