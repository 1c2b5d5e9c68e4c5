"""The pictures of vision-language groups, as the trainer's forward pass needs them.

The engine rendered each prompt with its images: ``prompt_token_ids`` hold one placeholder
token per merged image patch. The trainer runs the same pictures through the model's processor
(pixel values and, for Qwen2.5-VL, the grid of patches per image, from which the model derives
its multimodal rotary positions) and checks that the processor expands the prompt into exactly
the engine's tokens: a mismatch means the pictures are not the ones the rollouts saw, and the
group is dead-lettered, never trained on.

All rows of a group share its prompt and pictures, so the processor runs once per group;
:class:`RowVision` hands each micro-batch the pixel values of its rows, in row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from services.core.images import ImageError, ImageLimits, decode_image
from services.models.arch import placeholder_ids


def token_types(model_config: Any, input_ids: Tensor) -> Tensor:
    """Which tokens stand for picture (1) and video (2) patches: Qwen2.5-VL gives those its
    3-D (time, height, width) rotary positions only when told (``mm_token_type_ids``); without
    them the pictures silently get 1-D positions and the log-probs drift from the engine's."""
    image = getattr(model_config, "image_token_id", None)
    video = getattr(model_config, "video_token_id", None)
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    if image is not None:
        types = types + (input_ids == image).int()
    if video is not None:
        types = types + 2 * (input_ids == video).int()
    return types


@dataclass(frozen=True)
class GroupVision:
    """The processor's outputs for one group's pictures."""

    pixel_values: Tensor  # [patches, channels * temporal * patch * patch]
    image_grid_thw: Tensor  # long [images, 3]

    def to(self, device: torch.device | str) -> GroupVision:
        return GroupVision(self.pixel_values.to(device), self.image_grid_thw.to(device))


@dataclass(frozen=True)
class RowVision:
    """Per-row access to the groups' pictures: ``groups[row_group[i]]`` is row i's (or None)."""

    groups: tuple[GroupVision | None, ...]
    row_group: Tensor  # long [rows]

    def subset(self, rows: Tensor) -> RowVision:
        return RowVision(self.groups, self.row_group[rows])

    def kwargs(self) -> dict[str, Tensor]:
        """``pixel_values`` and ``image_grid_thw`` of these rows (empty when none has images)."""
        parts = [self.groups[int(g)] for g in self.row_group.tolist()]
        present = [p for p in parts if p is not None]
        if not present:
            return {}
        return {
            "pixel_values": torch.cat([p.pixel_values for p in present]),
            "image_grid_thw": torch.cat([p.image_grid_thw for p in present]),
        }


class VisionProcessor:
    """The model's processor, for groups: pictures to pixel values, checked against the prompt."""

    def __init__(self, processor: Any, limits: ImageLimits) -> None:
        self.processor = processor
        self.limits = limits
        self.vision_token_ids = placeholder_ids(processor.tokenizer)

    @classmethod
    def load(cls, model_dir: str, limits: ImageLimits) -> VisionProcessor:
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(model_dir), limits)

    def problem(self, completions: Sequence[Sequence[int]]) -> str | None:
        """Why completions cannot be trained on: a vision token in one (the forward pass would
        look for a picture that is not there)."""
        for i, ids in enumerate(completions):
            if self.vision_token_ids.intersection(int(t) for t in ids):
                return f"rollout {i} generated a vision special token"
        return None

    def prepare(
        self, prompt: str, prompt_token_ids: Sequence[int], images: Sequence[bytes]
    ) -> GroupVision:
        """Pixel values of ``images``; raises :class:`ImageError` (with the reason) when a
        picture cannot be decoded or the prompt does not expand to ``prompt_token_ids``."""
        pictures = [decode_image(data, self.limits, f"image {i}") for i, data in enumerate(images)]
        out = self.processor(text=[prompt], images=pictures, return_tensors="pt")
        expanded = out["input_ids"][0].tolist()
        if expanded != [int(t) for t in prompt_token_ids]:
            raise ImageError(
                f"the prompt with its {len(pictures)} image(s) expands to {len(expanded)} "
                f"tokens, not the {len(prompt_token_ids)} the rollouts were generated from"
            )
        return GroupVision(
            out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.long)
        )
