"""The xAI API subset the official ``xai-sdk`` client needs: Tokenize, Models, Chat and
Sample, on the same server as the project's own protocol.

Wire facts (field numbers, presence, streaming rules) are in shared/XAI-API.md; the
behaviour that matters to the client:

- every chat output and every streamed chunk carries ``role = ROLE_ASSISTANT`` (the
  client ignores outputs without it), the final chunk of a choice carries its
  ``finish_reason``, and every chunk carries the cumulative ``usage``;
- ``stop``: the returned text ends *before* the first stop string (OpenAI/xAI
  semantics; the Sampler API instead yields the token that completes it). While
  streaming, text that could be the start of a stop string is held back until it is
  known not to be;
- unset ``optional`` fields take defaults (temperature 1, top_p 1, n 1, max_tokens up
  to the context), a set one is checked and an out-of-range value is INVALID_ARGUMENT
  naming the field; features the engine does not have (penalties, tools, structured
  output, images) are INVALID_ARGUMENT rather than silently ignored.

Logprobs: ``logprob`` of a sampled token is its log-probability under the model's
unfiltered distribution; the ``top_logprobs`` alternatives are the log of their
probabilities in the final sampling distribution (after temperature and top_p), the
only ones the engine reports. With temperature 1 and top_p 1 the two coincide.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

import grpc

from .. import _engine, _proto
from ..stub import Finished, SampleRequest
from ..token import Token
from .scope import RequestScope, RpcFailure, invalid

xai = _proto.xai

ROLE_ASSISTANT = xai.MessageRole.Value("ROLE_ASSISTANT")
REASON_STOP = xai.FinishReason.Value("REASON_STOP")
REASON_MAX_LEN = xai.FinishReason.Value("REASON_MAX_LEN")
REASON_MAX_CONTEXT = xai.FinishReason.Value("REASON_MAX_CONTEXT")
TEXT_MODALITY = xai.Modality.Value("TEXT")

_ROLE_NAMES = {
    xai.MessageRole.Value("ROLE_USER"): "user",
    xai.MessageRole.Value("ROLE_ASSISTANT"): "assistant",
    xai.MessageRole.Value("ROLE_SYSTEM"): "system",
    # Chat templates of open models know system/user/assistant (and sometimes tool);
    # a developer message is a system message to them.
    xai.MessageRole.Value("ROLE_DEVELOPER"): "system",
    xai.MessageRole.Value("ROLE_TOOL"): "tool",
    xai.MessageRole.Value("ROLE_FUNCTION"): "tool",
}

MAX_CHOICES = 8
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 8
_MAX_SEED = 2**64 - 1


def _fingerprint() -> str:
    from .. import __version__

    return f"sampler-sdk-{__version__}"


# -- stop strings, OpenAI style ------------------------------------------------------


class StopTrimmer:
    """Assembles streamed text that must end before the first stop string.

    ``feed`` takes one token's text and returns what can be shown now: everything but a
    suffix that could still grow into a stop string. The first token that completes a
    stop string ends the text (generation stops at that token too); the cut is at the
    earliest start among the stop strings present then, and nothing after it is ever
    returned.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.cut: Optional[int] = None

    def _held_back(self) -> int:
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self.emitted), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def feed(self, piece: str) -> str:
        if self.cut is not None:
            return ""
        self.text += piece
        # Nothing shown so far can be part of a match: every suffix that could start
        # one was held back.
        found = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if found:
            self.cut = min(found)
            out, self.emitted = self.text[self.emitted : self.cut], self.cut
            return out
        end = len(self.text) - self._held_back()
        out, self.emitted = self.text[self.emitted : end], end
        return out

    def finish(self) -> str:
        if self.cut is not None:
            return ""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out

    @property
    def stopped(self) -> bool:
        return self.cut is not None


# -- chat templates ------------------------------------------------------------------


class ChatTemplates:
    """Renders a model's ``tokenizer.chat_template`` (GGUF metadata) with Jinja2.

    The environment is sandboxed and immutable, as Hugging Face renders these templates:
    a template comes from a model file, which is untrusted input.
    """

    def __init__(self) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False: json.dumps(
            value, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = self._raise
        env.globals["strftime_now"] = lambda fmt: __import__("time").strftime(fmt)
        self._env = env
        self._compiled: Dict[str, Any] = {}

    @staticmethod
    def _raise(message: str) -> None:
        raise ValueError(f"messages: the model's chat template refused them: {message}")

    def _template(self, model: Any) -> Any:
        path = str(model.engine.path)
        if path not in self._compiled:
            from .. import inspect_gguf

            source = inspect_gguf(path)["metadata"].get("tokenizer.chat_template")
            if not isinstance(source, str) or not source.strip():
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {model.name!r} has no chat template (tokenizer.chat_template) in its "
                    "GGUF metadata; use the Sample service for raw-text sampling",
                )
            from jinja2 import TemplateError

            try:
                self._compiled[path] = self._env.from_string(source)
            except TemplateError as exc:
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {model.name!r}: its chat template does not compile: {exc}",
                ) from None
        return self._compiled[path]

    def render(self, model: Any, messages: List[Dict[str, str]]) -> str:
        from jinja2 import TemplateError

        template = self._template(model)
        engine = model.engine

        def special(token_id: Optional[int]) -> str:
            if token_id is None:
                return ""
            return engine.token_bytes(token_id, render_special=True).decode(
                "utf-8", errors="replace"
            )

        try:
            return template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=special(engine.bos_id),
                eos_token=special(engine.eos_id),
                tools=None,
            )
        except TemplateError as exc:
            raise invalid(f"messages: the model's chat template failed on them: {exc}") from None


# -- request validation --------------------------------------------------------------


@dataclass
class SamplingPlan:
    """One request turned into engine requests, one per choice."""

    model: Any
    prompt_tokens: int
    choices: List[SampleRequest]
    stops: List[str]
    logprobs: bool
    top_logprobs: int
    response_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def _check_unsupported_penalty(request: Any, name: str) -> None:
    if request.HasField(name) and getattr(request, name) != 0:
        raise invalid(f"{name}: not supported by this server (only 0 or unset)")


def _sampling_settings(request: Any, context_length: int) -> Dict[str, Any]:
    """temperature, top_p, max_tokens, n, seed, stop, logprobs of a chat or sample request."""
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not (0 <= temperature <= 2):
        raise invalid(f"temperature: must be in [0, 2], got {temperature:g}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):
        raise invalid(f"top_p: must be in (0, 1], got {top_p:g}")
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if max_tokens < 1:
            raise invalid(f"max_tokens: must be at least 1, got {max_tokens}")
    else:
        max_tokens = context_length
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= MAX_CHOICES:
        raise invalid(f"n: must be in [1, {MAX_CHOICES}], got {n}")
    stops = list(request.stop)
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if not s:
            raise invalid(f"stop[{i}]: must not be empty")
    top_logprobs = request.top_logprobs if request.HasField("top_logprobs") else 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
    if top_logprobs and not request.logprobs:
        raise invalid("top_logprobs: requires logprobs to be true")
    for name in ("frequency_penalty", "presence_penalty"):
        _check_unsupported_penalty(request, name)
    seed = (
        (request.seed & _MAX_SEED)
        if request.HasField("seed")
        else random.SystemRandom().randrange(0, _MAX_SEED)
    )
    return dict(
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        n=n,
        stops=stops,
        seed=seed,
        logprobs=bool(request.logprobs),
        top_logprobs=top_logprobs,
    )


def _choice_seed(seed: int, index: int) -> int:
    # Choice 0 uses the seed as given, so n=1 and the first of n=k agree.
    return seed if index == 0 else _engine.derive_call_seed(seed, index)


def _finish_reason(finished: Optional[Finished], trimmer: StopTrimmer) -> int:
    if trimmer.stopped or finished is None:
        return REASON_STOP
    return {
        "max_len": REASON_MAX_LEN,
        "context_full": REASON_MAX_CONTEXT,
    }.get(finished.stop_reason, REASON_STOP)


def _log_prob(token: Token, top_n: int) -> Any:
    logprob = token.logprob if token.logprob is not None else _safe_log(token.prob)
    entry = xai.LogProb(token=token.token_str, logprob=logprob, bytes=token.token_bytes)
    for alt in token.top_k[:top_n]:
        entry.top_logprobs.add(
            token=alt.token_str, logprob=_safe_log(alt.prob), bytes=alt.token_bytes
        )
    return entry


def _safe_log(p: float) -> float:
    return math.log(p) if p > 0 else -1e30


@dataclass
class ChoiceEvent:
    text: str
    logprobs: List[Any]
    finish_reason: Optional[int] = None


# -- the services --------------------------------------------------------------------


class XaiCompat:
    """Shared machinery of the four xAI services, over a ``LocalStub``."""

    def __init__(self, stub: Any):
        self.stub = stub
        self.templates = ChatTemplates()

    def resolve_model(self, name: str) -> Any:
        try:
            return self.stub.model(name)
        except ValueError as exc:
            raise RpcFailure(
                grpc.StatusCode.NOT_FOUND, str(exc).replace("model_name: ", "model: ", 1)
            ) from None

    def _check_prompt(self, model: Any, ids: List[int], where: str) -> None:
        context = model.engine.n_ctx_train
        if len(ids) >= context:
            raise invalid(
                f"{where}: the prompt is {len(ids)} tokens, which leaves no room in the "
                f"model's context of {context} tokens"
            )

    def plan(self, model: Any, prompts: List[List[int]], settings: Dict[str, Any]) -> SamplingPlan:
        choices: List[SampleRequest] = []
        for prompt in prompts:
            for _ in range(settings["n"]):
                choices.append(
                    SampleRequest(
                        inputs=(prompt,),
                        model_name=model.name,
                        max_len=settings["max_tokens"],
                        temperature=settings["temperature"],
                        nucleus_p=settings["top_p"],
                        stop_strings=tuple(settings["stops"]),
                        rng_seed=_choice_seed(settings["seed"], len(choices)),
                    )
                )
        return SamplingPlan(
            model=model,
            prompt_tokens=sum(len(p) for p in prompts),
            choices=choices,
            stops=settings["stops"],
            logprobs=settings["logprobs"],
            top_logprobs=settings["top_logprobs"],
        )

    async def run_choice(
        self, plan: SamplingPlan, index: int, scope: RequestScope
    ) -> AsyncIterator[ChoiceEvent]:
        """One choice's visible text, as it becomes known, then its finish."""
        async with scope.slot():
            call = self.stub.sample(plan.choices[index])
            trimmer = StopTrimmer(plan.stops)
            pending: List[Any] = []
            finished: Optional[Finished] = None
            try:
                async for event in call:
                    if isinstance(event, Token):
                        if trimmer.stopped:
                            continue  # the engine stops at this same token
                        scope.charge(1)
                        start = len(trimmer.text)
                        visible = trimmer.feed(event.token_str)
                        if plan.logprobs and (trimmer.cut is None or start < trimmer.cut):
                            pending.append(_log_prob(event, plan.top_logprobs))
                        if visible:
                            yield ChoiceEvent(visible, pending)
                            pending = []
                    elif isinstance(event, Finished):
                        finished = event
            finally:
                if finished is None:
                    call.cancel()
        yield ChoiceEvent(trimmer.finish(), pending, _finish_reason(finished, trimmer))

    async def events(
        self, plan: SamplingPlan, scope: RequestScope
    ) -> AsyncIterator[Tuple[int, ChoiceEvent]]:
        """The events of all choices, interleaved as they happen."""
        scope.model = plan.model.name
        scope.prompt_tokens = plan.prompt_tokens
        scope.check_budget()
        if len(plan.choices) == 1:
            async for event in self.run_choice(plan, 0, scope):
                yield 0, event
            return
        queue: "asyncio.Queue[Tuple[int, Optional[ChoiceEvent], Optional[BaseException]]]" = (
            asyncio.Queue()
        )

        async def pump(index: int) -> None:
            try:
                async for event in self.run_choice(plan, index, scope):
                    queue.put_nowait((index, event, None))
                queue.put_nowait((index, None, None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the consumer, which raises it
                queue.put_nowait((index, None, exc))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(plan.choices))]
        try:
            running = len(tasks)
            while running:
                index, event, error = await queue.get()
                if error is not None:
                    raise error
                if event is None:
                    running -= 1
                    continue
                yield index, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self, plan: SamplingPlan, scope: RequestScope) -> Any:
        return xai.SamplingUsage(
            prompt_tokens=plan.prompt_tokens,
            prompt_text_tokens=plan.prompt_tokens,
            completion_tokens=scope.sampled_tokens,
            total_tokens=plan.prompt_tokens + scope.sampled_tokens,
        )


class ChatService:
    """``xai_api.Chat``: GetCompletion and GetCompletionChunk."""

    def __init__(self, compat: XaiCompat):
        self._compat = compat

    async def _plan(self, request: Any) -> SamplingPlan:
        compat = self._compat
        model = compat.resolve_model(request.model)
        if not request.messages:
            raise invalid("messages: at least one message is needed")
        if len(request.tools):
            raise invalid("tools: function calling is not supported by this server")
        if request.HasField("tool_choice"):
            raise invalid("tool_choice: function calling is not supported by this server")
        if request.HasField("response_format"):
            raise invalid("response_format: structured output is not supported by this server")
        messages = []
        for i, message in enumerate(request.messages):
            role = _ROLE_NAMES.get(message.role)
            if role is None:
                raise invalid(f"messages[{i}].role: unknown role {message.role}")
            parts = []
            for j, content in enumerate(message.content):
                kind = content.WhichOneof("content")
                if kind == "text":
                    parts.append(content.text)
                elif kind is not None:
                    raise invalid(
                        f"messages[{i}].content[{j}]: model {model.name!r} is text-only and cannot take {kind}"
                    )
            entry = {"role": role, "content": "".join(parts)}
            if message.name:
                entry["name"] = message.name
            messages.append(entry)
        prompt_text = compat.templates.render(model, messages)
        ids = await asyncio.to_thread(model.context_ids, [prompt_text])
        compat._check_prompt(model, ids, "messages")
        settings = _sampling_settings(request, model.engine.n_ctx_train)
        return compat.plan(model, [ids], settings)

    def _header(self, plan: SamplingPlan, created: Any) -> Dict[str, Any]:
        return dict(
            id=plan.response_id,
            model=plan.model.name,
            created=created,
            system_fingerprint=_fingerprint(),
        )

    async def GetCompletion(self, request: Any, scope: RequestScope) -> Any:
        plan = await self._plan(request)
        created = _proto.timestamp_now()
        texts: Dict[int, List[str]] = {i: [] for i in range(len(plan.choices))}
        logprobs: Dict[int, List[Any]] = {i: [] for i in range(len(plan.choices))}
        reasons: Dict[int, int] = {}
        async for index, event in self._compat.events(plan, scope):
            texts[index].append(event.text)
            logprobs[index].extend(event.logprobs)
            if event.finish_reason is not None:
                reasons[index] = event.finish_reason
        response = xai.GetChatCompletionResponse(
            usage=self._compat.usage(plan, scope), **self._header(plan, created)
        )
        for index in range(len(plan.choices)):
            output = response.outputs.add(
                index=index,
                finish_reason=reasons.get(index, REASON_STOP),
                message=xai.CompletionMessage(content="".join(texts[index]), role=ROLE_ASSISTANT),
            )
            if plan.logprobs:
                output.logprobs.content.extend(logprobs[index])
        return response

    async def GetCompletionChunk(self, request: Any, scope: RequestScope) -> AsyncIterator[Any]:
        plan = await self._plan(request)
        created = _proto.timestamp_now()
        header = self._header(plan, created)
        async for index, event in self._compat.events(plan, scope):
            if not event.text and not event.logprobs and event.finish_reason is None:
                continue
            output = xai.CompletionOutputChunk(
                index=index, delta=xai.Delta(content=event.text, role=ROLE_ASSISTANT)
            )
            if event.logprobs:
                output.logprobs.content.extend(event.logprobs)
            if event.finish_reason is not None:
                output.finish_reason = event.finish_reason
            yield xai.GetChatCompletionChunk(
                outputs=[output], usage=self._compat.usage(plan, scope), **header
            )


class SampleService:
    """``xai_api.Sample``: raw-text completion of each prompt, ``n`` choices per prompt
    (choice index = prompt index * n + j)."""

    def __init__(self, compat: XaiCompat):
        self._compat = compat

    async def _plan(self, request: Any) -> SamplingPlan:
        compat = self._compat
        model = compat.resolve_model(request.model)
        if not request.prompt:
            raise invalid("prompt: at least one prompt is needed")
        settings = _sampling_settings(request, model.engine.n_ctx_train)
        if len(request.prompt) * settings["n"] > MAX_CHOICES:
            raise invalid(
                f"prompt, n: at most {MAX_CHOICES} completions per request, got {len(request.prompt) * settings['n']}"
            )
        prompts = []
        for i, text in enumerate(request.prompt):
            ids = await asyncio.to_thread(model.context_ids, [text])
            compat._check_prompt(model, ids, f"prompt[{i}]")
            prompts.append(ids)
        return compat.plan(model, prompts, settings)

    def _response(self, plan: SamplingPlan, scope: RequestScope, created: Any) -> Any:
        return xai.SampleTextResponse(
            id=plan.response_id,
            model=plan.model.name,
            created=created,
            system_fingerprint=_fingerprint(),
            usage=self._compat.usage(plan, scope),
        )

    async def SampleText(self, request: Any, scope: RequestScope) -> Any:
        plan = await self._plan(request)
        created = _proto.timestamp_now()
        texts: Dict[int, List[str]] = {i: [] for i in range(len(plan.choices))}
        reasons: Dict[int, int] = {}
        async for index, event in self._compat.events(plan, scope):
            texts[index].append(event.text)
            if event.finish_reason is not None:
                reasons[index] = event.finish_reason
        response = self._response(plan, scope, created)
        for index in range(len(plan.choices)):
            response.choices.add(
                index=index,
                text="".join(texts[index]),
                finish_reason=reasons.get(index, REASON_STOP),
            )
        return response

    async def SampleTextStreaming(self, request: Any, scope: RequestScope) -> AsyncIterator[Any]:
        plan = await self._plan(request)
        created = _proto.timestamp_now()
        async for index, event in self._compat.events(plan, scope):
            if not event.text and event.finish_reason is None:
                continue
            response = self._response(plan, scope, created)
            choice = response.choices.add(index=index, text=event.text)
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
            yield response


class TokenizeService:
    """``xai_api.Tokenize``: the text's tokens, without BOS/EOS and with special-token
    text taken literally (what counting a text's tokens means)."""

    def __init__(self, compat: XaiCompat):
        self._compat = compat

    async def TokenizeText(self, request: Any, scope: RequestScope) -> Any:
        model = self._compat.resolve_model(request.model)
        scope.model = model.name
        engine = model.engine
        ids = await asyncio.to_thread(engine.tokenize, request.text, False, False)
        scope.prompt_tokens = len(ids)
        response = xai.TokenizeTextResponse(model=model.name)
        for token_id in ids:
            raw = engine.token_bytes(token_id)
            response.tokens.add(
                token_id=token_id,
                string_token=raw.decode("utf-8", errors="replace"),
                token_bytes=raw,
            )
        return response


class ModelsService:
    """``xai_api.Models``: the loaded models as language models (text in, text out)."""

    def __init__(self, compat: XaiCompat):
        self._compat = compat

    def _language_model(self, info: Any) -> Any:
        from .. import __version__

        model = xai.LanguageModel(
            name=info.name,
            version=__version__,
            input_modalities=[TEXT_MODALITY],
            output_modalities=[TEXT_MODALITY],
            max_prompt_length=info.context_length,
            system_fingerprint=_fingerprint(),
            aliases=list(info.aliases),
        )
        try:
            model.created.CopyFrom(_proto.timestamp_now(os.path.getmtime(info.path)))
        except (OSError, TypeError, ValueError):
            pass
        return model

    async def ListLanguageModels(self, request: Any, scope: RequestScope) -> Any:
        infos = await self._compat.stub.list_models()
        return xai.ListLanguageModelsResponse(models=[self._language_model(i) for i in infos])

    async def GetLanguageModel(self, request: Any, scope: RequestScope) -> Any:
        infos = await self._compat.stub.list_models()
        for info in infos:
            if request.name == info.name or request.name in info.aliases:
                scope.model = info.name
                return self._language_model(info)
        known = ", ".join(i.name for i in infos)
        raise RpcFailure(
            grpc.StatusCode.NOT_FOUND,
            f"name: no model {request.name!r}; this server serves: {known}",
        )
