"""``mapo bench inference``: rollout tokens/s through the service vs the bare engine.

``--vl`` measures the vision-language path: a tiny Qwen2.5-VL, the built-in shapes task's
pictures (one per prompt, 4 patch tokens each), direct ``LLM.generate`` with the pictures as
``multi_modal_data`` against ``/v1/chat/completions`` with the same pictures as data URLs (the
service renders the chat template and decodes the pictures for each request).

Both sides run the same prompts with the same engine arguments (:func:`engine_kwargs`), the
same sampling parameters, seeds and ``ignore_eos``, so they generate exactly the same tokens,
and both produce what a rollout needs (text, token ids, the sampled tokens' log-probs):

* direct: ``vllm.LLM.generate`` on all prompts at once, in a child process of its own;
* service: ``mapo inference serve`` as a child process, one HTTP completions request per prompt
  (n = G, log-probs of the sampled tokens), all in flight together, as a rollout client sends.

Each side first runs one untimed round (vLLM's first generation with log-probs pays a one-off
cost), then ``--rounds`` timed rounds, alternating direct and service rounds so that a change in
background load hits both alike; the median round of each is reported, as tokens per wall-clock
second and as tokens per CPU-second of the processes involved (the service's main process and
its engine core; the HTTP client is not counted). On a busy machine the CPU figure is the
steadier measure of what the service adds. Both engines stay loaded, but only one generates at
a time (an idle vLLM engine waits without using the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.core.config import RunConfig


def make_prompts(count: int) -> list[str]:
    """Arithmetic prompts like the built-in task's (``ab+cd=``), deterministic."""
    return [f"{10 + (7 * i) % 90}+{10 + (13 * i) % 90}=" for i in range(count)]


def make_vl_prompts(count: int) -> tuple[list[str], list[str]]:
    """The shapes task's first ``count`` questions and their pictures (base64 PNG)."""
    import base64

    from services.core.tasks import load_builtin

    examples = load_builtin("shapes", 0).train[:count]
    return [e.prompt for e in examples], [base64.b64encode(e.images[0]).decode() for e in examples]


def _engine_prompts(spec: dict[str, Any], tokenizer: Any) -> list[Any]:
    """What the direct engine is given: the prompts, or for ``--vl`` each question rendered with
    the chat template beside its decoded picture."""
    if not spec.get("images"):
        return list(spec["prompts"])
    import base64

    from services.core.images import ImageLimits, decode_image
    from services.core.prompts import PromptFormat

    fmt = PromptFormat.for_tokenizer(tokenizer)
    return [
        {
            "prompt": fmt.render(text, 1),
            "multi_modal_data": {"image": [decode_image(base64.b64decode(b64), ImageLimits())]},
        }
        for text, b64 in zip(spec["prompts"], spec["images"], strict=True)
    ]


def _direct_worker(model: str, spec: dict[str, Any], config: RunConfig) -> None:
    """Serve timed ``LLM.generate`` rounds on request (runs in the child process).

    Prints ``ready``, then one JSON line per line read from stdin.
    """
    from services.inference.engine import apply_cpu_defaults, engine_kwargs
    from services.inference.generation import never_sample
    from services.models.arch import placeholder_ids

    # vLLM logs to stdout: keep the real stdout for the protocol, send everything else to stderr.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    apply_cpu_defaults(config.inference.cpu_threads)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(config, model, on_cuda=False))
    tokenizer = llm.get_tokenizer()
    prompts = _engine_prompts(spec, tokenizer)
    never = placeholder_ids(tokenizer) if spec.get("images") else frozenset()
    params = [
        SamplingParams(
            n=spec["group_size"],
            max_tokens=spec["max_tokens"],
            temperature=spec.get("temperature", 1.0),
            top_p=spec.get("top_p", 1.0),
            logprobs=0,
            # No per-request seed with pictures: vLLM 0.32's CPU runner crashes rewinding a
            # seeded generator when it splits a long prompt's prefill ("CPU Generator does not
            # use offset"). Both sides then sample freely; ignore_eos keeps the token counts.
            seed=None if spec.get("images") else i,
            ignore_eos=spec.get("ignore_eos", True),
            # What a rollout needs, as the service asks for it: flat log-probs of the sampled
            # tokens, and the text decoded once per completion.
            flat_logprobs=True,
            detokenize=False,
            # As the service samples for a vision-language model: never a picture placeholder.
            logit_bias=never_sample(never),
        )
        for i in range(len(prompts))
    ]
    print("ready", file=protocol, flush=True)
    for _ in sys.stdin:
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        texts = [
            tokenizer.decode(c.token_ids, skip_special_tokens=True) for o in outs for c in o.outputs
        ]
        seconds = time.perf_counter() - started
        assert len(texts) == len(prompts) * spec["group_size"]
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        print(json.dumps({"tokens": tokens, "seconds": seconds}), file=protocol, flush=True)


class DirectEngine:
    """The child process that owns the direct engine."""

    def __init__(self, model: str, spec_path: Path, config: RunConfig, log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.benchmarks.inference",
                model,
                str(spec_path),
                *_config_args(config),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError(f"the direct engine did not start; see {log}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def round(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self._line()
        if not line:
            raise RuntimeError("the direct engine exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


async def _service_round(url: str, model: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One round through the HTTP API: every prompt its own request, all in flight together."""
    import httpx

    images = spec.get("images")

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> int:
        route = "completions"
        body: dict[str, Any] = {"model": model, "prompt": prompt}
        if images:
            route = "chat/completions"
            picture = {"type": "image_url", "image_url": {"url": PNG_URL + images[i]}}
            content = [picture, {"type": "text", "text": prompt}]
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
        body |= {
            "n": spec["group_size"],
            "max_tokens": spec["max_tokens"],
            "temperature": 1.0,
            "top_p": 1.0,
            "logprobs": True if images else 0,
            "seed": None if images else i,
            "ignore_eos": True,
        }
        resp = await client.post(f"{url}/v1/{route}", json=body)
        resp.raise_for_status()
        return int(resp.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=len(spec["prompts"]) + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(client, i, p) for i, p in enumerate(spec["prompts"])))
        seconds = time.perf_counter() - started
    return {"tokens": sum(counts), "seconds": seconds}


PNG_URL = "data:image/png;base64,"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of a process, and of all its descendants (the engine core)."""
    import psutil

    root = psutil.Process(pid)
    own = sum(root.cpu_times()[:2])
    children = 0.0
    for proc in root.children(recursive=True):
        try:
            children += sum(proc.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return own, children


def _median(result: dict[str, Any]) -> tuple[int, float, float]:
    """Tokens per round, median tokens per wall second, median tokens per CPU second."""
    rates = [r["tokens"] / r["seconds"] for r in result["rounds"]]
    per_cpu = [r["tokens"] / max(r["cpu_seconds"], 1e-9) for r in result["rounds"]]
    tokens = result["rounds"][0]["tokens"]
    return tokens, statistics.median(rates), statistics.median(per_cpu)


def _config_args(config: RunConfig) -> list[str]:
    return [
        "--set",
        f"model.max_model_len={config.model.max_model_len}",
        "--set",
        f"inference.kv_cache_gib={config.inference.kv_cache_gib}",
        "--set",
        f"task.seed={config.task.seed}",
        "--set",
        f"inference.cpu_threads={config.inference.cpu_threads}",
    ]


def main(args: argparse.Namespace, config: RunConfig) -> int:
    from services.inference.launcher import InferenceProcess

    work = Path(tempfile.mkdtemp(prefix="mapo-bench-inference-"))
    vl = bool(getattr(args, "vl", False))
    model = getattr(args, "model", None)
    if not model:
        from services.models.tiny import build_model
        from services.models.tiny_vl import build_vl_model

        build = build_vl_model if vl else build_model
        model = str(build(work / "model", getattr(args, "size", "tiny")))
    spec: dict[str, Any] = {
        "prompts": make_prompts(args.prompts),
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
    }
    if vl:
        spec["prompts"], spec["images"] = make_vl_prompts(args.prompts)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    kind = "vision-language prompts (one 56x56 picture each)" if vl else "prompts"
    print(
        f"{args.prompts} {kind} x G={args.group_size} x {args.max_tokens} tokens, model {model}, "
        f"{args.rounds} timed rounds after one warm-up (median reported)",
        flush=True,
    )

    direct = DirectEngine(model, spec_path, config, work / "direct.log")
    service = None
    try:
        service = InferenceProcess(model, no_bus=True, settings=_config_args(config)[1::2])
        results: dict[str, dict[str, Any]] = {"direct": {"rounds": []}, "service": {"rounds": []}}
        pids = {"direct": direct.proc.pid, "service": service.proc.pid}
        for r in range(args.rounds + 1):
            for name in ("direct", "service"):
                cpu_before = cpu_seconds(pids[name])
                if name == "direct":
                    one = direct.round()
                else:
                    one = asyncio.run(_service_round(service.url, model, spec))
                cpu_after = cpu_seconds(pids[name])
                one["cpu_main"] = cpu_after[0] - cpu_before[0]
                one["cpu_children"] = cpu_after[1] - cpu_before[1]
                one["cpu_seconds"] = one["cpu_main"] + one["cpu_children"]
                if r == 0:
                    results[name]["warmup"] = one
                else:
                    results[name]["rounds"].append(one)
    finally:
        direct.stop()
        if service is not None:
            service.stop()
    direct_result, served = results["direct"], results["service"]

    d_tokens, d_rate, d_cpu = _median(direct_result)
    s_tokens, s_rate, s_cpu = _median(served)
    for name, tokens, rate, cpu, result in (
        ("direct LLM.generate", d_tokens, d_rate, d_cpu, direct_result),
        ("service HTTP API   ", s_tokens, s_rate, s_cpu, served),
    ):
        each = ", ".join(f"{r['tokens'] / r['seconds']:,.0f}" for r in result["rounds"])
        rollouts = len(spec["prompts"]) * args.group_size * rate / max(tokens, 1)
        print(
            f"{name}: {tokens} tokens/round, {rate:,.0f} tokens/s ({rollouts:,.1f} rollouts/s), "
            f"{cpu:,.0f} tokens/CPU-s (rounds: {each}; warm-up {result['warmup']['seconds']:.1f} s)"
        )
    print(
        f"service / direct   : {s_rate / d_rate:.1%} of tokens/s, "
        f"{s_cpu / d_cpu:.1%} of tokens/CPU-s"
    )
    main_cpu = statistics.median(r["cpu_main"] for r in served["rounds"])
    core_cpu = statistics.median(r["cpu_children"] for r in served["rounds"])
    direct_cpu = statistics.median(r["cpu_seconds"] for r in direct_result["rounds"])
    print(
        f"CPU-s per round    : direct {direct_cpu:.2f}; service engine core {core_cpu:.2f} "
        f"+ HTTP/frontend process {main_cpu:.2f}"
    )
    return 0


def _child(argv: list[str]) -> int:
    """``python -m services.benchmarks.inference MODEL SPEC [--set k=v ...]``: the direct side."""
    from services.core.config import build_config

    model, spec_path, *rest = argv
    overrides = [rest[i + 1] for i in range(0, len(rest), 2)]
    config = build_config(overrides=overrides, environ=os.environ)
    _direct_worker(model, json.loads(Path(spec_path).read_text()), config)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
