"""Which kind of model a directory holds, read from its config.json alone.

Code that branches on text-only versus vision-language models (the inference service, the
trainer, the CLI) calls this before importing torch, transformers or vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QWEN2 = "qwen2"
QWEN2_5_VL = "qwen2_5_vl"
ARCHITECTURES = (QWEN2, QWEN2_5_VL)


def is_vision_language(model_dir: str | Path) -> bool:
    """Whether the model in ``model_dir`` has a vision tower (a ``vision_config``)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return isinstance(cfg.get("vision_config"), dict)


def image_token_id(model_dir: str | Path) -> int | None:
    """The placeholder id of one picture patch token (``image_token_id``), or None."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    value = cfg.get("image_token_id")
    return int(value) if isinstance(value, int) else None


#: Special tokens that stand for pictures and videos in Qwen2-VL-style vocabularies. A
#: completion must never hold one: the model would look for a picture that is not there.
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def placeholder_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of :data:`VISION_TOKENS` in ``tokenizer`` (those it has)."""
    unk = tokenizer.unk_token_id
    ids = (tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    return frozenset(int(i) for i in ids if i is not None and i != unk)
