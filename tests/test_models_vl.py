"""The tiny Qwen2.5-VL build: transformers loads and runs it, vLLM serves it, and the two agree on
the log-probs of tokens sampled from an image prompt (what the trainer's recompute relies on).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.models.arch import is_vision_language
from services.models.tiny import vocab
from services.models.tiny_vl import IM_END, IM_START, VL_SPECIAL_TOKENS, vl_vocab

REPO = Path(__file__).resolve().parents[1]
# A 56x56 image is 4x4 patches of 14 pixels; the 2x2 merge leaves 4 image tokens.
IMAGE_SIZE = 56
IMAGE_TOKENS = 4
MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "12+34="}]}
]
# vLLM (CPU, float32) and transformers agreed to 4.8e-7 here once transformers is given the
# multimodal token types (see test_recompute_needs_token_types).
LOGPROB_TOL = 1e-4
KV_CACHE_BYTES = 64 << 20


def sample_image() -> Image.Image:
    """The same random RGB image in the test and in the engine's process."""
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def placeholder_ids() -> list[int]:
    """Image/video placeholders: a sampled one would not match any image features on recompute."""
    ids = vl_vocab()
    return [ids["<|image_pad|>"], ids["<|video_pad|>"]]


def test_arch_tells_vision_language_from_text(tiny_vl_model: Path, tmp_path: Path) -> None:
    assert is_vision_language(tiny_vl_model)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    assert not is_vision_language(tmp_path)


def test_vl_vocab_keeps_the_text_ids() -> None:
    text, vl = vocab(), vl_vocab()
    assert {tok: vl[tok] for tok in text} == text
    assert sorted(vl.values()) == list(range(len(vl)))
    assert len(vl) == len(text) + len(VL_SPECIAL_TOKENS)


def test_tokenizer_round_trips_and_keeps_markers_whole(tiny_vl_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_vl_model))
    ids = tok.encode("12+34=", add_special_tokens=False)
    assert len(ids) == 6 and tok.decode(ids) == "12+34="
    expected = vl_vocab()
    for marker in VL_SPECIAL_TOKENS:
        assert tok.encode(marker, add_special_tokens=False) == [expected[marker]]
    assert tok.eos_token == IM_END
    chat = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+2="}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        f"{IM_START}system\nAdd.{IM_END}\n{IM_START}user\n1+2={IM_END}\n{IM_START}assistant\n"
    )


def test_processor_expands_one_image_and_the_model_runs(tiny_vl_model: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from services.models.tiny import parameter_count

    processor = AutoProcessor.from_pretrained(str(tiny_vl_model))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"{IM_START}user\n<|vision_start|><|image_pad|><|vision_end|>12+34={IM_END}\n"
        f"{IM_START}assistant\n"
    )
    enc = processor(text=[text], images=[sample_image()], return_tensors="pt")
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == IMAGE_TOKENS
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert enc["pixel_values"].shape == (16, 3 * 2 * 14 * 14)

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vl_model)).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.config.image_token_id == processor.image_token_id
    assert parameter_count(tiny_vl_model) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(vl_vocab()))
    assert torch.isfinite(logits).all()


def test_recompute_needs_token_types(tiny_vl_model: Path) -> None:
    """Without ``mm_token_type_ids`` transformers silently gives the image 1-D positions."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_vl_model))
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[sample_image()], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vl_model)).eval()
    inputs = {k: enc[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        with_types = model(**inputs, mm_token_type_ids=enc["mm_token_type_ids"]).logits
        without = model(**inputs).logits
    assert not torch.allclose(with_types, without, atol=1e-5)


def test_cli_make_model_dispatches_on_arch(
    tiny_vl_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import services.models.tiny_vl as tiny_vl
    from services.cli import main

    calls: list[tuple[str, str, int]] = []

    def fake_build(out_dir: str, size: str = "tiny", seed: int = 0) -> Path:
        calls.append((str(out_dir), size, seed))
        return tiny_vl_model

    monkeypatch.setattr(tiny_vl, "build_vl_model", fake_build)
    out = tmp_path / "vl"
    assert main(["make-model", str(out), "--arch", "qwen2_5_vl", "--seed", "3"]) == 0
    assert calls == [(str(out), "tiny", 3)]
    assert "tiny qwen2_5_vl model (" in capsys.readouterr().out


def generate_with_vllm(model_dir: str, out_path: str) -> None:
    """Run in a child process: sample from the image prompt with the service's engine settings.

    The engine gets a process of its own so that its process group, thread settings and
    memory do not outlive the test in the pytest process.
    """
    from services.core.config import RunConfig
    from services.inference.engine import apply_cpu_defaults, engine_kwargs

    config = RunConfig()
    apply_cpu_defaults(config.inference.cpu_threads)
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    kwargs = engine_kwargs(config, model_dir, on_cuda=False)
    kwargs["kv_cache_memory_bytes"] = KV_CACHE_BYTES
    llm = LLM(**kwargs)
    banned = set(placeholder_ids())
    params = SamplingParams(
        n=4,
        max_tokens=4,
        logprobs=0,
        temperature=1.0,
        seed=0,
        allowed_token_ids=[i for i in range(len(vl_vocab())) if i not in banned],
    )
    request = {"prompt": prompt, "multi_modal_data": {"image": [sample_image()]}}
    [output] = llm.generate([request], params, use_tqdm=False)
    result = {
        "prompt_token_ids": list(output.prompt_token_ids),
        "completions": [
            {
                "token_ids": list(c.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)],
                "finish_reason": c.finish_reason,
            }
            for c in output.outputs
        ],
    }
    Path(out_path).write_text(json.dumps(result))


@pytest.mark.integration
@pytest.mark.slow
def test_vllm_samples_an_image_prompt_and_transformers_recomputes_logprobs(
    tiny_vl_model: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pytest.importorskip("vllm")
    result_path, log_path = tmp_path / "result.json", tmp_path / "engine.log"
    code = "import sys; from tests.test_models_vl import generate_with_vllm as g; g(*sys.argv[1:])"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tiny_vl_model), str(result_path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert proc.returncode == 0, log_path.read_text()[-4000:]
    result = json.loads(result_path.read_text())

    processor = AutoProcessor.from_pretrained(str(tiny_vl_model))
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[sample_image()], return_tensors="pt")
    # vLLM reports the prompt with each image's placeholder already expanded to its tokens.
    prompt_ids = result["prompt_token_ids"]
    assert prompt_ids == enc["input_ids"][0].tolist()
    assert len(result["completions"]) == 4

    ids = vl_vocab()
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vl_model)).eval()
    worst = 0.0
    for completion in result["completions"]:
        tokens = completion["token_ids"]
        assert tokens and not set(tokens) & set(placeholder_ids())
        if completion["finish_reason"] == "stop":
            assert tokens[-1] in (ids[IM_END], ids["<|endoftext|>"])
        input_ids = torch.tensor([prompt_ids + tokens])
        types = torch.zeros_like(input_ids, dtype=enc["mm_token_type_ids"].dtype)
        types[0, : len(prompt_ids)] = enc["mm_token_type_ids"][0]
        with torch.no_grad():
            logits = model(
                input_ids=input_ids,
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
                mm_token_type_ids=types,
            ).logits[0]
        # The engine sampled with the placeholders masked and reports processed log-probs.
        logits[:, placeholder_ids()] = float("-inf")
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        start = len(prompt_ids) - 1
        for j, (token, got) in enumerate(zip(tokens, completion["logprobs"], strict=True)):
            worst = max(worst, abs(logprobs[start + j, token].item() - got))
    assert worst < LOGPROB_TOL, worst
