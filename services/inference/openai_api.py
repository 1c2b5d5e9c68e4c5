"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` over
the served policy.

Chat requests are rendered with the model's chat template; their images come as data URLs in
``image_url`` content parts (never fetched from elsewhere: a request cannot make the service
reach another host), decoded within ``task.max_image_bytes`` / ``max_image_pixels`` and
``task.max_images`` per request, off the event loop.

Requests are validated by pydantic before they reach the engine: a bad field answers 422, a
prompt that does not fit the context 400, an unknown model 404, all in OpenAI's error shape.
Each response also says which weight version produced it (``weight_version`` and
``system_fingerprint``), so an evaluation can tell policies apart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    from vllm import CompletionOutput

MAX_PROMPTS = 256
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOPS = 8
MAX_MESSAGES = 256


def check_stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
    return value


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request this service implements."""

    # Clients send fields this service does not use (user, suffix...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    # vLLM's extension: keep sampling past the end-of-text token (fixed-length benchmarks).
    ignore_eos: bool = False
    stream: Literal[False] = False
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_stops(value)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completions request this service implements."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    stream: Literal[False] = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_stops(value)

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16

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


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """An error body in OpenAI's shape, so clients raise their usual exceptions."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _logprobs_block(completion: CompletionOutput, top: int, tokenizer: Any) -> dict[str, Any]:
    """OpenAI's logprobs object from vLLM's flat log-probs.

    At each position the engine puts the sampled token first, then the ``top`` most likely
    ones. Token strings come from the engine's detokenizer when it ran, else from one batched
    decode here.
    """
    flat: Any = completion.logprobs
    if flat is None:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    strings: list[str | None] = list(flat.decoded_tokens)
    missing = [i for i, text in enumerate(strings) if text is None]
    if missing:
        # Each distinct token is decoded once: far fewer calls than tokens.
        unique = sorted({flat.token_ids[i] for i in missing})
        decoded = dict(zip(unique, tokenizer.batch_decode([[t] for t in unique]), strict=True))
        for i in missing:
            strings[i] = decoded[flat.token_ids[i]]
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    offset = 0
    for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
        text = strings[start] or ""
        tokens.append(text)
        # Log-probs are after temperature and top-p: a candidate outside the nucleus has -inf,
        # which JSON cannot carry, so it is left out (and a sampled one can never have it).
        sampled = flat.logprobs[start]
        token_logprobs.append(sampled if math.isfinite(sampled) else None)
        top_logprobs.append(
            {
                strings[k] or "": flat.logprobs[k]
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


def build_router(service: InferenceService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

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
        """The error for a request this replica cannot take now (another model, still loading)."""
        if model not in {service.model, service.model.rstrip("/").rsplit("/", 1)[-1]}:
            return error(
                404,
                f"model {model!r} is not served here; use {service.model!r}",
                "not_found",
                "model",
            )
        if not service.ready:
            return error(503, "the model is still loading", "unavailable")
        return None

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

    @router.post("/completions", response_model=None)
    async def completions(req: CompletionRequest) -> JSONResponse:
        from vllm.sampling_params import RequestOutputKind

        if (refused := not_serving(req.model)) is not None:
            return refused
        try:
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
        except PromptRejected as exc:
            return error(400, str(exc), "invalid_request_error", "prompt")
        try:
            gen = await service.generate(prompt_ids, params)
        except EngineUnavailable as exc:
            return error(503, str(exc), "unavailable")
        except PromptRejected as exc:  # the engine's own validation of a request
            return error(400, str(exc), "invalid_request_error")
        choices = []
        completion_tokens = 0
        for i, out in enumerate(gen.outputs):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(
                    {
                        "index": i * req.n + c.index,
                        "text": c.text if req.stop else service.decode(c.token_ids),
                        "logprobs": (
                            _logprobs_block(c, req.logprobs, service.tokenizer)
                            if req.logprobs is not None
                            else None
                        ),
                        "finish_reason": c.finish_reason,
                    }
                )
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        return answer(
            "cmpl", "text_completion", gen.version, choices, prompt_tokens, completion_tokens
        )

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest) -> JSONResponse:
        from vllm.sampling_params import RequestOutputKind

        if (refused := not_serving(req.model)) is not None:
            return refused
        cfg = service.config
        fmt = PromptFormat.for_tokenizer(service.tokenizer)
        try:
            if not fmt.chat:
                raise PromptRejected("this model has no chat template; use /v1/completions")
            messages, urls = req.template_messages()
            if len(urls) > cfg.task.max_images:
                raise PromptRejected(
                    f"{len(urls)} images; at most {cfg.task.max_images} (task.max_images)"
                )
            text: str = fmt.template.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = service.tokenize(text)
            service.check_length(ids, req.limit())
            request: list[int] | dict[str, Any] = ids
            if urls:
                limits = limits_of(cfg)
                pictures = await asyncio.to_thread(
                    lambda: [
                        decode_image(data_url_bytes(u), limits, f"image {i}")
                        for i, u in enumerate(urls)
                    ]
                )
                request = {"prompt": text, "multi_modal_data": {"image": pictures}}
            params = sampling_params(
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.limit(),
                logprobs=0 if req.logprobs else None,
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
        try:
            gen = await service.generate([request], params)
        except EngineUnavailable as exc:
            return error(503, str(exc), "unavailable")
        except PromptRejected as exc:
            return error(400, str(exc), "invalid_request_error")
        out = gen.outputs[0]
        choices = []
        completion_tokens = 0
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs:
                block = _logprobs_block(c, 0, service.tokenizer)
                logprobs = {
                    "content": [
                        {"token": t, "logprob": lp, "top_logprobs": []}
                        for t, lp in zip(block["tokens"], block["token_logprobs"], strict=True)
                    ],
                    "token_ids": block["token_ids"],
                }
            choices.append(
                {
                    "index": c.index,
                    "message": {
                        "role": "assistant",
                        "content": c.text if req.stop else service.decode(c.token_ids),
                    },
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
        prompt_tokens = len(out.prompt_token_ids or ids)
        return answer(
            "chatcmpl", "chat.completion", gen.version, choices, prompt_tokens, completion_tokens
        )

    return router
