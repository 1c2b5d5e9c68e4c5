"""Weight publication: each policy version into the weight store, then announced on the bus.

A version holds exactly the tensors of the base checkpoint's safetensors files (same names, same
shapes; with tied embeddings there is no ``lm_head.weight``), because that is what an inference
replica checks before it reloads. Tensors are cast to the serving dtype: float32 on the CPU,
bfloat16 on CUDA. ``write_version`` makes a version appear whole or not at all and keeps the
newest ``keep``; the announcement goes out only after the version is on disk, so a replica that
acts on it always finds it. With ``trainer.weights_port`` set, the trainer also serves the store
over HTTP and announces that URL, so replicas on other hosts need no shared volume.

Every announcement carries the weights file's size, and with ``weights.announce_secret`` set it
is signed (:mod:`services.weights.trust`): replicas that hold the secret refuse anything else.
Without one the announcements go out unsigned, and the publisher says so at start-up.

Versions only grow. A fresh run publishes the initial model as version 0 and then one version
per ``publish_every`` steps (version == step with the default of 1). A resumed run publishes the
restored model as a version above every version already in the store, because a killed run may
have published versions the restored model never saw: reusing their numbers would leave
replicas that loaded them on weights that no longer exist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from services.core.config import RunConfig
from services.core.schemas import WeightAnnouncement
from services.transport import Bus
from services.weights.base_model import tensor_spec
from services.weights.store import (
    WeightServer,
    WeightStoreError,
    latest_version,
    read_manifest,
    version_dir,
    write_version,
)
from services.weights.trust import SHORT_KEY_CHARS, advertised_url, is_url, sign

__all__ = [
    "ShapeSpec",
    "WeightPublisher",
    "advertised_url",
    "base_tensor_spec",
    "checkpoint_state",
    "model_names",
    "serving_tensors",
]

log = logging.getLogger(__name__)

ShapeSpec = dict[str, tuple[int, ...]]


def base_tensor_spec(model_dir: str | Path) -> ShapeSpec:
    """Names and shapes of every tensor in a model directory's safetensors file(s)."""
    return {name: shape for name, (shape, _dtype) in tensor_spec(model_dir).items()}


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its checkpoint files use.

    transformers may hold a model under other names than its files (Qwen2.5-VL's
    ``model.language_model.*`` is ``model.*`` on disk, its ``model.visual.*`` is ``visual.*``);
    replicas and the base checkpoint speak the file names, so versions are written in those.
    """
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, model.state_dict()))


def model_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint name -> the model's own name of the same tensor (the inverse of
    :func:`checkpoint_state`, for loading a version into a model)."""
    from transformers.core_model_loading import revert_weight_conversion

    # One distinct stand-in per name (tied tensors share storage, so the real ones would not
    # tell their names apart); renaming never looks at the values.
    stand_ins = {name: torch.empty(0) for name in model.state_dict()}
    own = {id(t): name for name, t in stand_ins.items()}
    reverted = revert_weight_conversion(model, stand_ins)
    return {ck: own[id(t)] for ck, t in reverted.items() if id(t) in own}


def serving_tensors(
    model: nn.Module | Mapping[str, torch.Tensor],
    spec: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The model's tensors (or a state dict gathered from the trainer's ranks) named in
    ``spec``, cast to ``dtype``; refuses any mismatch."""
    state = checkpoint_state(model) if isinstance(model, nn.Module) else model
    missing = sorted(set(spec) - set(state))
    wrong = sorted(n for n in spec if n in state and tuple(state[n].shape) != tuple(spec[n]))
    if missing or wrong:
        raise ValueError(
            f"the policy does not fit the base checkpoint: missing {missing[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    return {name: state[name].detach().to("cpu", dtype=dtype) for name in spec}


class WeightPublisher:
    """Writes versions to the store, announces them, and serves the store over HTTP if asked."""

    def __init__(
        self,
        config: RunConfig,
        bus: Bus,
        spec: ShapeSpec,
        dtype: torch.dtype,
    ) -> None:
        store = config.weights.store
        if is_url(store):
            raise ValueError(
                f"weights.store={store} is a URL; the trainer writes the store, so it must be a "
                "directory (replicas may read it over HTTP via trainer.weights_port)"
            )
        self.store = Path(store)
        self.keep = config.trainer.keep_versions
        self.stream = config.bus.weights_stream
        self.bus = bus
        self.spec = spec
        self.dtype = dtype
        self.key = config.weights.announce_secret
        if not self.key:
            log.warning(
                "weights.announce_secret is not set: weight announcements go out unsigned "
                "(replicas with a secret refuse them; replicas without one accept anyone's)"
            )
        elif len(self.key) < SHORT_KEY_CHARS:
            log.warning(
                "weights.announce_secret has fewer than %d characters: easy to guess",
                SHORT_KEY_CHARS,
            )
        self.server: WeightServer | None = None
        self.base_url: str | None = None
        if config.trainer.weights_port > 0:
            self.server = WeightServer(
                self.store,
                config.trainer.weights_host,
                config.trainer.weights_port,
                timeout_s=config.weights.server_timeout_s,
                max_connections=config.weights.server_max_connections,
            ).start()
            self.base_url = advertised_url(config, self.server.port)

    def next_version_after_restart(self, restored: int) -> int:
        """A version number no replica can have seen: above the checkpoint and the store."""
        newest = latest_version(self.store)
        return max(restored, -1 if newest is None else newest) + 1

    def write(
        self, model: nn.Module | Mapping[str, torch.Tensor], version: int, step: int
    ) -> tuple[str, str]:
        """Write one version (blocking: run it in a thread); return (location, manifest sha)."""
        tensors = serving_tensors(model, self.spec, self.dtype)
        directory, sha = write_version(self.store, version, tensors, step=step, keep=self.keep)
        location = self.base_url or str(directory.resolve())
        return location, sha

    def announcement(self, version: int, location: str, sha: str, step: int) -> WeightAnnouncement:
        """The announcement of a version written here: with its size, signed if there is a key."""
        try:
            size = read_manifest(version_dir(self.store, version), sha).file_bytes
        except WeightStoreError as exc:  # announced all the same; replicas verify it anyway
            log.warning("announcing version %d without its size: %s", version, exc)
            size = 0
        msg = WeightAnnouncement(
            version=version,
            location=location,
            manifest_sha256=sha,
            step=step,
            created_at=time.time(),
            file_bytes=size,
        )
        return sign(msg, self.key) if self.key else msg

    async def announce(self, version: int, location: str, sha: str, step: int) -> None:
        await self.bus.publish(self.stream, self.announcement(version, location, sha, step))

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
