"""Configuration of a whole run: one TOML file, environment overrides, dotted CLI overrides.

Every field has a default, a bound where one makes sense, and a one-line doc. The models are
pure (no I/O besides reading the file handed to :func:`load_config`), so the CLI can parse and
validate a config before importing torch or vLLM.

Precedence, lowest to highest: field defaults < TOML file < ``MAPO__SECTION__FIELD``
environment variables < ``--set section.field=value`` overrides.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "MAPO__"

EstimatorName = Literal["mapo", "grpo", "dapo", "dr_grpo", "apd", "rloo", "mapo_random_lambda"]


class _Section(BaseModel):
    """Base for every section: unknown keys are an error (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field("runs/model", description="Directory of the policy model (HF format).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype: auto is bfloat16 on CUDA, float32 on the CPU."
    )
    max_model_len: int = Field(512, ge=16, le=131072, description="Max prompt+response tokens.")
    chat_template: Literal["auto", "off"] = Field(
        "auto", description="auto: render prompts with the tokenizer's chat template if it has one."
    )


class TaskConfig(_Section):
    name: str = Field(
        "arithmetic", min_length=1, description="Task / verifier name in the registry."
    )
    dataset: str = Field(
        "builtin:arithmetic", description="JSONL/parquet path, or builtin:NAME for a built-in task."
    )
    eval_dataset: str = Field(
        "", description="Held-out set; empty means the task's built-in split."
    )
    ood_dataset: str = Field(
        "", description="Out-of-domain held-out set; empty means the built-in task's, if any."
    )
    max_reward: float = Field(1.0, gt=0.0, le=1e6, description="Maximum reward of one rollout.")
    success_threshold: float | None = Field(
        None, description="Reward counted as success; None means >= max_reward."
    )
    seed: int = Field(0, ge=0, description="Seed for dataset order and sampling.")
    max_images: int = Field(8, ge=0, le=64, description="Images one prompt may carry.")
    max_image_bytes: int = Field(
        4 << 20, ge=1024, le=64 << 20, description="Encoded size limit of one image."
    )
    max_image_pixels: int = Field(
        1 << 22, ge=64, le=1 << 28, description="Pixel limit (width x height) of one image."
    )


class RolloutConfig(_Section):
    group_size: int = Field(8, ge=1, le=1024, description="G: rollouts generated per prompt.")
    # vLLM refuses temperatures above 2.
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(0.99, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(32, ge=1, le=65536, description="Max generated tokens per rollout.")
    # The paper evaluates at temperature 0.5, top-p 0.95; it does not say how many samples.
    eval_temperature: float = Field(
        0.5, ge=0.0, le=2.0, description="Temperature of the sampled evaluation."
    )
    eval_top_p: float = Field(0.95, gt=0.0, le=1.0, description="Top-p of the sampled evaluation.")
    eval_samples: int = Field(
        4, ge=0, le=128, description="k: samples per problem in the sampled evaluation; 0 off."
    )


class AlgorithmConfig(_Section):
    estimator: EstimatorName = Field("mapo", description="Advantage estimator.")
    eps: float = Field(1e-6, gt=0.0, le=1.0, description="Added to sigma and mu denominators.")
    std: Literal["population", "sample"] = Field(
        "population", description="Group std: population (1/G, the paper) or sample (1/(G-1))."
    )
    advantage_clip: float | None = Field(None, gt=0.0, description="Optional |advantage| cap.")
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="PPO ratio clip below 1.")
    clip_high: float = Field(0.3, ge=0.0, le=10.0, description="PPO ratio clip above 1.")
    dual_clip: float | None = Field(3.0, gt=1.0, description="Dual-clip bound c for A<0; None off.")
    loss_agg: Literal["token_mean", "seq_mean", "token_sum"] = Field(
        "token_mean", description="How token losses are aggregated."
    )
    kl_coef: float = Field(1e-2, ge=0.0, le=10.0, description="KL-to-reference loss weight; 0 off.")
    kl_type: Literal["k1", "k3", "low_var_kl"] = Field("low_var_kl", description="KL estimator.")
    behaviour_correction: Literal["truncate", "mask", "off"] = Field(
        "truncate",
        description="Weight pi_prox/pi_behaviour of every token: capped, zeroed above the cap, off.",
    )
    is_level: Literal["token", "sequence"] = Field(
        "token", description="Behaviour weight per token, or one per sequence (product of ratios)."
    )
    tis_cap: float = Field(2.0, gt=0.0, le=1e6, description="Cap of the behaviour weight.")
    dapo_filter: bool = Field(False, description="Drop groups whose rewards are all equal.")
    mini_batch_groups: int = Field(
        8, ge=0, le=65536, description="Groups per optimiser update; 0: one update per batch."
    )
    ppo_epochs: int = Field(1, ge=1, le=16, description="Passes over the mini-batches per batch.")

    @model_validator(mode="after")
    def _dapo_defaults(self) -> AlgorithmConfig:
        # 'dapo' is GRPO advantages + dynamic sampling + clip-higher + no KL (the DAPO recipe).
        # Explicitly set fields win: only the ones left at their defaults take DAPO's values.
        if self.estimator == "dapo":
            object.__setattr__(self, "dapo_filter", True)
            if "clip_high" not in self.model_fields_set:
                object.__setattr__(self, "clip_high", 0.28)
            if "kl_coef" not in self.model_fields_set:
                object.__setattr__(self, "kl_coef", 0.0)
        return self


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-2, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0.0, le=1e6, description="Max global grad norm.")
    micro_batch: int = Field(64, ge=1, le=65536, description="Sequences per forward/backward.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Rate after warm-up: constant, or a decay over trainer.steps."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps of linear warm-up.")
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Final rate of a decay, as a fraction of lr."
    )


class TrainerConfig(_Section):
    steps: int = Field(100, ge=0, le=10_000_000, description="Optimiser steps to run.")
    prompts_per_step: int = Field(32, ge=1, le=65536, description="Groups consumed per step.")
    in_flight: int = Field(
        96, ge=1, le=1_000_000, description="Max prompts outstanding on the bus."
    )
    max_staleness: int = Field(2, ge=0, le=1000, description="Max policy versions behind.")
    stale_policy: Literal["drop", "correct"] = Field(
        "correct", description="Groups past max_staleness: drop, or keep (behaviour-corrected)."
    )
    checkpoint_every: int = Field(10, ge=1, le=1_000_000, description="Steps between checkpoints.")
    keep_versions: int = Field(3, ge=1, le=1000, description="Weight versions kept in the store.")
    eval_every: int = Field(0, ge=0, le=1_000_000, description="Steps between evals; 0 off.")
    run_dir: str = Field("runs/default", description="Checkpoints, weights and logs go here.")
    weights_port: int = Field(0, ge=0, le=65535, description="HTTP port serving weights; 0 off.")
    weights_host: str = Field("127.0.0.1", description="Bind address of the weight server.")
    weights_url: str = Field(
        "", description="URL replicas fetch weights from; empty: http://<host>:<weights_port>."
    )
    publish_every: int = Field(1, ge=1, le=1_000_000, description="Steps between weight versions.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 off.")
    device: str = Field("auto", description="auto, cpu or cuda[:N].")
    cpu_threads: int = Field(
        0, ge=0, le=1024, description="torch threads of the trainer process; 0: one per core."
    )
    seed: int = Field(0, ge=0, description="Torch seed.")
    nproc: int = Field(
        1, ge=1, le=1024, description="Trainer ranks on this node (torchrun; FSDP2 sharding)."
    )
    max_restarts: int = Field(
        3, ge=0, le=1000, description="torchrun restarts of the ranks after a failure."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute decoder-layer activations in the backward pass."
    )
    freeze_vision: bool = Field(
        False,
        description="Vision-language models: keep the vision tower fixed (the paper trains it).",
    )


class BusConfig(_Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss://).")
    prompts_stream: str = Field("mapo:prompts", min_length=1, description="Prompts stream key.")
    rollouts_stream: str = Field("mapo:rollouts", min_length=1, description="Scored groups key.")
    weights_stream: str = Field("mapo:weights", min_length=1, description="Weight versions key.")
    dead_letter_stream: str = Field("mapo:dead", min_length=1, description="Dead-letter key.")
    images_prefix: str = Field(
        "mapo:image:", min_length=1, description="Key prefix of the content-addressed images."
    )
    maxlen: int = Field(100_000, ge=10, le=100_000_000, description="Approximate stream cap.")
    block_ms: int = Field(1000, ge=1, le=600_000, description="XREADGROUP block time.")
    claim_idle_ms: int = Field(60_000, ge=100, le=86_400_000, description="Reclaim idle entries.")
    max_deliveries: int = Field(5, ge=1, le=1000, description="Dead-letter after this many tries.")


class RewardConfig(_Section):
    address: str = Field("127.0.0.1:50051", description="host:port of the reward service.")
    workers: int = Field(2, ge=1, le=256, description="Verifier worker processes.")
    timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="Deadline per verification.")
    max_completion_bytes: int = Field(65536, ge=1, le=16 << 20, description="Reject larger.")
    max_group: int = Field(1024, ge=1, le=65536, description="Max completions per ScoreBatch.")
    max_message_bytes: int = Field(
        16 << 20, ge=1024, le=(1 << 31) - 1, description="Largest request accepted (bytes)."
    )
    max_concurrent_rpcs: int = Field(
        256, ge=1, le=1 << 20, description="RPCs served at once (health checks too); more refused."
    )
    max_queued: int = Field(
        4096, ge=1, le=1 << 24, description="Completions waiting for a worker; more refused."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 off.")
    worker_memory_mib: int = Field(
        1024, ge=0, le=1 << 20, description="Address-space cap per verifier worker (MiB); 0 off."
    )
    task_modules: list[str] = Field(
        default_factory=list, description="Modules imported at start that register user tasks."
    )


class InferenceConfig(_Section):
    host: str = Field("127.0.0.1", description="Bind address of the HTTP API.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    replica: str = Field("", description="Consumer name on the bus; empty: hostname-pid.")
    kv_cache_gib: float = Field(1.0, gt=0.0, le=1024.0, description="KV cache bound in GiB.")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="GPU share (CUDA).")
    admin_token: str = Field("", description="Bearer token for weight routes; empty disables.")
    prompts_per_batch: int = Field(8, ge=1, le=4096, description="Prompts generated together.")
    live_timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="/live engine deadline.")
    cpu_threads: int = Field(
        1, ge=0, le=1024, description="OpenMP threads of a CPU engine; 0: one per core."
    )
    engine_dead_grace_s: float = Field(
        15.0,
        ge=0.0,
        le=600.0,
        description="After the engine died: seconds of 503 on /live and /ready, then exit 1.",
    )
    # The OpenAI routes (/v1/*): who may call them and how much one request may ask for.
    api_token: str = Field(
        "", description="Bearer token the /v1 routes require; empty: open (probes always are)."
    )
    max_prompts_per_request: int = Field(
        256, ge=1, le=4096, description="Prompts one /v1/completions request may carry."
    )
    max_n: int = Field(16, ge=1, le=1024, description="Completions per prompt (n) in a request.")
    max_logprobs: int = Field(
        20, ge=0, le=20, description="Largest logprobs / top_logprobs a request may ask for."
    )
    max_request_tokens: int = Field(
        1 << 16,
        ge=1,
        le=1 << 24,
        description="Tokens one request may ask for: prompts x n x max_tokens.",
    )
    max_body_bytes: int = Field(
        8 << 20, ge=1024, le=1 << 30, description="Largest request body; larger answers 413."
    )
    max_concurrent_requests: int = Field(
        32, ge=1, le=4096, description="Generation requests served at once; more answer 429."
    )


class WeightsConfig(_Section):
    """Where versions are, and what a replica accepts (docs/inference.md, Weight versions)."""

    store: str = Field("runs/default/weights", description="Weight store directory or http URL.")
    announce_secret: str = Field(
        "",
        description="HMAC-SHA256 key of weight announcements (trainer and replicas); empty: "
        "unsigned announcements are accepted (a warning at start-up).",
    )
    allowed_sources: list[str] = Field(
        default_factory=list,
        description="Where replicas may load announced versions from, besides weights.store and "
        "trainer.weights_url: directories, or URL prefixes (http://host:port[/path], port * any).",
    )
    max_version_bytes: int = Field(
        1 << 38, ge=1 << 20, le=1 << 44, description="Largest weights file a replica downloads."
    )
    fetch_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="Replica download: connect/read timeout (seconds)."
    )
    server_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="Weight server: idle or slow clients cut off after."
    )
    server_max_connections: int = Field(
        16, ge=1, le=1024, description="Weight server: connections served at once; more get 503."
    )

    @model_validator(mode="after")
    def _sources_are_usable(self) -> WeightsConfig:
        # The shape only; services/weights/trust.py matches locations against them.
        for entry in self.allowed_sources:
            if not entry.strip() or entry != entry.strip():
                raise ValueError(f"weights.allowed_sources: {entry!r} is empty or padded")
            if "://" not in entry:
                continue  # a directory
            scheme, _, rest = entry.partition("://")
            authority = rest.split("/", 1)[0]
            if scheme.lower() not in ("http", "https") or not authority or "@" in authority:
                raise ValueError(
                    f"weights.allowed_sources: {entry!r} must be a directory or an "
                    "http(s)://host[:port][/path] prefix without user info"
                )
            if "?" in rest or "#" in rest:
                raise ValueError(f"weights.allowed_sources: {entry!r} has a query or fragment")
        return self


class RunConfig(_Section):
    """Everything one run needs; one TOML file with these sections."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)

    @model_validator(mode="after")
    def _objective_fits_the_batch(self) -> RunConfig:
        # Rules across sections, so that a run cannot start with a combination it cannot honour.
        per_step, mini = self.trainer.prompts_per_step, self.algorithm.mini_batch_groups
        if 0 < mini < per_step and per_step % mini:
            divisors = [d for d in range(1, per_step) if per_step % d == 0]
            raise ValueError(
                f"trainer.prompts_per_step = {per_step} is not a multiple of "
                f"algorithm.mini_batch_groups = {mini}: every update takes the same number of "
                f"groups. Choose one of {divisors[-3:]}, or 0 for one update per batch"
            )
        if self.trainer.stale_policy == "correct" and self.algorithm.behaviour_correction == "off":
            raise ValueError(
                'trainer.stale_policy = "correct" keeps groups past trainer.max_staleness only '
                'with a behaviour correction: set algorithm.behaviour_correction to "truncate" '
                'or "mask", or trainer.stale_policy = "drop"'
            )
        return self


class ConfigError(ValueError):
    """A config file, environment variable or override that cannot be used; says which."""


def _parse_scalar(text: str) -> Any:
    """Interpret an override value as JSON when it parses (numbers, bools, null), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"{origin}: '{dotted}' must be section.field (e.g. trainer.steps)")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{dotted}' goes through a non-section value")
        node = child
    node[parts[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``MAPO__TRAINER__STEPS=5`` becomes ``{"trainer": {"steps": 5}}``."""
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, _parse_scalar(raw), f"environment variable {key}")
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(
    data: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    origin: str = "config",
) -> RunConfig:
    """Validate a config tree plus environment and ``section.field=value`` overrides."""
    tree = _merge({}, data or {})
    tree = _merge(tree, env_overrides(os.environ if environ is None else environ))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(tree, dotted.strip(), _parse_scalar(raw.strip()), f"override '{item}'")
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{origin} is invalid:\n{exc}") from None


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Read a TOML run file (optional) and apply environment and CLI overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    return build_config(data, environ=environ, overrides=overrides, origin=origin)
