"""Rendering a task's prompt for the model: its chat template, with a place for every image.

A dataset holds what the user asks (``Example.prompt``) and the pictures shown with it. What the
model reads is that question rendered with its chat template (``model.chat_template = "auto"``):
an instruct or vision-language model expects its conversation markers, and a user must not have
to pre-render prompts by hand. One :class:`PromptFormat` renders for the trainer's prompts, its
evaluation and ``mapo eval``, so training and evaluation show the model the same text. A
tokenizer without a chat template (the built-in text demo's) leaves prompts as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.core.tasks import Example


class PromptFormatError(ValueError):
    """A prompt that cannot be rendered for this model (images without a chat template)."""


@dataclass(frozen=True)
class PromptFormat:
    """``template``: an object with ``apply_chat_template`` (a tokenizer or processor), or
    None to use prompts as they are."""

    template: Any | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, mode: str = "auto") -> PromptFormat:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        return cls(tokenizer if mode == "auto" and has_template else None)

    @classmethod
    def load(cls, model_dir: str | Path, mode: str = "auto") -> PromptFormat:
        from transformers import AutoTokenizer

        return cls.for_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)), mode)

    @property
    def chat(self) -> bool:
        return self.template is not None

    def render_example(self, example: Example) -> str:
        """An example as the model reads it: its conversation when it brings one, else one
        user turn with its pictures and question."""
        if not example.messages:
            return self.render(example.prompt, len(example.images))
        if self.template is None:
            raise PromptFormatError(
                "a chat-style example needs the model's chat template; this model has none "
                "(or model.chat_template is off)"
            )
        rendered: str = self.template.apply_chat_template(
            json.loads(example.messages), tokenize=False, add_generation_prompt=True
        )
        return rendered

    def render(self, text: str, images: int = 0) -> str:
        """One user turn holding ``images`` pictures then ``text``, ready for the reply."""
        if self.template is None:
            if images:
                raise PromptFormatError(
                    f"a prompt with {images} image(s) needs the model's chat template to place "
                    "them; this model has none (or model.chat_template is off)"
                )
            return text
        content: str | list[dict[str, str]] = text
        if images:
            content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        rendered: str = self.template.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return rendered
