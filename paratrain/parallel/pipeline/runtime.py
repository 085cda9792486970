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

import torch

from paratrain import comm
from paratrain.comm import P2P, Group, Handle
from paratrain.parallel.pipeline.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action, B, F

ChunkFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Key = tuple[int, int]  # (micro-batch, chunk)


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
        cuda = device.type == "cuda"
        training = loss_scale is not None
        last_b = max((i for i, a in enumerate(actions) if a.kind == B), default=-1)
        x_in: dict[Key, torch.Tensor] = {}  # kept for backward
        y_out: dict[Key, torch.Tensor] = {}
        outbox: dict[tuple[str, int, int], torch.Tensor] = {}  # (send kind, mb, chunk) -> tensor
        recv: dict[tuple[str, int, int], tuple[torch.Tensor, Handle, int]] = {}
        send_handles: list[tuple[Handle, int, torch.Tensor]] = []
        losses: dict[int, torch.Tensor] = {}
        times: list[tuple[float, float]] = [(0.0, 0.0)] * len(actions)

        def received(kind: str, mb: int, c: int) -> torch.Tensor:
            buf, handle, index = recv.pop((kind, mb, c))
            handle.wait()
            times[index] = (times[index][0], time.perf_counter())
            return buf

        i = 0
        while i < len(actions):
            a = actions[i]
            if not a.is_compute:  # post the whole run of transfers as one batch
                j = i
                ops: list[P2P] = []
                while j < len(actions) and not actions[j].is_compute:
                    ops.append(self._p2p(actions[j], outbox, act_shape, act_dtype, device))
                    j += 1
                t0 = time.perf_counter()
                for k, (op, handle) in enumerate(zip(ops, comm.post_p2p(ops, self.group))):
                    b = actions[i + k]
                    times[i + k] = (t0, t0)
                    if op.kind == "recv":
                        recv[(b.kind, b.microbatch, b.chunk)] = (op.tensor, handle, i + k)
                    else:
                        send_handles.append((handle, i + k, op.tensor))
                i = j
                continue
            key = (a.microbatch, a.chunk)
            if a.kind == F:
                if a.chunk == self.first:
                    x = inputs[a.microbatch]
                else:
                    x = received(RECV_ACT, *key).requires_grad_(training)
                t0 = time.perf_counter()
                y = self.chunks[a.chunk](x, targets[a.microbatch] if a.chunk == self.last else None)
                if a.chunk == self.last:
                    losses[a.microbatch] = y.detach()
                else:
                    outbox[(SEND_ACT, *key)] = y
                if training:
                    x_in[key], y_out[key] = x, y
            else:
                grad = None if a.chunk == self.last else received(RECV_GRAD, *key)
                t0 = time.perf_counter()
                if on_backward is not None:
                    on_backward(i == last_b)
                y = y_out.pop(key)
                if grad is None:
                    (y * loss_scale).backward()
                else:
                    y.backward(grad)
                x = x_in.pop(key)
                if a.chunk != self.first:
                    outbox[(SEND_GRAD, *key)] = x.grad
            if cuda:
                torch.cuda.synchronize(device)
            times[i] = (t0, time.perf_counter())
            i += 1
        for handle, index, _ in send_handles:  # the tensors stay referenced until sent
            handle.wait()
            times[index] = (times[index][0], time.perf_counter())
        assert not recv, f"received but never used: {sorted(recv)}"
        return [losses[m] for m in sorted(losses)], times

    @staticmethod
    def _p2p(a: Action, outbox: dict[tuple[str, int, int], torch.Tensor], shape: tuple[int, ...],
             dtype: torch.dtype, device: torch.device) -> P2P:
        """The transfer of action ``a``: a send of the chunk's output (activation after F,
        input gradient after B), or a receive into a fresh buffer of the known shape."""
        if a.kind in (SEND_ACT, SEND_GRAD):
            t = outbox.pop((a.kind, a.microbatch, a.chunk)).detach()
            if t.shape != shape or t.dtype != dtype:
                raise RuntimeError(f"{a}: tensor {tuple(t.shape)} {t.dtype} differs from the agreed "
                                   f"{tuple(shape)} {dtype}; the receiver would misread it")
            return P2P("send", t.contiguous(), a.peer)
        return P2P("recv", torch.empty(shape, dtype=dtype, device=device), a.peer)
