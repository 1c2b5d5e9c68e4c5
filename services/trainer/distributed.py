"""One policy over many processes: torchrun's ranks, FSDP2 sharding, and the leader's commands.

A trainer of N ranks is started by ``torchrun`` (``mapo trainer run --nproc N`` starts it).
Rank 0, the *leader*, runs the trainer exactly as a single process does: it alone reads the
bus, admits groups, keeps the ledger, writes the run state and publishes weights. The other
ranks, the *followers*, hold their shards of the model and optimiser and do what the leader
tells them (:class:`Op`): build the learner, restore a checkpoint, train on a batch, evaluate,
write their checkpoint shards, help gather the weights to publish, stop. One reader keeps
admission, the exactly-once ledger and the acknowledgements in one place, unchanged; a batch is
a few megabytes of token ids at most, so sending it from one rank costs little next to the
step it feeds.

Nothing that crosses a process boundary is pickled: commands and batches travel as tensors
(shapes first), the batch's strings as JSON.

Each rank trains on its share of the rows (:class:`RowShard`). Every rank holds the whole
batch, so advantages, mini-batches and the loss's denominators are the whole batch's on every
rank; the ranks split only the forward and backward passes. Each micro-batch's loss is weighted
by its share of the whole (mini-)batch's denominator and FSDP sums (never averages) the
gradients, so N ranks take the same step as one, up to float rounding.

Parameters, gradients and AdamW moments are sharded with FSDP2 (``fully_shard`` on every
decoder layer, then on the root). With a bfloat16 compute dtype (CUDA) the shards stay float32
(the master weights) and are gathered in bfloat16 for the forward and backward passes;
gradients are reduced in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import json
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from services.trainer.batch import TrainBatch

if TYPE_CHECKING:
    from services.core.loss import LossStats
    from services.trainer.logprobs import TokenScores

log = logging.getLogger(__name__)

#: How long a follower waits for the leader's next command. The leader may wait for scored
#: groups for a long time (inference restarting); a dead leader is noticed by torchrun at once.
IDLE_TIMEOUT = timedelta(days=7)
#: Collectives of one step (FSDP's gathers and reductions).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_PR_SET_PDEATHSIG = 1


class Op(enum.IntEnum):
    """What the leader asks of the followers; each matches one collective call of the learner."""

    STOP = 0
    BUILD = 1
    RESTORE = 2
    TRAIN = 3
    EVAL = 4
    SAVE = 5
    PUBLISH = 6


@dataclass(frozen=True)
class Command:
    op: Op
    number: int = 0
    text: str = ""


@dataclass(frozen=True)
class Topology:
    """This process's place among the ranks; world size 1 (no process group) by default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: Any = None  # the gloo group of commands and batches (a ProcessGroup)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self) -> RowShard:
        """The rows this rank trains on, of any batch."""
        if not self.distributed:
            return WHOLE
        return RowShard(self.rank, self.world_size, self.device)

    # ------------------------------------------------------------------ commands

    def tell(self, op: Op, *, number: int = 0, text: str = "") -> None:
        """Leader: send a command to every follower. Anywhere else it does nothing, so a
        follower runs the very methods that call it."""
        if not (self.distributed and self.leader):
            return
        data = text.encode()
        header = torch.tensor([int(op), number, len(data)], dtype=torch.long)
        dist.broadcast(header, src=0, group=self.control)
        if data:
            dist.broadcast(_bytes_tensor(data), src=0, group=self.control)

    def listen(self) -> Command:
        """Follower: wait for the leader's next command."""
        header = torch.zeros(3, dtype=torch.long)
        dist.broadcast(header, src=0, group=self.control)
        op, number, size = (int(x) for x in header)
        text = ""
        if size:
            buf = torch.zeros(size, dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.control)
            text = buf.numpy().tobytes().decode()
        return Command(Op(op), number, text)

    def share_batch(self, batch: TrainBatch | None) -> TrainBatch:
        """Leader: send ``batch``; follower (``None``): receive it. Returns it on the CPU."""
        leads = batch is not None
        if leads:
            assert batch is not None
            tensors, plain = _batch_parts(batch)
            header = json.dumps(
                {
                    "tensors": [[n, str(t.dtype), list(t.shape)] for n, t in tensors],
                    "plain": plain,
                }
            ).encode()
            size = torch.tensor([len(header)], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, src=0, group=self.control)
        buf = _bytes_tensor(header) if leads else torch.zeros(int(size), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.control)
        spec = json.loads(buf.numpy().tobytes().decode())
        values: dict[str, Any] = {k: _tuples(v) for k, v in spec["plain"].items()}
        sent = dict(tensors) if leads else {}
        for name, dtype_name, shape in spec["tensors"]:
            dtype = _DTYPES[dtype_name]
            wire = torch.uint8 if dtype == torch.bool else dtype
            t = sent[name].to(wire).contiguous() if leads else torch.zeros(shape, dtype=wire)
            dist.broadcast(t, src=0, group=self.control)
            values[name] = t.to(dtype)
        return TrainBatch(**values)


_DTYPES = {
    str(d): d
    for d in (torch.long, torch.int32, torch.bool, torch.float32, torch.float64, torch.uint8)
}


def _bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _batch_parts(batch: TrainBatch) -> tuple[list[tuple[str, Tensor]], dict[str, Any]]:
    tensors, plain = [], {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            tensors.append((f.name, value.cpu()))
        else:
            plain[f.name] = value
    return tensors, plain


def _tuples(value: Any) -> Any:
    """JSON lists back into the tuples :class:`TrainBatch` holds."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# ----------------------------------------------------------------------------- process group

_current = Topology()


def current() -> Topology:
    """This process's topology (world size 1 until :func:`init` joins a process group)."""
    return _current


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device_name: str) -> Topology:
    """Join torchrun's process group when this process is one of its ranks.

    ``device_name`` is ``trainer.device``: on CUDA each rank takes the GPU of its local rank
    and NCCL; on the CPU, gloo. Commands and batches always travel over a gloo group of their
    own, whose patience covers a leader that waits a long time for scored groups.
    """
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if world <= 1:
        _current = Topology(restart_count=restarts)
        return _current
    _die_with_launcher()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _current = Topology(rank, world, local, restarts, device, control)
    log.info("rank %d of %d on %s (restart %d)", rank, world, device, restarts)
    return _current


def shutdown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Topology()


def _die_with_launcher() -> None:
    """Linux: end with torchrun, which starts each rank in a session of its own (a killed
    launcher would otherwise leave its ranks running)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def ignore_stop_signals() -> None:
    """Followers: a Ctrl-C or SIGTERM reaches every rank, but only the leader decides when to
    stop (after its last checkpoint, which needs every rank); it then sends STOP."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


# ----------------------------------------------------------------------------- rows


@dataclass
class RowShard:
    """Which rows of a (mini-)batch this rank runs through the model, and how results meet.

    A mini-batch's rows are split into ``world`` near-equal contiguous parts, and each rank
    splits its part into the same number of micro-batches (so FSDP's collectives stay in step),
    none longer than ``optim.micro_batch``: the micro-batch size is per rank. A rank whose part
    has fewer rows than that number runs a stand-in (a row of its own, or the first row) whose
    loss is weighted 0.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _owned: list[Tensor] = field(default_factory=list, repr=False)

    def micro_batches(self, rows: Tensor, micro_batch: int) -> Iterator[tuple[Tensor, float]]:
        """``(rows of one micro-batch, share)``: share 1, or 0 for a stand-in."""
        if self.world == 1:
            for part in torch.split(rows, micro_batch):
                yield part, 1.0
            return
        for part, share in self._pieces(rows, micro_batch):
            if share:
                self._owned.append(part)
            yield part, share

    def _pieces(self, rows: Tensor, micro_batch: int) -> list[tuple[Tensor, float]]:
        parts = torch.tensor_split(rows, self.world)
        mine = parts[self.rank]
        count = max(math.ceil(len(parts[0]) / micro_batch), 1)
        stand_in = mine[:1] if len(mine) else rows[:1]
        return [(p, 1.0) if len(p) else (stand_in, 0.0) for p in torch.tensor_split(mine, count)]

    def score(
        self,
        fn: Callable[..., TokenScores],
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        micro_batch: int,
        **kwargs: Any,
    ) -> TokenScores:
        """``fn`` (:func:`~services.trainer.logprobs.score_tokens`) over this rank's rows,
        then every rank's rows put together: the whole batch's scores on every rank."""
        if self.world == 1:
            return fn(model, input_ids, attention_mask, micro_batch=micro_batch, **kwargs)
        b, width = input_ids.shape
        rows = torch.arange(b, device=input_ids.device)
        out: dict[str, Tensor | None] | None = None
        for part, share in self._pieces(rows, micro_batch):
            kw = dict(kwargs)
            if kw.get("vision") is not None:
                kw["vision"] = kw["vision"].subset(part)
            scored = fn(model, input_ids[part], attention_mask[part], micro_batch=len(part), **kw)
            values = {f.name: getattr(scored, f.name) for f in dataclasses.fields(scored)}
            if out is None:
                out = {
                    name: None if v is None else v.new_zeros((b, width - 1))
                    for name, v in values.items()
                }
            if share:
                for name, v in values.items():
                    target = out[name]
                    if target is not None and v is not None:
                        target[part] = v
        assert out is not None
        release(model)
        made: TokenScores = cast(Any, type(scored))(**{k: self._sum(v) for k, v in out.items()})
        return made

    def gather(self, scores: TokenScores | None) -> TokenScores | None:
        """Batch-shaped scores filled by this rank's micro-batches (since the last gather),
        with every rank's rows."""
        owned, self._owned = self._owned, []
        if scores is None or self.world == 1:
            return scores
        keep = torch.zeros(scores.logprobs.shape[0], dtype=torch.bool, device=self.device)
        if owned:
            keep[torch.cat(owned).to(self.device)] = True

        def mine(v: Tensor | None) -> Tensor | None:
            return None if v is None else self._sum(torch.where(keep[:, None], v, 0.0))

        fields = {f.name: mine(getattr(scores, f.name)) for f in dataclasses.fields(scores)}
        made: TokenScores = cast(Any, type(scores))(**fields)
        return made

    def combine(self, parts: Sequence[tuple[LossStats, float]]) -> LossStats:
        """Loss statistics of every rank's micro-batches, as if one process had them all."""
        from services.core.loss import LossStats

        if self.world == 1:
            return LossStats.combine(parts)
        local = LossStats.combine([(s, w) for s, w in parts if w > 0.0])
        names = [f.name for f in dataclasses.fields(local)]
        row = torch.tensor([getattr(local, n) for n in names], dtype=torch.float64)
        rows = [torch.zeros_like(row, device=self.device) for _ in range(self.world)]
        dist.all_gather(rows, row.to(self.device))
        ranks = [LossStats(**dict(zip(names, r.tolist(), strict=True))) for r in rows]
        return LossStats.combine([(s, 1.0) for s in ranks])

    def _sum(self, value: Tensor | None) -> Tensor | None:
        if value is None:
            return None
        value = value.contiguous()
        dist.all_reduce(value)
        return value


WHOLE = RowShard()
"""A single process's shard: every row, nothing to put together."""


# ----------------------------------------------------------------------------- the model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: memory for one layer's activations at a time, for about one more forward pass."""
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        inner = layer.forward

        def forward(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def shard_model(
    model: nn.Module, topology: Topology, *, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """FSDP2 over every rank: each decoder layer, then the root (embeddings, norm, head).

    ``compute_dtype`` (bfloat16 on CUDA) is the dtype the shards are gathered in for the
    passes; the shards themselves keep their dtype (float32 master weights, what AdamW updates)
    and gradients are reduced in float32. Gradients are summed over the ranks: the loss
    weights already divide by the whole batch (:class:`RowShard`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(topology.device.type, (topology.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        log.warning("no decoder layers found: %s is sharded as one unit", type(model).__name__)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def release(model: nn.Module) -> None:
    """After passes without a backward: shard the root's parameters again.

    FSDP keeps the root's parameters gathered after a forward pass, for the backward pass that
    usually follows (which shards them). After a pass without gradients they would stay
    gathered, and the next backward pass would not reduce the root's gradients.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every rank: the whole state dict gathered off the device; rank 0 gets the tensors
    (other ranks an empty dict). For a model that is not sharded, its own state dict."""
    if not is_sharded(model):
        return dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Tensor] = cast(Any, get_model_state_dict(model, options=options))
    return state
