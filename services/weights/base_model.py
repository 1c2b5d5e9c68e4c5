"""The base model's safetensors: where they are, and which tensors they hold.

Every published version holds exactly the tensors of the base checkpoint (same names, same
shapes): the trainer publishes those, and a replica refuses a version that differs, because
vLLM's engine dies on a reload with names it does not know. Only headers are read here.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.weights.store import SAFETENSORS_DTYPES, WEIGHTS_FILE

TensorSpec = dict[str, tuple[tuple[int, ...], str]]


def resolve_model_dir(model: str) -> Path:
    """A local directory for ``model``: itself, or its snapshot in the Hugging Face cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards of an index)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    single = d / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{d} has no model.safetensors: the policy must be in safetensors")


def tensor_spec(model_dir: str | Path) -> TensorSpec:
    """Name -> (shape, dtype) of every tensor in a model directory, read from the headers."""
    from safetensors import safe_open

    out: TensorSpec = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                sl = fh.get_slice(name)
                dtype = sl.get_dtype()
                out[name] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(dtype, dtype))
    return out
