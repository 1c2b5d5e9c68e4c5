"""vLLM engine construction: CPU defaults, engine arguments, and the in-place reload extension.

Both the service (``AsyncLLM``) and the direct-engine benchmark (``LLM``) build their engine from
:func:`engine_kwargs`, so a comparison between them measures the service, not two different
engine configurations.

On CPU machines vLLM (and torch's OpenMP runtime) read a few environment variables when they
are imported; :func:`apply_cpu_defaults` sets them (only those the user has not set) and must
run before the first ``import vllm`` or ``import torch``. This module imports neither vLLM nor torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.core.config import RunConfig

EXTENSION_CLS = "services.inference.engine.WeightReloadExtension"
RELOAD_METHOD = "mapo_reload_weights_file"

# Settings vLLM reads at import time. The engine core process inherits them.
CPU_ENV_DEFAULTS: dict[str, str] = {
    # The engine core runs its worker in-process instead of spawning one more process.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Without this, an in-process CPU worker pins its OpenMP threads to one core (15x slower).
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # Models are local directories; never wait on a hub that may be unreachable.
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def cuda_available() -> bool:
    """Whether a CUDA device is usable, without importing torch when no driver is installed."""
    if not (Path("/dev/nvidiactl").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def apply_cpu_defaults(threads: int = 0, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set vLLM's CPU environment defaults that are not already set; return what was set.

    ``threads`` > 0 caps the engine's OpenMP team (``OMP_NUM_THREADS``). On a machine shared
    with the service's own HTTP process, a trainer or reward workers, a team of one thread per
    core spins on descheduled threads: measured here on 2 busy cores, the tiny and small
    models generated 4-6x more tokens/s with one thread than with two.
    """
    env = os.environ if environ is None else environ
    wanted = dict(CPU_ENV_DEFAULTS)
    if threads > 0:
        wanted["OMP_NUM_THREADS"] = str(threads)
    applied = {}
    for key, value in wanted.items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied


def engine_kwargs(config: RunConfig, model: str, *, on_cuda: bool) -> dict[str, Any]:
    """Engine arguments shared by the service and the benchmark's direct engine."""
    kwargs: dict[str, Any] = {
        "model": model,
        "tokenizer": model,
        "max_model_len": config.model.max_model_len,
        "worker_extension_cls": EXTENSION_CLS,
        "seed": config.task.seed,
        "disable_log_stats": True,
        # Log-probs of the distribution the token was sampled from (after temperature and
        # top-p), the behaviour policy the trainer corrects for (docs/trainer.md).
        "logprobs_mode": "processed_logprobs",
    }
    if on_cuda:
        kwargs["dtype"] = "auto" if config.model.dtype == "auto" else config.model.dtype
        kwargs["gpu_memory_utilization"] = config.inference.gpu_memory_utilization
    else:
        # float32 on the CPU: the trainer computes log-probs in float32 too, and eager mode
        # with an explicit KV budget skips vLLM's warm-up and compilation.
        kwargs["dtype"] = "float32" if config.model.dtype == "auto" else config.model.dtype
        kwargs["enforce_eager"] = True
        kwargs["kv_cache_memory_bytes"] = int(config.inference.kv_cache_gib * (1 << 30))
    return kwargs


def build_async_engine(config: RunConfig, model: str) -> AsyncLLM:
    """Start vLLM's async engine (its engine core runs in a child process)."""
    on_cuda = cuda_available()
    if not on_cuda:
        apply_cpu_defaults(config.inference.cpu_threads)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**engine_kwargs(config, model, on_cuda=on_cuda))
    return AsyncLLM.from_engine_args(args)


class EngineReloader:
    """The weight manager's view of an ``AsyncLLM``: in-place reload and prefix-cache reset."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine

    async def reload_files(
        self, paths: Sequence[str], expected: Mapping[str, tuple[tuple[int, ...], str]]
    ) -> None:
        shapes = {name: list(shape) for name, (shape, _dtype) in expected.items()}
        await self.engine.collective_rpc(RELOAD_METHOD, args=(list(paths), shapes))

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()


class WeightReloadExtension:
    """Mixed into vLLM's worker class: reloads weights in place from safetensors files.

    It runs inside the engine core process, so the caller passes paths, never tensors (those
    cannot cross the process boundary). The weights go through the model's own
    ``load_weights`` via vLLM's ``reload_weights``: writing a parameter directly would not reach
    the packed copies the CPU backend computes with. A tensor name the model does not know
    would kill the engine halfway through, so the files' headers are checked against the
    served checkpoint's names and shapes before any weight is touched.
    """

    def mapo_reload_weights_file(self, paths: list[str], shapes: dict[str, list[int]]) -> int:
        """Load every tensor of ``paths`` into the running model; return how many were loaded."""
        from contextlib import ExitStack

        from safetensors import safe_open

        with ExitStack() as stack:
            files = [stack.enter_context(safe_open(p, framework="pt", device="cpu")) for p in paths]
            names = [(fh, list(fh.keys())) for fh in files]
            found = {name: list(fh.get_slice(name).get_shape()) for fh, ns in names for name in ns}
            if found != shapes:
                wrong = sorted(set(found) ^ set(shapes)) or sorted(
                    n for n in found if found[n] != shapes.get(n)
                )
                raise ValueError(f"weights do not fit the served model: {wrong[:5]}")
            weights = ((name, fh.get_tensor(name)) for fh, ns in names for name in ns)
            reload = self.reload_weights  # type: ignore[attr-defined]
            reload(weights_iterator=weights, is_checkpoint_format=True)
        self._mapo_refresh_tied_head()
        return len(found)

    def _mapo_refresh_tied_head(self) -> None:
        """Rebuild the output head's kernel after its tied embedding changed.

        A checkpoint with tied embeddings has no ``lm_head.weight``, so the reload copies the new
        embedding into the shared storage but never reprocesses the head. On the CPU the head
        computes with a packed copy made at load time, which would keep the old values.
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        # A vision-language model keeps its head and embedding in its language model.
        model = getattr(model, "language_model", model)
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or not hasattr(head, "weight"):
            return
        if head.weight.data_ptr() != embed.weight.data_ptr():
            return
        quant_method = getattr(head, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(head)
