"""Build small Qwen2-architecture models and a character tokenizer offline.

Tests, benchmarks and the built-in demo need a real model that vLLM and transformers both load,
with no download. The tokenizer is character-level over printable ASCII: every string a test or
the arithmetic task uses round-trips exactly, and the vocabulary stays tiny, so the embedding
does not dominate small models.
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.models.arch import QWEN2, QWEN2_5_VL, is_vision_language

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from services.core.config import RunConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n\t"


@dataclass(frozen=True)
class ModelShape:
    """Qwen2 dimensions of one preset."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512


PRESETS: dict[str, ModelShape] = {
    # ~0.13M parameters: unit and integration tests (head_dim 32: vLLM's CPU attention needs >= 32).
    "tiny": ModelShape(64, 2, 2, 1, 256),
    # ~1.1M parameters: the built-in arithmetic demo. Warm-starts in as many steps as "small"
    # at a fifth of the compute per step, and leaves the cores to the pipeline in RL.
    "mini": ModelShape(128, 4, 4, 4, 512),
    # ~4.2M parameters: benchmarks of a small model.
    "small": ModelShape(256, 4, 4, 4, 1024),
    # ~69M parameters: benchmarks of a mid-sized model on the CPU.
    "50m": ModelShape(768, 8, 12, 4, 3072, 1024),
    # The body of Qwen2.5-0.5B (24 layers, 896 hidden, GQA 14/2): GPU checks.
    "0.5b": ModelShape(896, 24, 14, 2, 4864, 2048),
    # The body of Qwen2.5-1.5B (28 layers, 1536 hidden, GQA 12/2), ~1.3B parameters: GPU checks.
    "1.5b": ModelShape(1536, 28, 12, 2, 8960, 2048),
}


def vocab(extra_special_tokens: Sequence[str] = ()) -> dict[str, int]:
    """Token -> id: the special tokens first, then one token per character, then any extras.

    Extras go last so that a model with more special tokens (the vision-language build) keeps
    the character ids of the text-only one.
    """
    tokens = list(SPECIAL_TOKENS) + list(CHARS) + list(extra_special_tokens)
    return {tok: i for i, tok in enumerate(tokens)}


def make_tokenizer(
    extra_special_tokens: Sequence[str] = (),
    *,
    eos_token: str = EOS_TOKEN,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A fast character-level tokenizer that vLLM and HF load, once saved.

    ``extra_special_tokens`` are added as whole special tokens (each encodes to one id and is
    never split into characters), e.g. the chat and vision markers of a vision-language model.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # BPE with no merges and no pre-tokenizer splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab(extra_special_tokens), merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS) + list(extra_special_tokens))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos_token,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=PRESETS["0.5b"].max_position_embeddings,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_tokenizer(out_dir: Path) -> None:
    """Write the text models' tokenizer (tokenizer.json) to ``out_dir``."""
    make_tokenizer().save_pretrained(str(out_dir))


def build_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Create a randomly initialised Qwen2ForCausalLM plus tokenizer in ``out_dir``."""
    if size not in PRESETS:
        raise ValueError(f"unknown model size '{size}'; choose one of {sorted(PRESETS)}")
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = PRESETS[size]
    ids = vocab()
    config = Qwen2Config(
        vocab_size=len(ids),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=ids[EOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN], bos_token_id=ids[EOS_TOKEN]
    )
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(out)
    return out


def parameter_count(model_dir: str | Path) -> int:
    """Parameters of a saved model, read from its config (no weights loaded)."""
    if is_vision_language(model_dir):
        from services.models.tiny_vl import saved_parameter_count

        return saved_parameter_count(model_dir)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = h // heads
    attn = h * h * 2 + 2 * h * kv * head_dim + h + 2 * kv * head_dim
    mlp = 3 * h * inter
    return int(cfg["vocab_size"] * h + layers * (attn + mlp + 2 * h) + h)


def cli_make_model(args: argparse.Namespace, config: RunConfig) -> int:
    """``mapo make-model DIR [--size tiny] [--arch qwen2|qwen2_5_vl]``."""
    arch = getattr(args, "arch", QWEN2)
    if arch == QWEN2_5_VL:
        from services.models.tiny_vl import build_vl_model

        out = build_vl_model(args.dir, args.size, args.seed)
    else:
        out = build_model(args.dir, args.size, args.seed)
    print(f"wrote {args.size} {arch} model ({parameter_count(out):,} parameters) to {out}")
    return 0
