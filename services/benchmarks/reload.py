"""``mapo bench reload``: in-place weight reload latency against copying the same bytes.

For each model preset: build the model, write ``--repeats`` perturbed versions into a weight
store (as the trainer does; not timed), start vLLM's async engine, and load each version
through the service's own path (:class:`WeightManager`: verify manifest and sha256, check names
and shapes, reload in place through the worker extension, reset the prefix cache). The engine
is idle, so no generation has to drain first.

The yardsticks, on the same machine and the same bytes: a plain memory copy of the weight
file's bytes, and ``torch.clone`` of every tensor of the state dict. Medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from services.core.config import RunConfig


def copy_baselines(weights_file: Path, repeats: int) -> dict[str, float]:
    """Median seconds to copy the file's bytes in memory (into a fresh buffer, which pays the
    page faults of new memory as a reload's fresh tensors do, and into a buffer already
    touched: pure bandwidth), and to ``torch.clone`` every tensor."""
    import numpy as np
    from safetensors.torch import load_file

    raw = np.frombuffer(weights_file.read_bytes(), dtype=np.uint8)
    warm = np.empty_like(raw)
    warm[:] = 1
    state = load_file(str(weights_file))
    fresh_s, warm_s, clone_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        copied = raw.copy()
        fresh_s.append(time.perf_counter() - started)
        del copied
        started = time.perf_counter()
        np.copyto(warm, raw)
        warm_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        cloned = {k: v.clone() for k, v in state.items()}
        clone_s.append(time.perf_counter() - started)
        del cloned
    return {
        "memcpy_s": statistics.median(fresh_s),
        "memcpy_warm_s": statistics.median(warm_s),
        "clone_s": statistics.median(clone_s),
    }


def write_versions(model_dir: Path, store: Path, count: int) -> list[tuple[int, str]]:
    """Versions 1..count with perturbed weights; returns (version, manifest sha256) pairs."""
    import torch
    from safetensors.torch import load_file

    from services.weights.store import write_version

    base = load_file(str(model_dir / "model.safetensors"))
    out = []
    for version in range(1, count + 1):
        gen = torch.Generator().manual_seed(version)
        tensors = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        _, sha = write_version(store, version, tensors, step=version, keep=count + 1)
        out.append((version, sha))
    return out


async def time_reloads(
    config: RunConfig, model_dir: Path, store: Path, versions: list[tuple[int, str]]
) -> list[dict[str, float]]:
    """Load every version into a fresh engine through the service's reload path."""
    from services.inference.engine import EngineReloader, build_async_engine
    from services.inference.reload import Candidate, WeightManager

    holder: dict[str, Any] = {}
    # Not returned from the thread: the executor's finished work item would keep it alive.
    await asyncio.to_thread(
        lambda: holder.update(engine=build_async_engine(config, str(model_dir)))
    )
    engine = holder.pop("engine")
    try:
        manager = WeightManager(EngineReloader(engine), model_dir, store=str(store))
        timings = []
        for version, sha in versions:
            started = time.perf_counter()
            await manager.apply(Candidate(version, str(store), sha))
            total = time.perf_counter() - started
            timings.append({**manager.last_timing, "total_s": total})
        return timings
    finally:
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await asyncio.to_thread(engine.shutdown)


def bench_size(size: str, repeats: int, config: RunConfig, work: Path) -> dict[str, Any]:
    from services.models.tiny import build_model, parameter_count

    model_dir = build_model(work / size, size)
    store = work / f"{size}-store"
    versions = write_versions(model_dir, store, repeats)
    weights = store / f"v{versions[0][0]:08d}" / "model.safetensors"
    timings = asyncio.run(time_reloads(config, model_dir, store, versions))
    gc.collect()  # let the engine object go while vLLM's modules are still loaded
    # The first reload pays one-off costs (imports, first oneDNN repack): report it apart.
    steady = timings[1:] or timings
    result: dict[str, Any] = {
        "size": size,
        "params": parameter_count(model_dir),
        "bytes": weights.stat().st_size,
        "first_total_s": timings[0]["total_s"],
        **{k: statistics.median(t[k] for t in steady) for k in ("verify_s", "reload_s", "total_s")},
        **copy_baselines(weights, repeats),
    }
    return result


def main(args: argparse.Namespace, config: RunConfig) -> int:
    from services.inference.engine import apply_cpu_defaults, cuda_available

    if not cuda_available():
        apply_cpu_defaults(config.inference.cpu_threads)  # before torch is imported
    work = Path(tempfile.mkdtemp(prefix="mapo-bench-reload-"))
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    repeats = max(args.repeats, 2)
    print(
        f"in-place reload through the service path (verify + reload), median of "
        f"{repeats - 1} reloads after the first; yardsticks: memory copy of the same bytes",
        flush=True,
    )
    for size in sizes:
        r = bench_size(size, repeats, config, work)
        mib = r["bytes"] / (1 << 20)
        print(
            f"{r['size']:>5}: {r['params']:,} params, {mib:.1f} MiB\n"
            f"       service path: verify {r['verify_s'] * 1e3:.1f} ms + in-place reload "
            f"{r['reload_s'] * 1e3:.1f} ms = {r['total_s'] * 1e3:.1f} ms "
            f"(first reload {r['first_total_s'] * 1e3:.1f} ms)\n"
            f"       same bytes: memcpy to new memory {r['memcpy_s'] * 1e3:.2f} ms, "
            f"to touched memory {r['memcpy_warm_s'] * 1e3:.2f} ms "
            f"({mib / 1024 / r['memcpy_warm_s']:.1f} GiB/s), "
            f"torch clone {r['clone_s'] * 1e3:.2f} ms\n"
            f"       reload total / memcpy to new memory: {r['total_s'] / r['memcpy_s']:.1f}x",
            flush=True,
        )
    return 0
