"""HTTP protocol: request and response models of the ingress.

OpenAI-compatible where OpenAI has the endpoint; Mneme's own memory API otherwise. Structure
and types are checked by pydantic (strict: no "5" for 5); the configurable limits (text length,
items per call, top_k) by `check_limits`, which names the offending field.
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from mneme.config import DEFAULT_TOP_K, NAMESPACE_PATTERN, LimitsConfig, PriorityName
from mneme.errors import InvalidRequest

ID_PATTERN = NAMESPACE_PATTERN


def _has_lone_surrogates(value: str) -> bool:
    """True if `value` is not valid unicode: UTF-8 (and JSON output) cannot encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _encoding_problem(value: str) -> str | None:
    """Why `value` cannot be stored or tokenised as text, or None."""
    if "\x00" in value:
        return "text must not contain NUL characters"
    if _has_lone_surrogates(value):
        return "text must be valid unicode (no lone surrogates)"
    return None


# What a tokenizer drops (BERT's deletes control and format characters, splits on spaces):
# a text of only these embeds as an empty one, one vector for all of them.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _visible(value: str) -> bool:
    return any(unicodedata.category(ch) not in _INVISIBLE for ch in value)


def _clean_text(value: str) -> str:
    if not _visible(value):
        raise ValueError("text must not be empty (nor only spaces and invisible characters)")
    if problem := _encoding_problem(value):
        raise ValueError(problem)
    return value


Text = Annotated[str, AfterValidator(_clean_text)]
Namespace = Annotated[str, StringConstraints(pattern=NAMESPACE_PATTERN)]
MemoryId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # fields where JSON null means "the default", as OpenAI's API takes it (its Python client
    # sends null for an optional argument passed as None)
    null_means_default: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_meaning_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.null_means_default:
            return {
                k: v for k, v in data.items() if not (v is None and k in cls.null_means_default)
            }
        return data


class ResponseModel(BaseModel):
    pass


def _check_count(count: int, limit: int, noun: str, param: str) -> None:
    if count > limit:
        raise InvalidRequest(f"{count} {noun}; the limit is {limit}", param=param)


def _check_text(text: str, param: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_text_chars:
        raise InvalidRequest(
            f"text is {len(text)} characters; the limit is {limits.max_text_chars}", param=param
        )


def check_memory_id(memory_id: str) -> None:
    """A memory id in a path (GET or DELETE /v1/memories/{id}): one an add could have made."""
    if re.fullmatch(ID_PATTERN, memory_id) is None:
        raise InvalidRequest(f"a memory id must match {ID_PATTERN}", param="id")


def _check_top_k(top_k: int, param: str, limits: LimitsConfig) -> None:
    if not 1 <= top_k <= limits.max_top_k:
        raise InvalidRequest(f"top_k must be in [1, {limits.max_top_k}]", param=param)


MAX_METADATA_DEPTH = 32
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
SEED_RANGE = (-(2**63), 2**63 - 1)


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    """Why `metadata` (or a filter) could be stored but not returned as JSON, or None."""
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            return f"metadata must not nest deeper than {MAX_METADATA_DEPTH} levels"
        if isinstance(value, dict):
            stack += [(key, depth) for key in value] + [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
        elif isinstance(value, float) and not math.isfinite(value):
            return "metadata must not hold NaN or Infinity (JSON has neither)"
        elif isinstance(value, str) and _has_lone_surrogates(value):
            return "metadata strings must be valid unicode (no lone surrogates)"
    return None


def _check_metadata(metadata: dict[str, Any], param: str, limits: LimitsConfig) -> None:
    if problem := _metadata_problem(metadata):
        raise InvalidRequest(problem, param=param)
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise InvalidRequest(
            f"metadata is {size} bytes as JSON; the limit is {limits.max_metadata_bytes}",
            param=param,
        )


# ---------------------------------------------------------------- memory API


class MemoryItem(ApiModel):
    text: Text
    id: MemoryId | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class AddMemoriesRequest(ApiModel):
    namespace: Namespace
    items: list[MemoryItem] = Field(min_length=1)
    priority: PriorityName | None = None

    def check_limits(self, limits: LimitsConfig) -> None:
        _check_count(len(self.items), limits.max_items_per_request, "items", "items")
        seen: set[str] = set()
        for i, item in enumerate(self.items):
            _check_text(item.text, f"items[{i}].text", limits)
            _check_metadata(item.metadata, f"items[{i}].metadata", limits)
            if item.id is not None:
                if item.id in seen:
                    raise InvalidRequest(
                        f"id {item.id!r} appears twice in one request", param=f"items[{i}].id"
                    )
                seen.add(item.id)


class AddMemoriesResponse(ResponseModel):
    ids: list[str]


class SearchRequest(ApiModel):
    namespace: Namespace
    query: Text
    top_k: int = DEFAULT_TOP_K
    filter: dict[str, Any] | None = None
    priority: PriorityName | None = None

    def check_limits(self, limits: LimitsConfig) -> None:
        _check_text(self.query, "query", limits)
        _check_top_k(self.top_k, "top_k", limits)
        if self.filter is not None:
            _check_metadata(self.filter, "filter", limits)


class Hit(ResponseModel):
    id: str
    text: str
    score: float
    metadata: dict[str, Any]


class SearchResponse(ResponseModel):
    hits: list[Hit]


class Memory(ResponseModel):
    id: str
    namespace: str
    text: str
    metadata: dict[str, Any]


class MemoryList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Memory]
    next_cursor: str | None


class DeleteResponse(ResponseModel):
    id: str
    deleted: bool


class AnswerRequest(ApiModel):
    namespace: Namespace
    query: Text
    top_k: int = DEFAULT_TOP_K
    max_tokens: int | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    filter: dict[str, Any] | None = None
    priority: PriorityName | None = None

    def check_limits(self, limits: LimitsConfig) -> None:
        _check_text(self.query, "query", limits)
        _check_top_k(self.top_k, "top_k", limits)
        _check_max_tokens(self.max_tokens, "max_tokens", limits)
        if self.filter is not None:
            _check_metadata(self.filter, "filter", limits)


class AnswerResponse(ResponseModel):
    answer: str
    memories: list[Hit]
    model: str


def _check_max_tokens(value: int | None, param: str, limits: LimitsConfig) -> None:
    if value is not None and not 1 <= value <= limits.max_tokens:
        raise InvalidRequest(f"{param} must be in [1, {limits.max_tokens}]", param=param)


class PrewarmRequest(ApiModel):
    texts: list[Text] = Field(min_length=1)

    def check_limits(self, limits: LimitsConfig) -> None:
        _check_count(len(self.texts), limits.max_items_per_request, "texts", "texts")
        for i, text in enumerate(self.texts):
            _check_text(text, f"texts[{i}]", limits)


class PrewarmResponse(ResponseModel):
    texts: int
    already_cached: int | None  # null for a key held to some namespaces (see RequestContext)
    computed: int | None


# ---------------------------------------------------------------- OpenAI: embeddings


class EmbeddingRequest(ApiModel):
    null_means_default = frozenset({"encoding_format"})
    input: Text | list[Text]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    priority: PriorityName | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check_limits(self, limits: LimitsConfig) -> None:
        texts = self.texts()
        if not texts:
            raise InvalidRequest("input must not be empty", param="input")
        _check_count(len(texts), limits.max_items_per_request, "inputs", "input")
        for i, text in enumerate(texts):
            _check_text(text, "input" if isinstance(self.input, str) else f"input[{i}]", limits)


class EmbeddingData(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------- OpenAI: chat completions


class TextPart(ApiModel):
    type: Literal["text"]
    text: str


class ChatMessage(ApiModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(ApiModel):
    include_usage: bool = False


class MemoryOptions(ApiModel):
    """Mneme's extension: retrieve from `namespace` and give the memories to the model."""

    namespace: Namespace
    top_k: int = DEFAULT_TOP_K
    filter: dict[str, Any] | None = None


class ChatCompletionRequest(ApiModel):
    null_means_default = frozenset(
        {"temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty"}
    )
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    priority: PriorityName | None = None
    memory: MemoryOptions | None = None

    def check_limits(self, limits: LimitsConfig) -> None:
        _check_count(len(self.messages), limits.max_messages, "messages", "messages")
        for i, message in enumerate(self.messages):
            text = message.text()
            if problem := _encoding_problem(text):
                raise InvalidRequest(problem, param=f"messages[{i}].content")
            _check_text(text, f"messages[{i}].content", limits)
        _check_max_tokens(self.max_tokens, "max_tokens", limits)
        _check_max_tokens(self.max_completion_tokens, "max_completion_tokens", limits)
        if self.memory is not None:
            _check_top_k(self.memory.top_k, "memory.top_k", limits)
            if self.memory.filter is not None:
                _check_metadata(self.memory.filter, "memory.filter", limits)
        self._check_stop(limits)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequest("seed must be a 64-bit signed integer", param="seed")

    def _check_stop(self, limits: LimitsConfig) -> None:
        if self.stop is None or isinstance(self.stop, str):
            stops = {"stop": self.stop} if self.stop is not None else {}
        else:
            _check_count(len(self.stop), MAX_STOP_SEQUENCES, "stop sequences", "stop")
            stops = {f"stop[{i}]": text for i, text in enumerate(self.stop)}
        for param, text in stops.items():
            if not text:
                raise InvalidRequest("a stop sequence must not be empty", param=param)
            if problem := _encoding_problem(text):
                raise InvalidRequest(problem, param=param)
            _check_text(text, param, limits)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str | None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "mneme"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
