"""Images of vision-language prompts: the content-addressed store (Redis and memory), decoding
within bounds, chat-template rendering, and the image references in bus messages."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path

import pytest

from services.core.images import ImageError, ImageLimits, decode_image, encode_png, image_ref
from services.core.prompts import PromptFormat, PromptFormatError
from services.core.schemas import PromptMessage, SchemaError, decode, encode
from services.transport import make_bus
from services.transport.images import ImageMissing, ImageStore
from tests.fixtures.redis import BusSetup, make_group


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    from PIL import Image

    return encode_png(Image.new("RGB", (width, height), colour))


def test_store_keeps_images_by_content_and_refuses_what_it_cannot_vouch_for(
    bus_setup: BusSetup,
) -> None:
    async def go() -> None:
        bus = make_bus(bus_setup.config)
        store = ImageStore(bus.streams, f"{bus_setup.config.prompts_stream}:img:", ImageLimits())
        try:
            picture = png(8, 8)
            ref = await store.put(picture)
            assert ref == image_ref(picture) and ref.startswith("sha256:")
            assert await store.put(picture) == ref  # stored once, same reference
            assert await store.get(ref) == picture
            with pytest.raises(ImageMissing, match="not in the image store"):
                await store.get(image_ref(b"never stored"))
            with pytest.raises(ImageError, match="not an image reference"):
                await store.get("sha256:xyz")
            # Damaged bytes under a reference are refused, not handed on.
            other = png(8, 8, (0, 0, 255))
            damaged = image_ref(png(9, 9))
            await bus.streams.put_blob(store.key(damaged), other)
            with pytest.raises(ImageError, match="corrupt"):
                await store.get(damaged)
            small = ImageStore(bus.streams, store.prefix, ImageLimits(max_bytes=16))
            with pytest.raises(ImageError, match="the limit is 16"):
                await small.put(picture)
            with pytest.raises(ImageError, match="the limit is 16"):
                await small.get(ref)
        finally:
            await bus.close()

    asyncio.run(go())


def test_decode_refuses_oversized_and_undecodable_pictures_before_decoding() -> None:
    picture = decode_image(png(10, 6), ImageLimits())
    assert picture.size == (10, 6) and picture.mode == "RGB"
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(b"\x89PNG\r\n\x1a\n not really", ImageLimits())
    with pytest.raises(ImageError, match="bytes; the limit is 10"):
        decode_image(png(10, 6), ImageLimits(max_bytes=10))
    # A small file of a huge picture is refused from its header (a decompression bomb).
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (4000, 4000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 10_000
    with pytest.raises(ImageError, match="4000x4000 pixels"):
        decode_image(bomb.getvalue(), ImageLimits(max_pixels=1 << 20))


def test_image_references_travel_in_prompts_and_groups_and_bad_ones_are_refused() -> None:
    ref = image_ref(b"a picture")
    prompt = PromptMessage("p", "q", "a", "shapes", 2, images=(ref,))
    assert decode(encode(prompt)) == prompt
    group = make_group("g")
    with_images = dataclasses.replace(group, images=(ref, ref))
    assert decode(encode(with_images)).images == (ref, ref)
    assert decode(encode(group)).images == ()  # text groups carry none
    import msgspec

    for bad, why in [
        (["sha256:abc"], "not an image reference"),
        ([ref.upper()], "not an image reference"),
        ("sha256:x", "must be a list"),
        ([ref] * 65, "at most 64"),
    ]:
        body = msgspec.msgpack.decode(encode(prompt))
        body["images"] = bad
        with pytest.raises(SchemaError, match=why):
            decode(msgspec.msgpack.encode(body))


def test_prompts_are_rendered_with_the_chat_template(tiny_model: Path, tiny_vl_model: Path) -> None:
    text = PromptFormat.load(tiny_model)
    assert not text.chat and text.render("12+34=") == "12+34="
    with pytest.raises(PromptFormatError, match="needs the model's chat template"):
        text.render("How many shapes?", 1)
    chat = PromptFormat.load(tiny_vl_model)
    assert chat.render("12+34=") == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n"
    two = chat.render("Same colour?", 2)
    assert two.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert two.index("<|image_pad|>") < two.index("Same colour?")
    assert PromptFormat.load(tiny_vl_model, "off").render("12+34=") == "12+34="


def test_dataset_records_bring_their_pictures(tmp_path: Path) -> None:
    """Geo3K-style records: ``problem`` with an ``<image>`` marker, pictures as paths relative
    to the file or as a datasets image value with bytes."""
    import json

    from services.trainer.dataset import DatasetError, load_examples

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(12, 12))
    records = [
        {"problem": "<image>Find x.", "answer": "60", "images": ["img/a.png"]},
        {"prompt": "Colour?", "answer": "red", "image": {"bytes": png(5, 5), "path": None}},
        {"prompt": "12+34=", "answer": "46"},
    ]
    path = tmp_path / "geo.jsonl"
    path.write_text("\n".join(json.dumps(records[i]) for i in (0, 2)))  # JSON holds no bytes
    examples = load_examples(str(path), "math")
    assert examples[0].prompt == "Find x." and examples[0].images == (png(12, 12),)
    assert examples[1].images == ()
    # The same reader takes the rows of a parquet file or a saved datasets directory.
    from services.trainer.dataset import _records_to_examples

    assert _records_to_examples([records[1]], "shapes", "rows")[0].images == (png(5, 5),)
    path.write_text(json.dumps({"problem": "<image>", "answer": "1", "images": ["nope.png"]}))
    with pytest.raises(DatasetError, match="empty or non-text prompt"):
        load_examples(str(path), "math")
    path.write_text(json.dumps({"problem": "Find x.", "answer": "1", "images": ["nope.png"]}))
    with pytest.raises(DatasetError, match=r"cannot read image nope\.png"):
        load_examples(str(path), "math")


def test_the_trainer_refuses_pictures_that_are_not_the_rollouts(tiny_vl_model: Path) -> None:
    from services.trainer.vision import VisionProcessor

    processor = VisionProcessor.load(str(tiny_vl_model), ImageLimits())
    tokenizer = processor.processor.tokenizer
    prompt = PromptFormat.load(tiny_vl_model).render("How many shapes?", 1)
    picture = png(56, 56)
    expanded = processor.processor(text=[prompt], images=[decode_image(picture, ImageLimits())])
    ids = list(expanded["input_ids"][0])
    vision = processor.prepare(prompt, ids, [picture])
    assert vision.image_grid_thw.tolist() == [[1, 4, 4]] and vision.pixel_values.shape[0] == 16
    # A bigger picture has more patch tokens than the rollouts were generated from.
    with pytest.raises(ImageError, match="expands to"):
        processor.prepare(prompt, ids, [png(112, 112)])
    with pytest.raises(ImageError, match="cannot be decoded"):
        processor.prepare(prompt, ids, [b"not a picture"])
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.problem([[5, 6], [7]]) is None
    assert processor.problem([[5], [6, pad]]) == "rollout 1 generated a vision special token"


def test_chat_style_records_are_rendered_as_their_conversation(
    tmp_path: Path, tiny_vl_model: Path
) -> None:
    import json

    from services.trainer.dataset import DatasetError, load_examples

    (tmp_path / "a.png").write_bytes(png(12, 12))
    record = {
        "messages": [
            {"role": "system", "content": "Answer with one word."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": "Colour?"},
                ],
            },
        ],
        "answer": "red",
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record))
    (example,) = load_examples(str(path), "shapes")
    assert example.prompt == "Colour?" and example.images == (png(12, 12),)
    rendered = PromptFormat.load(tiny_vl_model).render_example(example)
    assert rendered == (
        "<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(PromptFormatError, match="chat-style example needs"):
        PromptFormat().render_example(example)
    # Pictures listed beside the conversation fill its image parts in order; counts must agree.
    record["messages"][1]["content"][0] = {"type": "image"}  # type: ignore[index]
    record["images"] = ["a.png", "a.png"]
    path.write_text(json.dumps(record))
    with pytest.raises(DatasetError, match="1 image parts but 2 pictures"):
        load_examples(str(path), "shapes")
