"""Vision-language groups through the real pieces: image store in Redis, the inference service
(vLLM on the CPU with the tiny Qwen2.5-VL), the reward server, then the trainer's side.

A group of the built-in shapes task travels prompt -> replica -> reward -> scored group with its
image references; the trainer fetches the pictures, checks that the processor expands the
prompt into the engine's tokens, recomputes the engine's log-probs, and one training step moves
probability towards the rewarded rollouts. Prompts whose picture is missing, too large or not a
picture are dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.core.config import BusConfig, RunConfig
from services.core.images import ImageLimits, encode_png, image_ref
from services.core.prompts import PromptFormat
from services.core.schemas import PromptMessage, ScoredGroup
from services.core.tasks import Example, load_builtin
from services.inference.launcher import InferenceProcess
from services.trainer.batch import TrainBatch, collate
from services.trainer.logprobs import TokenScores, score_tokens
from services.trainer.model import load_causal_lm
from services.trainer.step import train_step
from services.trainer.vision import VisionProcessor
from services.transport import make_bus
from services.transport.images import ImageStore
from tests.fixtures.redis import bus_config, bus_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The service refuses images above this many bytes (the task's pictures are ~350 bytes).
MAX_IMAGE_BYTES = 4096
#: Engine and trainer log-probs of the same tokens agree within this (float32 on both sides;
#: measured 5e-7, and 8e-4 when the pictures lose their 3-D rotary positions).
LOGPROB_TOLERANCE = 1e-4
GROUP = 8


@dataclasses.dataclass
class VLService:
    proc: InferenceProcess
    bus: BusConfig
    store: Path


@pytest.fixture(scope="module")
def vl_service(
    tiny_vl_model: Path, redis_server: Any, reward_server: Any, tmp_path_factory: Any
) -> Iterator[VLService]:
    cfg = bus_config(redis_server.url).model_copy(update={"claim_idle_ms": 30_000})
    store = tmp_path_factory.mktemp("vl-weights")
    settings = [
        *bus_settings(cfg),
        f"reward.address={reward_server.address}",
        f"weights.store={store}",
        f"task.max_image_bytes={MAX_IMAGE_BYTES}",
        "inference.prompts_per_batch=4",
        "inference.kv_cache_gib=0.25",
        "model.max_model_len=96",
    ]
    proc = InferenceProcess(tiny_vl_model, settings=settings)
    try:
        yield VLService(proc, cfg, store)
    finally:
        code = proc.stop()
        assert code == 0, f"the service did not shut down cleanly ({code}):\n{proc.log()[-3000:]}"


def scores_of(model: torch.nn.Module, batch: TrainBatch) -> TokenScores:
    return score_tokens(
        model,
        batch.input_ids,
        batch.attention_mask,
        micro_batch=8,
        vision=batch.row_vision(),
        never=batch.never,
    )


def recompute(
    model: torch.nn.Module,
    processor: VisionProcessor,
    groups: Sequence[ScoredGroup],
    examples: Sequence[Example],
) -> tuple[TrainBatch, TokenScores]:
    """The trainer's log-probs of the groups' rollouts, checked against the engine's."""
    vision = {
        g.group_id: processor.prepare(g.prompt, g.prompt_token_ids, list(ex.images))
        for ex, g in zip(examples, groups, strict=True)
    }
    batch = collate(groups, pad_id=0, max_len=96, vision=vision, never=processor.vision_token_ids)
    scores = scores_of(model, batch)
    gap = (scores.logprobs - batch.behaviour_logprobs).abs()[batch.response_mask]
    assert float(gap.max()) < LOGPROB_TOLERANCE, f"max |trainer - engine| = {float(gap.max())}"
    return batch, scores


def noise_png(size: int) -> bytes:
    """A picture that compresses badly: well above MAX_IMAGE_BYTES."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


def vl_prompts(
    run: str, model: Path, examples: Sequence[Example], refs: Sequence[tuple[str, ...]]
) -> list[PromptMessage]:
    fmt = PromptFormat.load(model)
    return [
        PromptMessage(
            f"{run}-{i}", fmt.render(ex.prompt, 1), ex.answer, "shapes", GROUP, max_tokens=4,
            images=ref,
        )
        for i, (ex, ref) in enumerate(zip(examples, refs, strict=True))
    ]  # fmt: skip


async def roll_out(
    cfg: BusConfig, run: str, prompts: Sequence[PromptMessage], dead: int = 0
) -> tuple[dict[str, ScoredGroup], dict[str, str]]:
    """Publish ``prompts``; the groups of those that succeed and the dead-letter reasons of
    the ``dead`` others."""
    bus = make_bus(cfg)
    try:
        await bus.ensure_group(cfg.rollouts_stream, f"check-{run}", "0")
        await bus.publish_many(cfg.prompts_stream, prompts)
        groups: dict[str, ScoredGroup] = {}
        reasons: dict[str, str] = {}
        async with asyncio.timeout(180):
            while len(groups) < len(prompts) - dead or len(reasons) < dead:
                for d in await bus.read(cfg.rollouts_stream, f"check-{run}", "c", 16, 300):
                    if d.message.group_id.startswith(run):
                        groups[d.message.group_id] = d.message
                    await bus.ack(cfg.rollouts_stream, f"check-{run}", [d.entry_id])
                for dl in await bus.dead_letters():
                    if dl.message_id.startswith(run):
                        reasons[dl.message_id] = dl.reason
        return groups, reasons
    finally:
        await bus.close()


async def store_images(cfg: BusConfig, examples: Sequence[Example]) -> list[tuple[str, ...]]:
    bus = make_bus(cfg)
    try:
        store = ImageStore(bus.streams, "mapo:image:", ImageLimits(max_bytes=1 << 20))
        return [await store.put_all(ex.images) for ex in examples]
    finally:
        await bus.close()


def test_vl_groups_travel_to_the_trainer_and_bad_images_are_dead_lettered(
    vl_service: VLService, tiny_vl_model: Path
) -> None:
    cfg = vl_service.bus
    fmt = PromptFormat.load(tiny_vl_model)
    examples = load_builtin("shapes", 0).train[:4]
    run = uuid.uuid4().hex[:6]
    big = noise_png(64)
    assert len(big) > MAX_IMAGE_BYTES

    async def go() -> tuple[dict[str, ScoredGroup], dict[str, str], list[str]]:
        bus = make_bus(cfg)
        store = ImageStore(bus.streams, "mapo:image:", ImageLimits(max_bytes=1 << 20))
        try:
            refs = [await store.put_all(ex.images) for ex in examples]
            prompts = vl_prompts(run, tiny_vl_model, examples, refs)
            # Three prompts that can never succeed, each for its own reason.
            undecodable = await store.put(b"these bytes are no picture")
            await store.put(big)  # this store's limit is larger than the service's
            bad = {
                f"{run}-missing": image_ref(b"never stored"),
                f"{run}-undecodable": undecodable,
                f"{run}-oversized": image_ref(big),
            }
            for pid, ref in bad.items():
                prompts.append(
                    PromptMessage(
                        pid,
                        fmt.render("How many shapes?", 1),
                        "1",
                        "shapes",
                        2,
                        max_tokens=4,
                        images=(ref,),
                    )
                )
        finally:
            await bus.close()
        groups, reasons = await roll_out(cfg, run, prompts, dead=len(bad))
        return groups, reasons, list(bad)

    groups, reasons, bad_ids = asyncio.run(go())
    missing, undecodable, oversized = bad_ids
    assert "not in the image store" in reasons[missing]
    assert "cannot be decoded" in reasons[undecodable]
    assert f"the limit is {MAX_IMAGE_BYTES}" in reasons[oversized]
    assert not set(bad_ids) & set(groups)

    # The groups carry their images; each prompt holds the image's 4 merged-patch tokens.
    processor = VisionProcessor.load(str(tiny_vl_model), ImageLimits())
    pad = processor.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ordered = [groups[f"{run}-{i}"] for i in range(len(examples))]
    for ex, g in zip(examples, ordered, strict=True):
        assert g.images == (image_ref(ex.images[0]),)
        assert int((g.prompt_token_ids == pad).sum()) == 4
        assert len(g.rollouts) == GROUP
        for r in g.rollouts:
            assert not processor.vision_token_ids & set(r.token_ids.tolist())
            assert r.reward == (1.0 if r.text.strip().lower() == ex.answer else 0.0)

    # The trainer's side: pictures through the processor, checked against the engine's tokens.
    with pytest.raises(ValueError, match="expands to"):
        processor.prepare(ordered[0].prompt, ordered[0].prompt_token_ids[:-1], examples[0].images)
    model = load_causal_lm(tiny_vl_model, torch.device("cpu"), torch.float32)
    batch, scores = recompute(model, processor, ordered, examples)

    # One step with rewards that favour one rollout per group: its probability rises.
    favoured = torch.zeros(batch.size, dtype=torch.float64)
    first: dict[str, int] = {}
    for row, (gid, _k) in enumerate(batch.sample_keys):
        first.setdefault(gid, row)
    for row in first.values():
        favoured[row] = 1.0
    batch = dataclasses.replace(batch, rewards=favoured)
    config = RunConfig.model_validate(
        {
            "algorithm": {"estimator": "grpo", "kl_coef": 0.0, "mini_batch_groups": 0},
            "optim": {"lr": 1e-2, "micro_batch": 16},
        }
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    train_step(model, opt, batch, config)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("visual" in n for n in changed), "the vision tower is trained by default"
    assert any("visual" not in n for n in changed)
    after = scores_of(model, batch)
    rows = torch.tensor(sorted(first.values()))
    mask = batch.response_mask[rows]
    gained = ((after.logprobs - scores.logprobs)[rows] * mask).sum(-1)
    assert bool((gained > 0).all()), f"favoured rollouts' log-prob change: {gained.tolist()}"


def test_openai_client_sends_an_image_to_chat_completions(
    vl_service: VLService, tiny_vl_model: Path
) -> None:
    import base64

    import openai

    proc = vl_service.proc
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
    ex = load_builtin("shapes", 0).train[0]

    def ask(url: str, **kw: Any) -> Any:
        content = [{"type": "image_url", "image_url": {"url": url}}]
        content.append({"type": "text", "text": ex.prompt})
        return client.chat.completions.create(
            model=str(tiny_vl_model),
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
            **kw,
        )

    url = "data:image/png;base64," + base64.b64encode(ex.images[0]).decode()
    resp = ask(url, max_tokens=4, n=2, temperature=1.0, seed=3, logprobs=True)
    assert len(resp.choices) == 2
    rendered = PromptFormat.load(tiny_vl_model).render(ex.prompt, 1)
    tokenizer = VisionProcessor.load(str(tiny_vl_model), ImageLimits()).processor.tokenizer
    # The one placeholder of the rendered prompt became the image's 4 merged-patch tokens.
    assert resp.usage.prompt_tokens == len(tokenizer.encode(rendered)) + 3
    for choice in resp.choices:
        assert choice.message.role == "assistant"
        assert choice.logprobs is not None and 1 <= len(choice.logprobs.content) <= 4
    with pytest.raises(openai.BadRequestError, match="data URLs"):
        ask("http://127.0.0.1:1/picture.png", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="cannot be decoded"):
        ask("data:image/png;base64," + base64.b64encode(b"no picture").decode(), max_tokens=2)


def test_a_published_version_reaches_the_vl_engine(
    vl_service: VLService, tiny_vl_model: Path
) -> None:
    """New weights (written under the checkpoint's names, announced on the bus) are served:
    the engine's log-probs then match the trainer's recompute under those weights, the vision
    tower and the tied output head included."""
    from safetensors.torch import load_file

    from services.core.schemas import WeightAnnouncement
    from services.stack.evaluate import load_policy
    from services.weights.store import write_version

    base = load_file(str(tiny_vl_model / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    directory, sha = write_version(vl_service.store, 1, weights, step=1, keep=10)

    async def announce() -> None:
        bus = make_bus(vl_service.bus)
        try:
            msg = WeightAnnouncement(1, str(directory), sha, step=1)
            await bus.publish(vl_service.bus.weights_stream, msg)
        finally:
            await bus.close()

    asyncio.run(announce())
    examples = load_builtin("shapes", 0).train[4:6]
    run = uuid.uuid4().hex[:6]
    deadline = 60
    while True:  # the replica serves the new version once its groups say so
        refs = asyncio.run(store_images(vl_service.bus, examples))
        groups, _ = asyncio.run(
            roll_out(vl_service.bus, run, vl_prompts(run, tiny_vl_model, examples, refs))
        )
        if all(g.policy_version == 1 for g in groups.values()):
            break
        deadline -= 1
        assert deadline, f"version 1 was never served:\n{vl_service.proc.log()[-3000:]}"
        run = uuid.uuid4().hex[:6]
    model, processor = load_policy(tiny_vl_model, directory)
    ordered = [groups[f"{run}-{i}"] for i in range(len(examples))]
    recompute(model, VisionProcessor(processor, ImageLimits()), ordered, examples)
