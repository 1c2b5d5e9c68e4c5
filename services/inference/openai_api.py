"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` over
the served policy.

Chat requests are rendered with the model's chat template; their images come as data URLs in
``image_url`` content parts (never fetched from elsewhere: a request cannot make the service
reach another host), decoded within ``task.max_image_bytes`` / ``max_image_pixels`` and
``task.max_images`` per request, off the event loop.

Requests are validated by pydantic before they reach the engine, against request models built
from the run config (:func:`request_models`), so the OpenAPI schema states the limits this
replica enforces: a bad field, or a field past its limit (``inference.max_prompts_per_request``,
``max_n``, ``max_logprobs``, ``max_request_tokens``, ``model.max_model_len``) answers 422; a
prompt that does not fit the context together with ``max_tokens`` 400 (refused, never silently
shortened); an unknown model 404; all in OpenAI's error shape. The body size, the bearer token
and the number of requests served at once are checked before the body is read
(:mod:`services.inference.app`).

Tokenising, chat-template rendering, image decoding and turning the engine's tokens back into
text run off the event loop (:meth:`InferenceService.off_loop`), so the probes keep answering
while a large request is being prepared. Each response also says which weight version produced
it (``weight_version`` and ``system_fingerprint``), so an evaluation can tell policies apart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.core.config import RunConfig
from services.core.images import ImageError, decode_image, limits_of
from services.core.prompts import PromptFormat
from services.inference.generation import (
    EngineUnavailable,
    PromptRejected,
    never_sample,
    sampling_params,
)
from services.inference.service import InferenceService

if TYPE_CHECKING:
    from vllm import CompletionOutput, SamplingParams

MAX_STOPS = 8
#: Tokens generated when a request does not say (within max_model_len and max_request_tokens).
DEFAULT_MAX_TOKENS = 16
#: vLLM's range of temperatures (OpenAI's too).
MAX_TEMPERATURE = 2.0
MAX_MESSAGES = 256
MAX_CONTENT_PARTS = 256

#: The routes that generate: the ones ``inference.max_concurrent_requests`` counts.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (from ``[inference]`` and ``model.max_model_len``)."""

    prompts: int
    n: int
    logprobs: int
    max_tokens: int
    request_tokens: int

    @classmethod
    def of(cls, config: RunConfig) -> Limits:
        inf = config.inference
        return cls(
            prompts=inf.max_prompts_per_request,
            n=inf.max_n,
            logprobs=inf.max_logprobs,
            # At least one prompt token: max_tokens can never be the whole context, nor more
            # than a whole request may ask for.
            max_tokens=min(config.model.max_model_len - 1, inf.max_request_tokens),
            request_tokens=inf.max_request_tokens,
        )


def check_budget(tokens: int, what: str, limit: int) -> None:
    if tokens > limit:
        raise ValueError(
            f"this request asks for up to {tokens} tokens ({what}); at most {limit} "
            "(inference.max_request_tokens)"
        )


class ImageURL(BaseModel):
    url: str = Field(min_length=1)


class ContentPart(BaseModel):
    """One part of a chat message: text, or an image given as a data URL."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]


def request_models(limits: Limits) -> tuple[type[Any], type[Any]]:
    """The completions and chat request models with this replica's limits in their schema."""
    NonEmpty = Annotated[str, Field(min_length=1)]
    Stops = Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)]
    Prompts = Annotated[list[NonEmpty], Field(min_length=1, max_length=limits.prompts)]
    MaxTokens = Annotated[int, Field(ge=1, le=limits.max_tokens)]
    default_tokens = min(DEFAULT_MAX_TOKENS, limits.max_tokens)

    class CompletionRequest(BaseModel):
        """The fields of OpenAI's completions request this service implements."""

        # Clients send fields this service does not use (user, suffix...): accept and ignore.
        model_config = ConfigDict(extra="ignore")

        model: str = Field(min_length=1)
        prompt: NonEmpty | Prompts = Field(
            description=f"A prompt, or a list of at most {limits.prompts} "
            "(inference.max_prompts_per_request)."
        )
        max_tokens: MaxTokens = Field(
            default_tokens,
            description="Tokens to generate; the prompt and these must fit model.max_model_len.",
        )
        temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(
            1, ge=1, le=limits.n, description="Completions per prompt (inference.max_n)."
        )
        logprobs: int | None = Field(
            None, ge=0, le=limits.logprobs, description="Top log-probs (inference.max_logprobs)."
        )
        seed: int | None = Field(None, ge=0, lt=2**63)
        stop: NonEmpty | Stops | None = Field(None, description=f"At most {MAX_STOPS}.")
        # vLLM's extension: keep sampling past the end-of-text token (fixed-length benchmarks).
        ignore_eos: bool = False
        stream: Literal[False] = False
        echo: Literal[False] = False

        @model_validator(mode="after")
        def _budget(self) -> CompletionRequest:
            count = 1 if isinstance(self.prompt, str) else len(self.prompt)
            tokens = count * self.n * self.max_tokens
            check_budget(
                tokens, f"{count} prompts x n={self.n} x max_tokens", limits.request_tokens
            )
            return self

        def prompts(self) -> list[str]:
            return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    class ChatRequest(BaseModel):
        """The fields of OpenAI's chat completions request this service implements."""

        model_config = ConfigDict(extra="ignore")

        model: str = Field(min_length=1)
        messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
        max_tokens: MaxTokens | None = None
        max_completion_tokens: MaxTokens | None = None
        temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1, le=limits.n, description="Completions (inference.max_n).")
        logprobs: bool = False
        top_logprobs: int | None = Field(
            None,
            ge=0,
            le=limits.logprobs,
            description="Top log-probs per token; needs logprobs (inference.max_logprobs).",
        )
        seed: int | None = Field(None, ge=0, lt=2**63)
        stop: NonEmpty | Stops | None = Field(None, description=f"At most {MAX_STOPS}.")
        ignore_eos: bool = False
        stream: Literal[False] = False

        @model_validator(mode="after")
        def _checks(self) -> ChatRequest:
            if self.top_logprobs and not self.logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            check_budget(self.n * self.limit(), f"n={self.n} x max_tokens", limits.request_tokens)
            return self

        def limit(self) -> int:
            return self.max_completion_tokens or self.max_tokens or default_tokens

        def template_messages(self) -> tuple[list[dict[str, Any]], list[str]]:
            """Messages as the chat template takes them (an image part becomes a placeholder),
            and the image URLs in order."""
            urls: list[str] = []
            out: list[dict[str, Any]] = []
            for m in self.messages:
                if isinstance(m.content, str):
                    out.append({"role": m.role, "content": m.content})
                    continue
                parts: list[dict[str, str]] = []
                for p in m.content:
                    if p.type == "image_url":
                        if p.image_url is None:
                            raise PromptRejected("an image_url part needs image_url.url")
                        urls.append(p.image_url.url)
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": p.text or ""})
                out.append({"role": m.role, "content": parts})
            return out, urls

    return CompletionRequest, ChatRequest


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:image/...`` URL; any other URL is refused."""
    head, sep, payload = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise PromptRejected(
            "images must be data URLs (data:image/png;base64,...); this service fetches nothing"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PromptRejected("an image data URL is not valid base64") from None


def error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error body in OpenAI's shape, so clients raise their usual exceptions."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _strings(flat: Any, tokenizer: Any) -> list[str]:
    """The text of every token in flat log-probs: the engine's when its detokenizer ran, else
    one batched decode here (each distinct token once: far fewer calls than tokens)."""
    strings: list[str | None] = list(flat.decoded_tokens or [None] * len(flat.token_ids))
    missing = [i for i, text in enumerate(strings) if text is None]
    if missing:
        unique = sorted({flat.token_ids[i] for i in missing})
        decoded = dict(zip(unique, tokenizer.batch_decode([[t] for t in unique]), strict=True))
        for i in missing:
            strings[i] = decoded[flat.token_ids[i]]
    return [s or "" for s in strings]


def _logprobs_block(completion: CompletionOutput, top: int, tokenizer: Any) -> dict[str, Any]:
    """OpenAI's logprobs object from vLLM's flat log-probs.

    At each position the engine puts the sampled token first, then the ``top`` most likely
    ones.
    """
    flat: Any = completion.logprobs
    if flat is None:
        return {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
            "token_ids": list(completion.token_ids),
        }
    strings = _strings(flat, tokenizer)
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    offset = 0
    for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
        text = strings[start]
        tokens.append(text)
        # Log-probs are after temperature and top-p: a candidate outside the nucleus has -inf,
        # which JSON cannot carry, so it is left out (and a sampled one can never have it).
        sampled = flat.logprobs[start]
        token_logprobs.append(sampled if math.isfinite(sampled) else None)
        top_logprobs.append(
            {
                strings[k]: flat.logprobs[k]
                for k in range(start + 1, min(end, start + 1 + top))
                if math.isfinite(flat.logprobs[k])
            }
        )
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
        # Not in OpenAI's schema: the exact token ids, for clients that score them.
        "token_ids": list(completion.token_ids),
    }


def _chat_logprobs(completion: CompletionOutput, top: int, tokenizer: Any) -> dict[str, Any]:
    """Chat's logprobs object: one entry per generated token, with its ``top`` alternatives."""
    block = _logprobs_block(completion, top, tokenizer)
    content = []
    for token, logprob, alternatives in zip(
        block["tokens"], block["token_logprobs"], block["top_logprobs"], strict=True
    ):
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode("utf-8", "replace")),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}
                    for t, lp in alternatives.items()
                ],
            }
        )
    return {"content": content, "token_ids": block["token_ids"]}


def _text(service: InferenceService, completion: CompletionOutput, detokenized: bool) -> str:
    # With stop strings the engine's detokenizer ran (it matches them); else decode once here.
    return completion.text if detokenized else service.decode(completion.token_ids)


def build_router(service: InferenceService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    limits = Limits.of(service.config)
    completion_model, chat_model = request_models(limits)

    def answer(
        prefix: str, kind: str, version: int, choices: list[Any], prompt: int, completion: int
    ) -> JSONResponse:
        """The response envelope; it names the weight version that produced the choices. A
        JSONResponse skips FastAPI's field-by-field encoding: this body can be large."""
        return JSONResponse(
            {
                "id": f"{prefix}-{uuid.uuid4().hex}",
                "object": kind,
                "created": int(time.time()),
                "model": service.model,
                "system_fingerprint": f"mapo-weights-v{version}",
                "weight_version": version,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )

    def not_serving(model: str) -> JSONResponse | None:
        """The error for a request this replica cannot take now (another model, still loading,
        a dead engine)."""
        if model not in {service.model, service.model.rstrip("/").rsplit("/", 1)[-1]}:
            return error(
                404,
                f"model {model!r} is not served here; use {service.model!r}",
                "not_found",
                "model",
            )
        if service.engine_dead_reason:
            return error(503, f"the engine died: {service.engine_dead_reason}", "unavailable")
        if not service.ready:
            return error(503, "the model is still loading", "unavailable")
        return None

    async def run(prompts: list[Any], params: SamplingParams) -> Any:
        """Generate; the engine's failures as errors (None: it worked)."""
        try:
            return await service.generate(prompts, params)
        except EngineUnavailable as exc:
            return error(503, str(exc), "unavailable")
        except PromptRejected as exc:  # the engine's own validation of a request
            return error(400, str(exc), "invalid_request_error")

    @router.get("/models")
    async def models() -> dict[str, Any]:
        version = service.weights.version if service.weights else None
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model,
                    "object": "model",
                    "created": int(service.started_at),
                    "owned_by": "mapo",
                    "root": service.model,
                    "weight_version": version,
                }
            ],
        }

    async def completions(req: Any) -> JSONResponse:
        if (refused := not_serving(req.model)) is not None:
            return refused

        def prepare() -> tuple[list[list[int]], SamplingParams]:
            from vllm.sampling_params import RequestOutputKind

            prompt_ids = [service.tokenize(p) for p in req.prompts()]
            for ids in prompt_ids:
                service.check_length(ids, req.max_tokens)
            params = sampling_params(
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.max_tokens,
                logprobs=req.logprobs,
                seed=req.seed,
                stop=req.stop,
                ignore_eos=req.ignore_eos,
                flat_logprobs=True,
                # Stop strings are matched by the engine's detokenizer; without them the text
                # is decoded once per completion, which costs far less.
                detokenize=bool(req.stop),
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            return prompt_ids, params

        try:
            prompt_ids, params = await service.off_loop(prepare)
        except PromptRejected as exc:
            return error(400, str(exc), "invalid_request_error", "prompt")
        gen = await run(prompt_ids, params)
        if isinstance(gen, JSONResponse):
            return gen

        def respond() -> tuple[list[dict[str, Any]], int]:
            choices = []
            completion_tokens = 0
            for i, out in enumerate(gen.outputs):
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    choices.append(
                        {
                            "index": i * req.n + c.index,
                            "text": _text(service, c, bool(req.stop)),
                            "logprobs": (
                                _logprobs_block(c, req.logprobs, service.tokenizer)
                                if req.logprobs is not None
                                else None
                            ),
                            "finish_reason": c.finish_reason,
                        }
                    )
            return choices, completion_tokens

        choices, completion_tokens = await service.off_loop(respond)
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        return answer(
            "cmpl", "text_completion", gen.version, choices, prompt_tokens, completion_tokens
        )

    async def chat_completions(req: Any) -> JSONResponse:
        if (refused := not_serving(req.model)) is not None:
            return refused
        cfg = service.config
        fmt = PromptFormat.for_tokenizer(service.tokenizer)
        top = req.top_logprobs or 0

        def render() -> tuple[str, list[int], list[str]]:
            if not fmt.chat:
                raise PromptRejected("this model has no chat template; use /v1/completions")
            messages, urls = req.template_messages()
            if urls and service.image_token_id is None:
                raise PromptRejected("this model takes no images")
            if len(urls) > cfg.task.max_images:
                raise PromptRejected(
                    f"{len(urls)} images; at most {cfg.task.max_images} (task.max_images)"
                )
            try:
                text: str = fmt.template.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:  # the template's own refusals (roles out of order...)
                raise PromptRejected(
                    f"the chat template cannot render these messages: {exc}"
                ) from None
            ids = service.tokenize(text)
            service.check_length(ids, req.limit())
            return text, ids, urls

        try:
            text, ids, urls = await service.off_loop(render)
            request: list[int] | dict[str, Any] = ids
            if urls:
                image_limits = limits_of(cfg)
                pictures = await asyncio.to_thread(
                    lambda: [
                        decode_image(data_url_bytes(u), image_limits, f"image {i}")
                        for i, u in enumerate(urls)
                    ]
                )
                request = {"prompt": text, "multi_modal_data": {"image": pictures}}
            from vllm.sampling_params import RequestOutputKind

            params = sampling_params(
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.limit(),
                logprobs=top if req.logprobs else None,
                seed=req.seed,
                stop=req.stop,
                ignore_eos=req.ignore_eos,
                logit_bias=never_sample(service.vision_token_ids),
                flat_logprobs=True,
                detokenize=bool(req.stop),
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
        except (PromptRejected, ImageError) as exc:
            return error(400, str(exc), "invalid_request_error", "messages")
        gen = await run([request], params)
        if isinstance(gen, JSONResponse):
            return gen
        out = gen.outputs[0]

        def respond() -> tuple[list[dict[str, Any]], int]:
            choices = []
            completion_tokens = 0
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(
                    {
                        "index": c.index,
                        "message": {
                            "role": "assistant",
                            "content": _text(service, c, bool(req.stop)),
                        },
                        "logprobs": (
                            _chat_logprobs(c, top, service.tokenizer) if req.logprobs else None
                        ),
                        "finish_reason": c.finish_reason,
                    }
                )
            return choices, completion_tokens

        choices, completion_tokens = await service.off_loop(respond)
        prompt_tokens = len(out.prompt_token_ids or ids)
        return answer(
            "chatcmpl", "chat.completion", gen.version, choices, prompt_tokens, completion_tokens
        )

    # The request models are built for this replica's limits, so the handlers' annotations are
    # set here (a string annotation could not name a class made inside this function).
    completions.__annotations__["req"] = completion_model
    chat_completions.__annotations__["req"] = chat_model
    router.post("/completions", response_model=None)(completions)
    router.post("/chat/completions", response_model=None)(chat_completions)
    return router
