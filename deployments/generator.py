"""Generator deployment: a vLLM AsyncLLM engine with priority scheduling and prefix caching.

The request's class reaches vLLM as its priority (lower runs earlier), so generation is
ordered the way the Router orders everything else.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.replica import DOWNSTREAM_LOGGING, identity, max_ongoing_requests
from mneme.config import GeneratorConfig
from mneme.errors import ContextLengthExceeded, InvalidRequest, Unavailable
from mneme.records import Generation, GenerationDelta, GenerationRequest
from mneme.stats import Occupancy


@serve.deployment(
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=15,
    health_check_timeout_s=60,
    logging_config=DOWNSTREAM_LOGGING,
)
class Generator:
    """Chat generation through vLLM's own chat-template rendering; streams deltas on request."""

    def __init__(self, config: GeneratorConfig):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self._config = config
        path = config.resolved_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"generator.model_path {path!r} does not exist; run `make install` to generate "
                "the tiny default model, or point generator.model_path at a model folder"
            )
        executor = {}
        if current_platform.is_cpu() and config.cpu_executor == "uni":
            # vLLM's CPU backend swaps a "uni" executor for "mp" unless this is 0; the engine
            # core still runs in its own process (AsyncLLM), now with the model inside it
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            executor = {"distributed_executor_backend": "uni"}
        args = AsyncEngineArgs(
            model=path,
            tokenizer=path,
            served_model_name=config.served_model_name,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=None
            if config.kv_cache_mib is None
            else config.kv_cache_mib << 20,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            scheduling_policy="priority",
            dtype=config.dtype,
            seed=config.seed,
            disable_log_stats=True,
            **(executor | config.engine_kwargs),
        )
        self._engine = AsyncLLM.from_engine_args(args)
        self._max_model_len = self._engine.vllm_config.model_config.max_model_len
        self._requests = 0
        self._completion_tokens = 0
        self._occupancy = Occupancy()

    async def _render(self, messages: list[tuple[str, str]]):
        """The engine input of a conversation (chat template applied, tokenized)."""
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.params import ChatParams

        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            _, (engine_input,) = await self._engine.renderer.render_chat_async(
                [conversation], ChatParams(chat_template_kwargs={"add_generation_prompt": True})
            )
        except VLLMValidationError as exc:
            raise _invalid(exc) from None
        length = len(engine_input["prompt_token_ids"])
        if length >= self._max_model_len:  # the engine wants room for one output token
            raise ContextLengthExceeded(
                f"the prompt is {length} tokens; this model's context is "
                f"{self._max_model_len}, output included",
                param="messages",
            )
        return engine_input

    async def _prompt(self, request: GenerationRequest) -> tuple[Any, int | None]:
        """The engine input and how many of the context's memories it holds: the best-ranked
        that leave room for `max_tokens` of output (at most half the model's context)."""
        if request.context is None:
            return await self._render(request.conversation()), None
        room = self._max_model_len - min(request.max_tokens, self._max_model_len // 2)

        async def within_room(count: int):
            try:
                prompt = await self._render(request.conversation(count))
            except ContextLengthExceeded:
                return None
            return prompt if len(prompt["prompt_token_ids"]) <= room else None

        everything = len(request.context.memories)
        if (prompt := await within_room(everything)) is not None:
            return prompt, everything
        fitted, low, high = None, 0, everything - 1  # the most memories within room
        while low <= high:
            middle = (low + high) // 2
            if (candidate := await within_room(middle)) is not None:
                fitted, low = (candidate, middle), middle + 1
            else:
                high = middle - 1
        if fitted is None:  # no memory fits; the conversation alone may (or is a 400)
            return await self._render(request.conversation(0)), 0
        return fitted

    def _sampling(self, request: GenerationRequest):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop or None,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Yields text deltas; the last one carries the finish reason and token counts."""
        prompt, _ = await self._prompt(request)
        async for delta in self._deltas(request, prompt):
            yield delta

    async def _deltas(self, request: GenerationRequest, prompt) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            sampling = self._sampling(request)
        except VLLMValidationError as exc:
            raise _invalid(exc) from None
        completion_tokens = 0
        self._requests += 1
        self._occupancy.enter()
        try:
            async for output in self._engine.generate(
                prompt, sampling, request.request_id, priority=request.priority
            ):
                choice = output.outputs[0]
                completion_tokens += len(choice.token_ids)
                yield GenerationDelta(
                    text=choice.text,
                    finish_reason=choice.finish_reason,
                    prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=completion_tokens,
                )
        except VLLMValidationError as exc:
            raise _invalid(exc) from None
        except EngineDeadError:  # the health check restarts the replica
            raise Unavailable("the Generator's vLLM engine died", retry_after_s=5.0) from None
        finally:
            self._occupancy.exit()
            self._completion_tokens += completion_tokens

    async def generate(self, request: GenerationRequest) -> Generation:
        prompt, memories_used = await self._prompt(request)
        text, last = [], GenerationDelta("")
        async for delta in self._deltas(request, prompt):
            text.append(delta.text)
            last = delta
        return Generation(
            "".join(text),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            memories_used,
        )

    async def check_health(self) -> None:
        if self._engine.errored:
            raise RuntimeError("vLLM engine died")

    async def stats(self) -> dict:
        return {
            "model": self._config.served_model_name,
            "executor": self._engine.vllm_config.parallel_config.distributed_executor_backend,
            # the tokens its KV cache holds, as the engine sized it at start (vLLM's count)
            "kv_cache_tokens": self._engine.vllm_config.cache_config.kv_cache_size_tokens,
            "requests": self._requests,
            **self._occupancy.summary(),
            "completion_tokens": self._completion_tokens,
            "max_ongoing_requests": max_ongoing_requests(),
            **identity(),
        }

    def __del__(self):
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _invalid(exc) -> InvalidRequest:
    """vLLM's rejection of a request (a `VLLMValidationError`) as the 400 it is."""
    if exc.parameter == "input_tokens":
        return ContextLengthExceeded(str(exc), param="messages")
    return InvalidRequest(str(exc), param=exc.parameter)
