"""Bytes each rank sends through collectives, by kind, for metrics.jsonl and summary.json.

One mechanism for every strategy: DDP's C++ reducer, FSDP2's all-gathers and reduce-scatters and
DeepSpeed's `deepspeed.comm` (a thin layer over torch.distributed) all reach the process group
through the dispatcher ops `torch.ops.c10d.*`. A kernel put in front of those ops (`_install`)
adds up the sizes of their tensors while a `CommMeter` is counting: no synchronisation, no
collective of its own, plain integer adds, and only collectives pass through it. DeepSpeed's own
comms logger would cover DeepSpeed only, and times every op with a device synchronisation;
torch's CommDebugMode counts calls, not bytes, and as a TorchDispatchMode it would route every
op of the model through Python. Not counted: functional collectives (`torch.ops._c10d_functional`,
DTensor's redistributions, compiled code), which reach the backend without a c10d op; none of
the strategies moves gradients or parameters through them (FSDP2's gradient norm does, and that
is the loop's, not counted anyway).

"Bytes sent" is this rank's share of the traffic when the collective runs the bandwidth-optimal
ring algorithm (the convention of nccl-tests' bus bandwidth), from the collective's tensor sizes;
with S the size of the whole tensor (all_gather: the output, the local shard times N ranks;
reduce_scatter: the input) and N ranks in the process group:

    all_reduce        2 (N-1)/N x S    (a reduce-scatter, then an all-gather)
    reduce_scatter      (N-1)/N x S
    all_gather          (N-1)/N x S
    broadcast, reduce   (N-1)/N x S    (pipelined along the ring; averaged over ranks)
    other               the input tensors' bytes (all_to_all, gather, scatter, send)

So one all-reduce of every gradient costs 2 (N-1)/N x P x dtype bytes (DDP), a reduce-scatter of
the gradients plus an all-gather of the updated parameters the same (ZeRO-1/2), and two
all-gathers of the parameters (forward, backward) plus a reduce-scatter 3 (N-1)/N x P x bytes
(ZeRO-3, FSDP): the ZeRO paper's 2 Psi and 3 Psi per rank, times (N-1)/N (what each config
really sends, and why, is measured in tests/test_comm.py). It is the volume the
collective must move, the same on every rank; what a backend actually sends can differ for small
tensors (gloo uses other algorithms for them) and excludes protocol overhead.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "other")
_C10D = torch.ops.c10d
# op -> (kind, index of its input tensor(s)); the process group is the argument after the input.
_OPS = {
    _C10D.allreduce_: ("all_reduce", 0),
    _C10D.allreduce_coalesced_: ("all_reduce", 0),
    _C10D._reduce_scatter_base_: ("reduce_scatter", 1),
    _C10D.reduce_scatter_: ("reduce_scatter", 1),
    _C10D.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1),
    _C10D._allgather_base_: ("all_gather", 1),
    _C10D.allgather_: ("all_gather", 1),
    _C10D.allgather_coalesced_: ("all_gather", 1),
    _C10D.allgather_into_tensor_coalesced_: ("all_gather", 1),
    _C10D.broadcast_: ("broadcast", 0),
    _C10D.reduce_: ("reduce", 0),
    _C10D.alltoall_: ("other", 1),
    _C10D.alltoall_base_: ("other", 1),
    _C10D.gather_: ("other", 1),
    _C10D.scatter_: ("other", 1),
    _C10D.send: ("other", 0),
}


def nbytes(tensors) -> int:
    """Bytes of a tensor, or of a (nested) list of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(nbytes(t) for t in tensors)


def bytes_sent(kind: str, input_bytes: int, ranks: int) -> int:
    """This rank's bytes for one collective, by the ring convention above. `input_bytes` is what
    this rank hands in: the whole tensor, except all_gather's local shard."""
    if ranks <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (ranks - 1) * input_bytes // ranks
    if kind == "all_gather":
        return (ranks - 1) * input_bytes
    if kind == "other":
        return input_bytes
    return (ranks - 1) * input_bytes // ranks


class CommMeter:
    """`with meter:` counts the collectives issued inside, on any thread (DDP and ZeRO reduce
    gradients from the autograd engine's), into `meter.sent`, bytes by kind; `take()` returns them
    and starts again from zero. One meter counts at a time."""

    def __init__(self):
        self.sent = dict.fromkeys(KINDS, 0)

    def __enter__(self):
        global _counting
        _install()
        _counting = self
        return self

    def __exit__(self, *exc):
        global _counting
        _counting = None

    def take(self) -> dict:
        sent, self.sent = self.sent, dict.fromkeys(KINDS, 0)
        return sent


_counting: CommMeter | None = None  # the meter inside whose `with` block we are
_library = None


def _install() -> None:
    """Once per process: put a counting kernel in front of every collective op.

    The c10d ops have kernels for devices only; their autograd keys fall through to a generic
    fallback. A kernel registered at the `Autograd` key runs first, for collectives alone: the
    rest of the model's ops never pass through Python (a TorchDispatchMode would see every op,
    about 10 us each). It adds up sizes, then calls the op below autograd, as the fallback would."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("c10d", "IMPL")
    for packet, (kind, index) in _OPS.items():
        _library.impl(packet.default, _kernel(packet.default, kind, index), "Autograd", with_keyset=True)


def _kernel(op, kind: str, index: int):
    def count_then_run(keyset, *args, **kwargs):
        meter = _counting
        if meter is not None:  # the process group follows the input, as a TorchScript object
            ranks = ProcessGroup.unbox(args[index + 1]).size()
            meter.sent[kind] += bytes_sent(kind, nbytes(args[index]), ranks)
        # on to the device's kernel: about 13 us per collective in all (calling the op again under
        # an autograd-excluding guard took 50)
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args, **kwargs)

    return count_then_run
