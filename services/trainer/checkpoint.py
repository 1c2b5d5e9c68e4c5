"""Atomic checkpoints: the model, the optimiser, the RNGs and the run state, whole or not at all.

Layout under ``{run_dir}/checkpoints``::

    step_00000010/model/             the policy as an HF model directory (safetensors)
    step_00000010/optimizer.safetensors   AdamW moments, keyed by parameter name
    step_00000010/rng.safetensors    torch (and CUDA) RNG states, the random-lambda generator
    step_00000010/state.json         step, version, dataset position, counters, the applied-group
                                     ledger, optimiser hyper-parameters, sha256 of every file
    LATEST                           the newest step (a hint; the directory scan decides)

That is the layout of a single process (format 1). A trainer of several ranks (format 2) writes
the model and the optimiser with ``torch.distributed.checkpoint`` instead, each rank its own
shards, into ``shards/`` (no ``model/``, no ``optimizer.safetensors``); rank 0 writes
``rng.safetensors`` and ``state.json``. Both formats load on any number of ranks: a sharded
checkpoint is resharded to the ranks that read it (one process included), and a single
process's checkpoint is sharded as it is read.

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place (:class:`~services.weights.versions.VersionedDirs`), so a reader (or a resumed run after
``kill -9``) sees either the whole checkpoint or none of it. ``state.json`` lists the sha256 of
every other file and :func:`latest_checkpoint` checks them, falling back to an older checkpoint
if the newest is damaged. A single process's checkpoint pickles nothing; in a sharded one the
shards hold tensors only (the optimiser's hyper-parameters are JSON in ``state.json``), and
``shards/.metadata`` is torch's own index of them, a pickle: load checkpoints only from run
directories you trust, as with any torch checkpoint.

A save that fails (the disk full, a write error) raises :class:`CheckpointError` naming the
directory and the disk, after removing what it had written: the checkpoints before it are left
as they were, and :func:`latest_checkpoint` still finds the newest of them. The trainer stops on
it (its groups since that checkpoint were never acknowledged, so a run resumed from it gets
them again). A checkpoint directory that is in the way of a save but does not verify (damaged:
the run was resumed from an older one) is removed first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from services.weights.versions import VersionedDirs, atomic_write_json, fsync_path, sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SHARDS_DIR = "shards"
FORMAT = 1
SHARDED_FORMAT = 2
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, does not fit the model, or could not be written;
    says which."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


# ----------------------------------------------------------------------------- optimiser


def _param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the order the optimiser was built with."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimiser moments as named tensors, and its hyper-parameter groups as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{names[idx]}::{key}"] = t.detach().cpu().contiguous()
    groups = []
    for g in sd["param_groups"]:
        group = {k: v for k, v in g.items() if k != "params"}
        group["params"] = [names[i] for i in g["params"]]
        groups.append(group)
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names: list[str],
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]],
) -> None:
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition("::")
        if name not in index:
            raise CheckpointError(f"optimiser state for unknown parameter {name}")
        state.setdefault(index[name], {})[slot] = value
    param_groups = []
    for g in groups:
        missing = [n for n in g["params"] if n not in index]
        if missing:
            raise CheckpointError(f"optimiser group names unknown parameters {missing[:3]}")
        param_groups.append({**g, "params": [index[n] for n in g["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# ----------------------------------------------------------------------------- RNG


def rng_state(
    generator: torch.Generator | None = None, *, cuda: bool = True
) -> dict[str, torch.Tensor]:
    """The RNG states; ``cuda=False`` leaves out the GPUs' (a rank of several touches only its
    own GPU, and nothing in a step draws from a GPU's generator)."""
    out = {"torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    if generator is not None:
        out["lambda"] = generator.get_state()
    return out


def set_rng_state(
    tensors: dict[str, torch.Tensor], generator: torch.Generator | None, *, cuda: bool = True
) -> None:
    torch.set_rng_state(tensors["torch"])
    if cuda and torch.cuda.is_available():
        states = [
            tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors
        ]
        if states:
            torch.cuda.set_rng_state_all(states)
    if generator is not None and "lambda" in tensors:
        generator.set_state(tensors["lambda"])


# ----------------------------------------------------------------------------- save / load


def _checkpoints(run_dir: str | Path) -> VersionedDirs:
    return VersionedDirs(checkpoint_root(run_dir), "step_", STATE_FILE)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return _checkpoints(run_dir).path(step)


# ----------------------------------------------------------------------------- failed saves

# What ran out, by errno, and how libraries that raise no OSError word it (safetensors' Rust
# writer, torch's stream writer, the errors torch.distributed.checkpoint collects from ranks).
_OUT_OF_SPACE = (
    (errno.ENOSPC, "the disk is full", ("no space left", "storagefull", "os error 28")),
    (errno.EDQUOT, "the disk quota is used up", ("quota exceeded", "quotaexceeded", "error 122")),
    (errno.EFBIG, "a file size limit was reached", ("too large", "toolarge", "os error 27")),
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def out_of_space(exc: BaseException) -> str | None:
    """What ran out when ``exc`` (or what caused it) is a full disk, a used-up quota or a file
    size limit; None for any other error."""
    for e in _causes(exc):
        text = str(e).lower()
        for code, what, words in _OUT_OF_SPACE:
            if (isinstance(e, OSError) and e.errno == code) or any(w in text for w in words):
                return what
    return None


def _mount_of(path: Path) -> tuple[Path, str, str]:
    """(mount point, device, file system type) of the disk that holds ``path``."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device, fstype = "?", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1].replace("\\040", " ") == str(mount):
                device, fstype = fields[0], fields[2]  # the last mount there is the live one
    return mount, device, fstype


def describe_disk(path: str | Path) -> str:
    """The disk that holds ``path``, for error messages: where it is mounted, what it is and
    how much of it is free."""
    mount, device, fstype = _mount_of(Path(path))
    text = f"the disk mounted at {mount} ({device}, {fstype})"
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(mount)
        mib = 1 << 20
        text += f", {usage.free / mib:.1f} MiB free of {usage.total / mib:.1f} MiB"
    return text


def _save_error(run_dir: Path, step: int, exc: BaseException) -> CheckpointError:
    root = checkpoint_root(run_dir)
    older = [s for s in list_checkpoints(run_dir) if s != step]
    kept = (
        f"the previous checkpoint, {step_dir(run_dir, older[-1]).name}, is untouched and "
        "--resume goes on from it"
        if older
        else "there is no earlier checkpoint"
    )
    reason = " ".join(str(exc).split())[:400] or type(exc).__name__
    full = out_of_space(exc)
    if full is not None:
        what = f"{full} ({reason})"
        fix = "Free space on that disk, or set trainer.run_dir on a larger one, then restart"
    else:
        what = f"{type(exc).__name__}: {reason}"
        fix = "Fix the cause, then restart"
    return CheckpointError(
        f"could not write the checkpoint of step {step} into {root}: {what}. Disk: "
        f"{describe_disk(root)}. Nothing of step {step} was kept; {kept}. {fix} with --resume"
    )


def _clear_the_way(run_dir: Path, step: int) -> None:
    """Refuse to overwrite a checkpoint; remove a damaged one that is in the way."""
    final = step_dir(run_dir, step)
    if not final.exists():
        return
    try:
        read_state(final)
    except CheckpointError as exc:
        log.warning("replacing damaged checkpoint %s (%s)", final, exc)
        trash = final.parent / f".trash-{final.name}-{os.getpid()}"
        try:
            os.rename(final, trash)  # out of sight first, as prune does
        except OSError as err:
            raise CheckpointError(
                f"cannot move the damaged checkpoint {final} out of the way: {err}"
            ) from err
        shutil.rmtree(trash, ignore_errors=True)
        return
    raise CheckpointError(f"checkpoint {final} already exists")


@contextlib.contextmanager
def _writing(run_dir: str | Path, step: int) -> Iterator[Path]:
    """:meth:`VersionedDirs.writing` for the checkpoint of ``step``: a failure becomes a
    CheckpointError naming the directory and the disk, with nothing of the step left behind."""
    run_dir = Path(run_dir)
    _clear_the_way(run_dir, step)
    final = step_dir(run_dir, step)
    try:
        with _checkpoints(run_dir).writing(step) as tmp:
            yield tmp
    except Exception as exc:
        if final.is_dir():
            try:
                read_state(final)
            except CheckpointError:
                shutil.rmtree(final, ignore_errors=True)
            else:
                # Renamed into place whole; only the LATEST hint after it failed.
                log.warning("checkpoint %s is written, but not the LATEST file: %s", final, exc)
                return
        raise _save_error(run_dir, step, exc) from exc


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    keep: int = KEEP,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune all but the newest ``keep``.

    CheckpointError, with the checkpoints before it untouched, when it cannot be written.
    """
    checkpoints = _checkpoints(run_dir)
    final = checkpoints.path(step)
    with _writing(run_dir, step) as tmp:
        model.save_pretrained(str(tmp / MODEL_DIR), safe_serialization=True)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / MODEL_DIR))
        names = _param_names(model)
        opt_tensors, opt_groups = optimizer_state(optimizer, names)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng_state(generator), str(tmp / RNG_FILE))
        _seal(tmp, {"format": FORMAT, "step": step, "state": state, "optimizer_groups": opt_groups})
    checkpoints.prune(keep)
    return final


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    announce: Callable[[Path], None],
    generator: torch.Generator | None = None,
    keep: int = KEEP,
) -> Path:
    """Rank 0 of several: the checkpoint of ``step`` in the sharded format, atomically.

    ``announce(tmp)`` tells the other ranks where to write their shards (they call
    :func:`write_shards` on it); the directory is renamed into place only after every rank's
    shards and ``state.json`` are on disk. CheckpointError as :func:`save_checkpoint`.
    """
    checkpoints = _checkpoints(run_dir)
    final = checkpoints.path(step)
    with _writing(run_dir, step) as tmp:
        announce(tmp)
        groups = write_shards(tmp, model, optimizer)
        save_file(rng_state(generator, cuda=False), str(tmp / RNG_FILE))
        body = {"format": SHARDED_FORMAT, "step": step, "state": state, "optimizer_groups": groups}
        _seal(tmp, body)
    checkpoints.prune(keep)
    return final


def write_shards(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> list[dict[str, Any]]:
    """Every rank: its shards of the weights and the AdamW moments into ``directory/shards``
    (``torch.distributed.checkpoint``; a collective call). Returns the optimiser's
    hyper-parameter groups, which go into ``state.json`` as JSON: the shards hold tensors only.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    model_state, optim_state = get_state_dict(model, optimizer)
    shards: dict[str, Any] = {"model": model_state, "optimizer": optim_state["state"]}
    save(shards, checkpoint_id=directory / SHARDS_DIR)
    groups: list[dict[str, Any]] = cast(Any, optim_state["param_groups"])
    return groups


def _read_shards(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[Any]
) -> None:
    """Load a sharded checkpoint into the model and optimiser, resharded to this process's
    share (the whole of it without a process group)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    model_state, optim_state = get_state_dict(model, optimizer)
    shards: dict[str, Any] = {"model": model_state, "optimizer": optim_state["state"]}
    with warnings.catch_warnings():
        # One process reading shards: what torch warns it assumes is what is meant.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(shards, checkpoint_id=directory / SHARDS_DIR)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=shards["model"],
        optim_state_dict={"state": shards["optimizer"], "param_groups": groups},
    )


def _load_full_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, groups: list[Any]
) -> None:
    """A single process's optimiser file into a sharded optimiser (every rank reads it whole
    and keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        name, _, slot = key.rpartition("::")
        state.setdefault(name, {})[slot] = value
    set_optimizer_state_dict(
        model,
        optimizer,
        optim_state_dict=cast(Any, {"state": state, "param_groups": groups}),
        options=StateDictOptions(full_state_dict=True),
    )


def _seal(tmp: Path, body: dict[str, Any]) -> None:
    """fsync every file and write ``state.json`` with their sha256: the checkpoint is whole."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(path)
        files[str(path.relative_to(tmp))] = sha256_file(path)
    atomic_write_json(tmp / STATE_FILE, {**body, "files": files})
    for directory in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}):
        fsync_path(directory)


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps with a checkpoint directory (complete by construction), oldest first."""
    return _checkpoints(run_dir).list()


def prune(run_dir: str | Path, keep: int) -> None:
    """Remove old checkpoints and temporary directories a killed writer left behind."""
    _checkpoints(run_dir).prune(keep)


def read_state(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """``state.json`` of a checkpoint, after checking every file against its sha256."""
    d = Path(path)
    try:
        body: dict[str, Any] = json.loads((d / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{d} has no readable {STATE_FILE}: {exc}") from None
    if body.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointError(f"{d}: unsupported checkpoint format {body.get('format')!r}")
    if verify:
        for rel, sha in body["files"].items():
            try:
                digest = sha256_file(d / rel)
            except FileNotFoundError:
                raise CheckpointError(f"{d}: {rel} is missing") from None
            if digest != sha:
                raise CheckpointError(f"{d}: {rel} does not match its sha256 (damaged)")
    return body


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; older ones are tried if a newer one is damaged."""
    for step in reversed(list_checkpoints(run_dir)):
        path = step_dir(run_dir, step)
        try:
            read_state(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            continue
        return path
    return None


def weights_dir(path: str | Path) -> Path | None:
    """The HF model directory of a single process's checkpoint; None for a sharded one (whose
    weights :func:`load_training_state` loads)."""
    model_dir = Path(path) / MODEL_DIR
    return model_dir if model_dir.is_dir() else None


def load_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Restore optimiser moments and RNGs into live objects; return the saved run state.

    A single process's checkpoint: the model's weights are loaded separately from
    ``path/model`` (:func:`weights_dir`), so the policy is built exactly as a fresh run builds
    it. A sharded checkpoint: the weights are loaded here too.
    """
    from services.trainer.distributed import is_sharded

    d = Path(path)
    body = read_state(d, verify=False)
    if body["format"] == SHARDED_FORMAT:
        _read_shards(d, model, optimizer, body["optimizer_groups"])
    elif is_sharded(model):
        _load_full_optimizer(model, optimizer, d, body["optimizer_groups"])
    else:
        _load_optimizer_file(d, model, optimizer, body["optimizer_groups"])
    set_rng_state(load_file(str(d / RNG_FILE)), generator, cuda=not is_sharded(model))
    state: dict[str, Any] = body["state"]
    return state


def _load_optimizer_file(
    d: Path, model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]
) -> None:
    names = _param_names(model)
    device = next(model.parameters()).device
    # AdamW keeps its step counters on the CPU unless it runs in capturable mode.
    tensors = {
        k: v if k.endswith("::step") else v.to(device)
        for k, v in load_file(str(d / OPTIMIZER_FILE)).items()
    }
    load_optimizer_state(optimizer, names, tensors, groups)
