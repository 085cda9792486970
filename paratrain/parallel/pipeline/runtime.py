"""Executes one pipeline rank's action list; decides nothing (the schedule is data).

Per action, on this rank (chunk ``c`` is stage ``s = c * pp + rank`` of ``S``):

* ``F m c``: ``y = chunk_c(x)`` with ``x`` the tokens of micro-batch ``m`` (``s = 0``) or the
  received activation (a leaf that requires grad, so backward yields ``dL/dx``). On the last stage
  ``y`` is the micro-batch's mean loss ``L_m``.
* ``B m c``: on the last stage, backward of ``scale * L_m`` with ``scale = grad_scale / m_total``,
  so the accumulated gradients are those of the mean over micro-batches (and over dp, with
  ``grad_scale = 1/dp``) -- the reference's loss; elsewhere ``y.backward(dL/dy)`` with the
  received gradient. ``dL/dx`` is then ready to send.
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
from paratrain.core.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action, B, F

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


class PipelineRuntime:
    """Runs action lists on one pipeline rank. ``chunks[c]`` computes this rank's chunk ``c``;
    ``first``/``last`` say which chunk holds the model's first / last stage (or None)."""

    def __init__(self, group: Group, chunks: Sequence[ChunkFn], first: int | None, last: int | None) -> None:
        self.group = group
        self.chunks = chunks
        self.first = first
        self.last = last

    def run(self, actions: Sequence[Action], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
            act_shape: tuple[int, ...], act_dtype: torch.dtype, loss_scale: float | None = None,
            on_backward: Callable[[bool], None] | None = None) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
        """Execute ``actions`` for one step. ``inputs``/``targets``: per micro-batch token ids and
        labels (used by the first / last stage). ``loss_scale`` None: forward only (no graph is
        kept). ``on_backward(final)`` runs before each backward, ``final`` for the rank's last.
        Returns the detached micro-batch losses (last stage, in micro-batch order; empty
        elsewhere) and the ``(start, end)`` of every action."""
        device = inputs[0].device
        st = _Step(loss_scale is not None, times=[(0.0, 0.0)] * len(actions))
        last_b = max((i for i, a in enumerate(actions) if a.kind == B), default=-1)
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
                    x = self._received(st, RECV_ACT, a).requires_grad_(st.training)
                t0 = time.perf_counter()
                self._forward(st, a, x, targets[a.microbatch] if a.chunk == self.last else None)
            else:
                grad = None if a.chunk == self.last else self._received(st, RECV_GRAD, a)
                t0 = time.perf_counter()
                if on_backward is not None:
                    on_backward(i == last_b)
                self._backward(st, a, grad, loss_scale)
            if device.type == "cuda":  # kernels are asynchronous: time them done
                torch.cuda.synchronize(device)
            st.times[i] = (t0, time.perf_counter())
            i += 1
        for handle, index, _ in st.sends:  # the tensors stay referenced until sent
            handle.wait()
            st.times[index] = (st.times[index][0], time.perf_counter())
        assert not st.inbox, f"received but never used: {sorted(st.inbox)}"
        return [st.losses[m] for m in sorted(st.losses)], st.times

    def _forward(self, st: _Step, a: Action, x: torch.Tensor, targets: torch.Tensor | None) -> None:
        key = (a.microbatch, a.chunk)
        y = self.chunks[a.chunk](x, targets)
        if a.chunk == self.last:
            st.losses[a.microbatch] = y.detach()
        else:
            st.outbox[(SEND_ACT, *key)] = y
        if st.training:
            st.x_in[key], st.y_out[key] = x, y

    def _backward(self, st: _Step, a: Action, grad: torch.Tensor | None, loss_scale: float | None) -> None:
        key = (a.microbatch, a.chunk)
        y, x = st.y_out.pop(key), st.x_in.pop(key)
        if grad is None:  # the last stage: y is the micro-batch's mean loss
            (y * loss_scale).backward()
        else:
            y.backward(grad)
        if a.chunk != self.first:
            st.outbox[(SEND_GRAD, *key)] = x.grad

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
