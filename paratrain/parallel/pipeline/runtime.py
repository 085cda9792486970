"""Executes one pipeline rank's action list; decides nothing (the schedule is data).

Per action, on this rank (chunk ``c`` is stage ``s = c * pp + rank`` of ``S``):

* ``F m c``: ``y = chunk_c(x)`` with ``x`` the tokens of micro-batch ``m`` (``s = 0``) or the
  received activation (a leaf that requires grad, so backward yields ``dL/dx``). On the last stage
  ``y`` is the micro-batch's mean loss ``L_m``.
* ``B m c``: on the last stage, backward of ``scale * L_m`` with ``scale = grad_scale / m_total``,
  so the accumulated gradients are those of the mean over micro-batches (and over dp, with
  ``grad_scale = 1/dp``) -- the reference's loss; elsewhere ``y.backward(dL/dy)`` with the
  received gradient. ``dL/dx`` is then ready to send.
* ``I m c`` / ``W m c``: the same backward in two halves (:mod:`.split`): ``I`` with the
  linears' weight gradients deferred (the chunk's forward ran under ``SplitLinears``), ``W``
  computes them. ``dL/dx`` is ready after ``I``.
* Two neighbouring stages on this rank (the V placement's turn): the activation and its
  gradient are handed over in memory (``local_next``), no transfer.
* transfers: a run of consecutive transfers is posted as one batched isend/irecv through
  :mod:`paratrain.comm`; a receive is waited for just before the compute that consumes it, sends
  at the end of the step (the runtime waits for less than the checker's blocking semantics,
  so a checked schedule cannot deadlock here). Shapes are known in advance -- every activation
  and its gradient is ``(B/m, T, H)`` -- so no metadata travels.

Every action's start and end (``time.perf_counter``; on CUDA after a synchronize) is recorded
for the measured timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from paratrain import comm
from paratrain.comm import P2P, Group, Handle
from paratrain.core.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action, B, F, I, W
from paratrain.parallel.pipeline.split import SplitLinears, WeightGrads

ChunkFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Key = tuple[int, int]  # (micro-batch, chunk)


@dataclass
class _Step:
    """What one step's execution keeps between actions."""

    training: bool
    x_in: dict[Key, torch.Tensor] = field(default_factory=dict)  # chunk inputs, kept for backward
    y_out: dict[Key, torch.Tensor] = field(default_factory=dict)  # chunk outputs, kept for backward
    outbox: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)  # (send kind, mb, c)
    inbox: dict[tuple[str, int, int], tuple[torch.Tensor, Handle, int]] = field(default_factory=dict)
    sends: list[tuple[Handle, int, torch.Tensor]] = field(default_factory=list)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    times: list[tuple[float, float]] = field(default_factory=list)
    split: set[Key] = field(default_factory=set)  # (micro-batch, chunk) whose backward is I + W
    weight_grads: dict[Key, WeightGrads] = field(default_factory=dict)  # forwarded under SplitLinears
    local: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)  # handed over in memory


class PipelineRuntime:
    """Runs action lists on one pipeline rank. ``chunks[c]`` computes this rank's chunk ``c``;
    ``first``/``last`` say which chunk holds the model's first / last stage (or None);
    ``local_next[c]``: the chunk of this rank holding the stage after chunk ``c``'s, if any."""

    def __init__(self, group: Group, chunks: Sequence[ChunkFn], first: int | None, last: int | None,
                 local_next: dict[int, int] | None = None) -> None:
        self.group = group
        self.chunks = chunks
        self.first = first
        self.last = last
        self.local_next = dict(local_next or {})
        self.local_prev = {b: a for a, b in self.local_next.items()}

    def run(self, actions: Sequence[Action], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
            act_shape: tuple[int, ...], act_dtype: torch.dtype, loss_scale: float | None = None,
            on_backward: Callable[[bool, str], None] | None = None,
            ) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
        """Execute ``actions`` for one step. ``inputs``/``targets``: per micro-batch token ids and
        labels (used by the first / last stage). ``loss_scale`` None: forward only (no graph is
        kept). ``on_backward(final, kind)`` runs before each backward action (``kind`` B, I or W),
        ``final`` for the rank's last.
        Returns the detached micro-batch losses (last stage, in micro-batch order; empty
        elsewhere) and the ``(start, end)`` of every action."""
        device = inputs[0].device
        st = _Step(loss_scale is not None, times=[(0.0, 0.0)] * len(actions))
        st.split = {(a.microbatch, a.chunk) for a in actions if a.kind == I}
        last_b = max((i for i, a in enumerate(actions) if a.kind in (B, I, W)), default=-1)
        i = 0
        while i < len(actions):
            a = actions[i]
            if not a.is_compute:  # post the whole run of transfers as one batch
                j = i
                while j < len(actions) and not actions[j].is_compute:
                    j += 1
                self._post(st, actions, range(i, j), act_shape, act_dtype, device)
                i = j
                continue
            if a.kind == F:
                if a.chunk == self.first:
                    x = inputs[a.microbatch]
                else:  # a leaf: backward leaves dL/dx in x.grad
                    x = self._input(st, RECV_ACT, a).requires_grad_(st.training)
                t0 = time.perf_counter()
                self._forward(st, a, x, targets[a.microbatch] if a.chunk == self.last else None)
            elif a.kind == W:
                t0 = time.perf_counter()
                if on_backward is not None:
                    on_backward(i == last_b, a.kind)
                st.weight_grads.pop((a.microbatch, a.chunk)).run()
            else:
                grad = None if a.chunk == self.last else self._input(st, RECV_GRAD, a)
                t0 = time.perf_counter()
                if on_backward is not None:
                    on_backward(i == last_b, a.kind)
                self._backward(st, a, grad, loss_scale)
            if device.type == "cuda":  # kernels are asynchronous: time them done
                torch.cuda.synchronize(device)
            st.times[i] = (t0, time.perf_counter())
            i += 1
        for handle, index, _ in st.sends:  # the tensors stay referenced until sent
            handle.wait()
            st.times[index] = (st.times[index][0], time.perf_counter())
        assert not st.inbox, f"received but never used: {sorted(st.inbox)}"
        assert not st.weight_grads, f"weight gradients never computed: {sorted(st.weight_grads)}"
        return [st.losses[m] for m in sorted(st.losses)], st.times

    def _forward(self, st: _Step, a: Action, x: torch.Tensor, targets: torch.Tensor | None) -> None:
        key = (a.microbatch, a.chunk)
        if st.training and key in st.split:
            box = st.weight_grads[key] = WeightGrads()
            with SplitLinears(box):
                y = self.chunks[a.chunk](x, targets)
        else:
            y = self.chunks[a.chunk](x, targets)
        if a.chunk == self.last:
            st.losses[a.microbatch] = y.detach()
        elif a.chunk in self.local_next:  # the next stage is this rank's: no transfer
            st.local[(RECV_ACT, a.microbatch, self.local_next[a.chunk])] = y.detach()
        else:
            st.outbox[(SEND_ACT, *key)] = y
        if st.training:
            st.x_in[key], st.y_out[key] = x, y

    def _backward(self, st: _Step, a: Action, grad: torch.Tensor | None, loss_scale: float | None) -> None:
        """``B``, or ``I`` with the weight gradients deferred to the chunk's ``W``."""
        key = (a.microbatch, a.chunk)
        y, x = st.y_out.pop(key), st.x_in.pop(key)
        if grad is None:  # the last stage: y is the micro-batch's mean loss
            (y * loss_scale).backward()
        else:
            y.backward(grad)
        if a.chunk in self.local_prev:
            st.local[(RECV_GRAD, a.microbatch, self.local_prev[a.chunk])] = x.grad
        elif a.chunk != self.first:
            st.outbox[(SEND_GRAD, *key)] = x.grad

    def _input(self, st: _Step, kind: str, a: Action) -> torch.Tensor:
        """The tensor compute ``a`` consumes: handed over on this rank, or received."""
        local = st.local.pop((kind, a.microbatch, a.chunk), None)
        return local if local is not None else self._received(st, kind, a)

    def _received(self, st: _Step, kind: str, a: Action) -> torch.Tensor:
        """Wait for the transfer that feeds compute ``a``; its buffer."""
        buf, handle, index = st.inbox.pop((kind, a.microbatch, a.chunk))
        handle.wait()
        st.times[index] = (st.times[index][0], time.perf_counter())
        return buf

    def _post(self, st: _Step, actions: Sequence[Action], indices: range, shape: tuple[int, ...],
              dtype: torch.dtype, device: torch.device) -> None:
        """Post the transfers ``actions[indices]`` as one batch: sends of chunk outputs (the
        activation after F, the input gradient after B), receives into fresh buffers of the
        agreed shape."""
        ops = []
        for i in indices:
            a = actions[i]
            if a.kind in (SEND_ACT, SEND_GRAD):
                t = st.outbox.pop((a.kind, a.microbatch, a.chunk)).detach()
                if t.shape != shape or t.dtype != dtype:
                    raise RuntimeError(f"{a}: tensor {tuple(t.shape)} {t.dtype} differs from the agreed "
                                       f"{tuple(shape)} {dtype}; the receiver would misread it")
                ops.append(P2P("send", t.contiguous(), a.peer))
            else:
                ops.append(P2P("recv", torch.empty(shape, dtype=dtype, device=device), a.peer))
        t0 = time.perf_counter()
        for i, op, handle in zip(indices, ops, comm.post_p2p(ops, self.group)):
            a = actions[i]
            st.times[i] = (t0, t0)
            if op.kind == "recv":
                st.inbox[(a.kind, a.microbatch, a.chunk)] = (op.tensor, handle, i)
            else:
                st.sends.append((handle, i, op.tensor))
