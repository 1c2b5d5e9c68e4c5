"""The trainer's torch side: policy, frozen reference, optimiser, and the calls the loop makes.

Precision: parameters and AdamW moments are always float32. On CUDA the forward passes run
under bfloat16 autocast (``model.dtype`` auto or bfloat16): pure-bf16 weights would round away
updates of the paper's size (lr 1e-6 on weights of ~1e-2 is below bf16's resolution). The
reference model, which only ever runs forward, is kept in bfloat16 on CUDA. On the CPU
everything is float32. Published weights are cast to the serving dtype: bfloat16 on CUDA,
float32 on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.core.config import RunConfig
from services.core.schedule import lr_at
from services.core.schemas import ScoredGroup
from services.core.tasks import Example
from services.trainer import checkpoint as ckpt
from services.trainer.batch import collate
from services.trainer.evaluation import EvalResult, evaluate
from services.trainer.step import StepResult, train_step
from services.trainer.timing import PhaseTimer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but CUDA is not available; use cpu or auto")
    return device


def precision(config: RunConfig, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, serving dtype) for ``model.dtype`` on ``device``."""
    wanted = config.model.dtype
    if wanted == "float16":
        raise ValueError(
            "model.dtype=float16 is not supported for training (it needs loss scaling); "
            "use bfloat16 or float32"
        )
    if wanted == "bfloat16" or (wanted == "auto" and device.type == "cuda"):
        return torch.bfloat16, torch.bfloat16
    return None, torch.float32


def load_causal_lm(path: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


@dataclass
class Learner:
    """The policy being trained and everything else that holds tensors; every method blocks (the loop calls them in a thread)."""

    config: RunConfig
    model: nn.Module
    ref_model: nn.Module | None
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    amp_dtype: torch.dtype | None
    device: torch.device
    serve_dtype: torch.dtype
    generator: torch.Generator
    pad_id: int
    vocab_size: int

    @classmethod
    def build(cls, config: RunConfig, weights_from: str | Path | None = None) -> Learner:
        """The policy from ``weights_from`` (a checkpoint's model dir) or ``model.path``."""
        from transformers import AutoTokenizer

        device = resolve_device(config.trainer.device)
        amp_dtype, serve_dtype = precision(config, device)
        torch.manual_seed(config.trainer.seed)
        model = load_causal_lm(weights_from or config.model.path, device, torch.float32)
        model.eval()  # no dropout in RL updates; gradients flow all the same
        ref = None
        if config.algorithm.kl_coef > 0.0:
            ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            ref = load_causal_lm(config.model.path, device, ref_dtype).eval()
            ref.requires_grad_(False)
        o = config.optim
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=o.betas,
            weight_decay=o.weight_decay,
        )
        tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        pad = tokenizer.pad_token_id
        pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        generator = torch.Generator().manual_seed(config.trainer.seed)
        vocab = int(model.config.vocab_size)  # type: ignore[union-attr,arg-type]
        return cls(
            config=config,
            model=model,
            ref_model=ref,
            optimizer=optimizer,
            tokenizer=tokenizer,
            amp_dtype=amp_dtype,
            device=device,
            serve_dtype=serve_dtype,
            generator=generator,
            pad_id=pad_id,
            vocab_size=vocab,
        )

    def set_step(self, step: int) -> float:
        """Set the optimiser's rate for 0-based step ``step`` from the schedule; returns it."""
        o = self.config.optim
        lr = lr_at(
            step,
            self.config.trainer.steps,
            o.lr,
            o.schedule,
            warmup_steps=o.warmup_steps,
            min_lr_ratio=o.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train(
        self,
        groups: Sequence[ScoredGroup],
        staleness: Mapping[str, int],
        corrected: frozenset[str],
    ) -> StepResult:
        """Collate ``groups`` and apply them in one step; adds timing and token counts.

        ``compute_s`` is the whole call; ``collate_s`` (padding, host to device) and the step's
        own phases (:func:`train_step`) are parts of it.
        """
        start = time.perf_counter()
        timer = PhaseTimer(self.device)
        with timer.phase("collate"):
            batch = collate(
                groups,
                pad_id=self.pad_id,
                max_len=self.config.model.max_model_len,
                staleness=staleness,
                correct=corrected,
            ).to(self.device)
        result = train_step(
            self.model,
            self.optimizer,
            batch,
            self.config,
            amp_dtype=self.amp_dtype,
            ref_model=self.ref_model,
            generator=self.generator,
            timer=timer,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        result.metrics["compute_s"] = seconds
        result.metrics["tokens_per_s"] = batch.tokens / seconds if seconds > 0 else None
        return result

    def evaluate(self, examples: Sequence[Example]) -> EvalResult:
        return evaluate(
            self.model,
            self.tokenizer,
            examples,
            max_new_tokens=self.config.rollout.max_tokens,
        )

    def save(self, run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
        return ckpt.save_checkpoint(
            run_dir,
            step,
            state,
            self.model,
            self.optimizer,
            tokenizer=self.tokenizer,
            generator=self.generator,
        )

    def restore(self, path: str | Path) -> dict[str, Any]:
        """Optimiser moments and RNGs from a checkpoint (the weights came in with ``build``)."""
        return ckpt.load_training_state(path, self.model, self.optimizer, generator=self.generator)
