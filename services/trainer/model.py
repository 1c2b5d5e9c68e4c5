"""The trainer's torch side: policy, frozen reference, optimiser, and the calls the loop makes.

Precision: parameters and AdamW moments are always float32. On CUDA the forward passes run
under bfloat16 autocast (``model.dtype`` auto or bfloat16): pure-bf16 weights would round away
updates of the paper's size (lr 1e-6 on weights of ~1e-2 is below bf16's resolution). The
reference model, which only ever runs forward, is kept in bfloat16 on CUDA. On the CPU
everything is float32. Published weights are cast to the serving dtype: bfloat16 on CUDA,
float32 on the CPU.

Under torchrun (several ranks, :mod:`services.trainer.distributed`) the policy and the
reference are sharded with FSDP2; the float32 shards are the master weights and the passes
gather them in the compute dtype instead of autocasting. Rank 0 calls these methods as a single
process does; each method that needs every rank first tells the others (:func:`follow` is their
side), so the run loop is the same for one rank or many.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from services.core.config import RunConfig
from services.core.images import limits_of
from services.core.prompts import PromptFormat
from services.core.schedule import lr_at
from services.core.schemas import ScoredGroup
from services.core.tasks import Example
from services.trainer import checkpoint as ckpt
from services.trainer import distributed
from services.trainer.batch import TrainBatch, collate
from services.trainer.distributed import Op, Topology
from services.trainer.evaluation import EvalResult, evaluate
from services.trainer.step import StepResult, train_step
from services.trainer.timing import PhaseTimer
from services.trainer.vision import GroupVision, VisionProcessor

if TYPE_CHECKING:
    from services.weights.publish import WeightPublisher

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
    """A causal LM, or a vision-language model (image-text-to-text) when the config has a
    vision tower."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from services.models.arch import is_vision_language

    auto = AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM
    model: nn.Module = auto.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a vision-language model (``visual`` in Qwen2-VL-style models)."""
    for owner in (model, getattr(model, "model", None)):
        tower = getattr(owner, "visual", None)
        if isinstance(tower, nn.Module):
            return tower
    return None


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
    topology: Topology = field(default_factory=Topology)
    step: int = 0
    #: The processor of a vision-language policy; None for a text model.
    vision: VisionProcessor | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)

    @classmethod
    def build(cls, config: RunConfig, weights_from: str | Path | None = None) -> Learner:
        """The policy from ``weights_from`` (a checkpoint's model dir) or ``model.path``."""
        from transformers import AutoTokenizer

        topology = distributed.current()
        topology.tell(Op.BUILD, text=str(weights_from or ""))
        sharded = topology.distributed
        device = topology.device if sharded else resolve_device(config.trainer.device)
        amp_dtype, serve_dtype = precision(config, device)
        torch.manual_seed(config.trainer.seed)
        # Sharded: loaded on the CPU, each rank's shards then moved to its device.
        load_on = torch.device("cpu") if sharded else device
        model = load_causal_lm(weights_from or config.model.path, load_on, torch.float32)
        model.eval()  # no dropout in RL updates; gradients flow all the same
        tower = vision_tower(model)
        if tower is not None and sharded:
            raise ValueError(
                "sharded training (trainer.nproc > 1) of a vision-language model is not "
                "supported yet; train it with trainer.nproc = 1"
            )
        if tower is not None and config.trainer.freeze_vision:
            tower.requires_grad_(False)
        if config.trainer.activation_checkpointing:
            distributed.checkpoint_activations(model)
        ref = None
        if config.algorithm.kl_coef > 0.0:
            ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            ref = load_causal_lm(config.model.path, load_on, ref_dtype).eval()
            ref.requires_grad_(False)
        if sharded:
            # The shards are gathered in the compute dtype: no autocast on top.
            model = distributed.shard_model(model, topology, compute_dtype=amp_dtype)
            if ref is not None:
                ref = distributed.shard_model(ref, topology)
            amp_dtype = None
        o = config.optim
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=o.betas,
            weight_decay=o.weight_decay,
        )
        tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        vision = None
        if tower is not None:
            vision = VisionProcessor.load(config.model.path, limits_of(config))
        pad = tokenizer.pad_token_id
        pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        generator = torch.Generator().manual_seed(config.trainer.seed)
        text_config = getattr(model.config, "text_config", None) or model.config
        vocab = int(text_config.vocab_size)
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
            topology=topology,
            vision=vision,
            prompt_format=PromptFormat.for_tokenizer(tokenizer, config.model.chat_template),
        )

    def set_step(self, step: int) -> float:
        """Set the optimiser's rate for 0-based step ``step`` from the schedule; returns it."""
        self.step = step
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
        vision: Mapping[str, GroupVision] | None = None,
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
                vision=vision,
                never=self.vision.vision_token_ids if self.vision is not None else (),
            )
        return self.train_on(batch, timer, start)

    def train_on(
        self, batch: TrainBatch, timer: PhaseTimer | None = None, start: float | None = None
    ) -> StepResult:
        """One step on a collated batch; rank 0 of several first sends it to the others (whose
        :func:`follow` receives it and calls this too)."""
        start = time.perf_counter() if start is None else start
        timer = timer or PhaseTimer(self.device)
        with timer.phase("collate"):
            if self.topology.distributed and self.topology.leader:
                self.topology.tell(Op.TRAIN, number=self.step)
                self.topology.share_batch(batch)
            batch = batch.to(self.device)
        result = train_step(
            self.model,
            self.optimizer,
            batch,
            self.config,
            amp_dtype=self.amp_dtype,
            ref_model=self.ref_model,
            generator=self.generator,
            timer=timer,
            shard=self.topology.shard(),
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        result.metrics.update(self._token_kinds(batch))
        result.metrics["compute_s"] = seconds
        result.metrics["tokens_per_s"] = batch.tokens / seconds if seconds > 0 else None
        return result

    def _token_kinds(self, batch: TrainBatch) -> dict[str, float | None]:
        """Tokens per sequence: the prompt's text and picture patches, and the response."""
        rows = max(batch.size, 1)
        prompt = float(batch.attention_mask.sum()) - batch.response_tokens
        image_id = getattr(self.model.config, "image_token_id", None)
        images = float((batch.input_ids == image_id).sum()) if image_id is not None else 0.0
        return {
            "prompt_text_tokens_per_seq": (prompt - images) / rows,
            "image_tokens_per_seq": images / rows,
            "response_tokens_per_seq": batch.response_tokens / rows,
        }

    def evaluate(self, examples: Sequence[Example]) -> EvalResult:
        """Greedy held-out accuracy (every rank decodes the same examples, in step)."""
        if self.topology.distributed:
            self.topology.tell(Op.EVAL, text=json.dumps([dataclasses.asdict(e) for e in examples]))
        result = evaluate(
            self.model,
            self.tokenizer,
            examples,
            max_new_tokens=self.config.rollout.max_tokens,
            prompt_format=self.prompt_format,
            processor=None if self.vision is None else self.vision.processor,
        )
        distributed.release(self.model)
        return result

    def save(self, run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
        """A checkpoint of ``step``: one process's format, or every rank's shards."""
        if self.topology.distributed:
            return ckpt.save_sharded_checkpoint(
                run_dir,
                step,
                state,
                self.model,
                self.optimizer,
                announce=lambda tmp: self.topology.tell(Op.SAVE, text=str(tmp)),
                generator=self.generator,
            )
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
        """Optimiser moments and RNGs from a checkpoint; the weights too from a sharded one
        (those of a single process's checkpoint came in with ``build``)."""
        self.topology.tell(Op.RESTORE, text=str(path))
        return ckpt.load_training_state(path, self.model, self.optimizer, generator=self.generator)

    def publish(self, publisher: WeightPublisher, version: int, step: int) -> tuple[str, str]:
        """Write the policy as ``version`` (rank 0; the other ranks help gather the shards)."""
        self.topology.tell(Op.PUBLISH)
        weights = distributed.full_state(self.model) if self.topology.distributed else self.model
        return publisher.write(weights, version, step)

    def close(self) -> None:
        """Rank 0: let the other ranks go (they exit 0)."""
        self.topology.tell(Op.STOP)


def follow(config: RunConfig) -> int:
    """A follower's whole life: do what rank 0 says, with the same learner calls, until STOP.

    Signals to stop are left to rank 0, which checkpoints (with every rank) before it sends STOP.
    """
    topology = distributed.current()
    distributed.ignore_stop_signals()
    learner: Learner | None = None
    while True:
        command = topology.listen()
        if command.op is Op.STOP:
            return 0
        if command.op is Op.BUILD:
            learner = Learner.build(config, weights_from=command.text or None)
            continue
        assert learner is not None, f"{command.op.name} before BUILD"
        if command.op is Op.RESTORE:
            learner.restore(command.text)
        elif command.op is Op.TRAIN:
            learner.set_step(command.number)
            learner.train_on(topology.share_batch(None))
        elif command.op is Op.EVAL:
            learner.evaluate([Example(**e) for e in json.loads(command.text)])
        elif command.op is Op.SAVE:
            ckpt.write_shards(Path(command.text), learner.model, learner.optimizer)
        elif command.op is Op.PUBLISH:
            distributed.full_state(learner.model)
