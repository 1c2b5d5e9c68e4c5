"""Build small Qwen2.5-VL (vision-language) models offline.

Tests of the image path need a model that vLLM serves and transformers recomputes log-probs
for, with no download: a randomly initialised ``Qwen2_5_VLForConditionalGeneration`` whose text
body is one of :mod:`services.models.tiny`'s presets and whose vision tower is two small blocks,
plus the character tokenizer extended with Qwen2-VL's chat and vision markers, an image and a
video processor, and Qwen2.5-VL's chat template.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from services.models.tiny import EOS_TOKEN, PAD_TOKEN, PRESETS, make_tokenizer, vocab

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VL_SPECIAL_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# One image token covers a 28x28 pixel square after the 2x2 merge. Images are resized to
# between 1 and 16 such squares (28x28 to 112x112 pixels): a 56x56 image gives 4x4 patches,
# 4 image tokens. Bounding the largest image keeps vLLM's start-up profile (it encodes the
# largest images a prompt may carry) and the prompts small next to the 512-token context.
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = (4 * PATCH_SIZE * MERGE_SIZE) ** 2

# Qwen2.5-VL's chat template without the default system prompt (the context is small): a
# system message is rendered only when the conversation has one.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The vision tower: two blocks of width 64 with two heads (head_dim 32, as for the text
# attention), the first windowed and the last with full attention as in the released models.
# A 112-pixel window spans 4x4 merged tokens, the largest image, so both kinds of block see
# the whole image; the windowing code runs all the same.
VISION_DEPTH = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
VISION_INTERMEDIATE = 128
WINDOW_SIZE = 4 * PATCH_SIZE * MERGE_SIZE


def vl_vocab() -> dict[str, int]:
    """Token -> id of the vision-language tokenizer (the text one's ids, then the markers)."""
    return vocab(VL_SPECIAL_TOKENS)


def mrope_section(head_dim: int) -> list[int]:
    """Rotary frequencies given to the (time, height, width) position ids.

    The released models split the ``head_dim // 2`` frequencies 1:1.5:1.5 ([16, 24, 24] for
    head_dim 128); this keeps that ratio.
    """
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    return [half - 2 * hw, hw, hw]


def build_processor(out_dir: Path) -> None:
    """Write the tokenizer, image and video processors and chat template of ``out_dir``.

    Transformers' ``Qwen2_5_VLProcessor`` needs a video processor even for images only.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=make_tokenizer(VL_SPECIAL_TOKENS, eos_token=IM_END, chat_template=CHAT_TEMPLATE),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))


def build_vl_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Create a randomly initialised Qwen2.5-VL model plus its processor in ``out_dir``."""
    if size not in PRESETS:
        raise ValueError(f"unknown model size '{size}'; choose one of {sorted(PRESETS)}")
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = PRESETS[size]
    ids = vl_vocab()
    head_dim = shape.hidden_size // shape.num_attention_heads
    text_config = {
        "vocab_size": len(ids),
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": mrope_section(head_dim),
        },
        "bos_token_id": ids[EOS_TOKEN],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    vision_config = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_heads": VISION_HEADS,
        "out_hidden_size": shape.hidden_size,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "window_size": WINDOW_SIZE,
        "fullatt_block_indexes": [VISION_DEPTH - 1],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # A chat reply ends with <|im_end|>; <|endoftext|> stops generation too, as in the
    # released instruct models.
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[IM_END], ids[EOS_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
        bos_token_id=ids[EOS_TOKEN],
    )
    model.save_pretrained(str(out), safe_serialization=True)
    build_processor(out)
    return out


def saved_parameter_count(model_dir: str | Path) -> int:
    """Parameters stored in a model's safetensors files, read from their headers only.

    Tied weights are stored once, so this equals the model's distinct parameters.
    """
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= int(dim)
            total += count
    return total
