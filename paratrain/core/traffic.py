"""What each parallel strategy sends per step: the one set of formulas the runtime's tests and
the planner share. Pure Python (no torch): ``paratrain estimate`` imports it.

Bytes are *payloads* as :mod:`paratrain.comm` counts them (all-reduce: its input; all-gather:
its output; reduce-scatter: its input; a send: its tensor). The bytes one device puts on the
wire follow from the ring algorithms: :func:`paratrain.core.ring.wire_bytes`, the function
``comm`` counts with.

Notation: ``n`` = tp, ``b`` sequences per micro-batch, ``s`` sequence length, ``h`` hidden,
``L`` blocks on this pipeline rank, ``e`` bytes per activation element (4 for fp32; 2 when
activations travel in 16 bits), ``A = b s h e`` one micro-batch's hidden states.

Tensor parallelism, per micro-batch, on one rank holding ``L`` blocks (and perhaps the
embedding and the head), as ``parallel/tensor.py`` and ``parallel/vocab.py`` run it::

    no SP   forward   all_reduce  L_emb + 2L                (embedding g, per block 2 g)   of A
                      all_reduce  2 if head: the cross-entropy's max (4bs) and the stacked
                                  [sum exp; target logit] (2 x 4bs) -- 2 calls, 3 x 4bs bytes
            backward  all_reduce  2L + L_head               (per block 2 f, the LM head's f) of A
    SP      forward   all_gather  2L + L_head               (before qkv, fc1, the LM head)   of A
                      reduce_scatter 2L + L_emb             (after proj, fc2, the embedding) of A
                      all_reduce  the cross-entropy's 2 calls, as without SP
            backward  all_gather  2L + L_emb                (conjugates of the reduce-scatters)
                                  + 2L + L_head             (the saved input slices regathered)
                      reduce_scatter 2L + L_head            (conjugates of the all-gathers)

Under SP the qkv, fc1 and LM-head linears keep only their input's sequence slice and all-gather
it again in backward (Korthikanti et al. 2022, sec. 4.2.2; ``tp_ops.GatheredLinearSP``): the
second backward all-gather term. Not under full recomputation (the replayed forward gathers),
zero-bubble schedules (``split_backward``: W keeps the whole input) or a Llama-family model
(its ``tp_input`` modules gather once for several linears and keep the gathered input).

(``L_emb``, ``L_head`` = 1 when the rank holds the embedding / head, else 0.) Full recomputation
replays each block's forward in backward up to its last collective whose result backward needs
(``torch.utils.checkpoint`` stops once every saved tensor is back); the block's last g feeds only
dropout and the residual add, which save nothing without dropout: per block no SP +1 all-reduce
(+2 with dropout); SP +2 all-gathers and +1 reduce-scatter (+2 with dropout). Selective
recomputation replays only the attention core: no traffic.

Once per step: the gradient norm's squared sum (1 all-reduce of 4 bytes on every group whose
ranks hold different parameters: tp, pp) and, under SP, one all-reduce of the gradients that are
partial sums over the sequence: both LayerNorms (2h each) and the row-parallel biases (h each)
of every block, the positions (``max_seq_len x h``) with the embedding and the final LayerNorm
(2h) with the head.

Pipeline parallelism sends, per micro-batch, one activation forward and one gradient back at
every stage boundary: ``(b, s, h)``, or ``(b, s/n, h)`` under sequence parallelism. Without SP
every tp rank of a stage sends the whole (replicated) tensor to its counterpart -- Megatron's
scatter/gather over tp (Narayanan et al. 2021, sec. 4.1) is not done. With tied embeddings the
first and last stage all-reduce the embedding's gradient, ``V_pad/n x h`` (``V_pad`` =
:func:`paratrain.core.vocab.padded_vocab_size`), once per step.

Context parallelism (ring attention, ``parallel/context.py``), per micro-batch, on one cp rank of
``N`` holding ``L`` blocks: every attention layer passes the keys and values of ``s/N`` tokens of
its ``h/n`` local width, ``KV = 2 b (s/N) (h/n) e`` bytes, one hop around the ring at a time::

    forward   ring_kv  send  (N - 1) L  messages of KV        (each rank's K/V visits every other)
    backward  ring_kv  send  (N - 1) L  of KV                 (K/V go round again: not stored)
              ring_dkv send  N L        of 2 b (s/N) (h/n) 4  (fp32 dK/dV ride along; the last
                                                               hop brings them home)

plus ``(N - 1) L`` more K/V messages in backward when the attention is recomputed (``full`` or
``selective``: the ring forward is replayed). Receives mirror the sends (``*_recv``, the same
calls and bytes). Gradients of replicated parameters are averaged over the dp x cp ranks in one
all-reduce per bucket (the ``dpcp`` group), as data parallelism over dp x cp ranks would.

Data parallelism and ZeRO (Rajbhandari et al. 2020, [R20]): :func:`zero_comm_per_step` in the
runtime's buckets, as ``parallel/zero.py`` and ``parallel/zero3.py`` run them, and
:func:`dp_parts`, the same collectives per parameter, as the planner prices them.
"""

from __future__ import annotations

from collections.abc import Sequence

from paratrain.core.schedules import place_of
from paratrain.core.vocab import padded_vocab_size
from paratrain.models.configs import ModelConfig

FORWARD, BACKWARD, STEP = "forward", "backward", "step"
Traffic = dict[tuple[str, str], tuple[int, int]]  # (phase, op) -> (calls, payload bytes)


def _add(out: Traffic, phase: str, op: str, calls: int, nbytes: int) -> None:
    if calls:
        c, b = out.get((phase, op), (0, 0))
        out[(phase, op)] = (c + calls, b + nbytes)


def tp_traffic(model: ModelConfig, tp: int, sequence_parallel: bool, microbatch: int, seq_len: int,
               num_layers: int | None = None, embedding: bool = True, head: bool = True,
               recompute: str = "none", elem_bytes: int = 4, grad_bytes: int = 4,
               split_backward: bool = False, moe_blocks: int | None = None) -> Traffic:
    """Tensor-parallel traffic of one tp rank: per micro-batch of ``microbatch`` sequences
    (phases ``forward`` and ``backward``) and once per step (phase ``step``: the SP partial
    gradients; the gradient norm is left to the caller, it is per group). ``num_layers`` (default
    all) blocks, the embedding and/or the head, as a pipeline stage holds them. See the module
    docstring for every term. ``split_backward``: a zero-bubble schedule's I/W split (no SP
    regather). ``moe_blocks``: how many of the blocks hold a mixture of experts, whose MLP every
    tp rank runs whole (``models/plans.py``): no MLP reduction there (default: the model's count
    over all its blocks; over ``num_layers`` of them, that share rounded). A group of one moves nothing."""
    out: Traffic = {}
    if tp == 1:
        return out
    L = model.num_layers if num_layers is None else num_layers
    M = moe_blocks if moe_blocks is not None else \
        model.num_moe_blocks if num_layers is None else round(L * model.num_moe_blocks / model.num_layers)
    h, emb, hd = model.hidden, int(embedding), int(head)
    A = microbatch * seq_len * h * elem_bytes
    full = recompute == "full"
    last = 1 if model.dropout > 0 else 0  # the block's last reduction is replayed only if needed
    if sequence_parallel:
        _add(out, FORWARD, "all_gather", 2 * L + hd, (2 * L + hd) * A)
        _add(out, FORWARD, "reduce_scatter", 2 * L + emb, (2 * L + emb) * A)
        regather = not full and not split_backward and model.family == "gpt"
        gathers = 2 * L + emb + (2 * L if full else 0) + ((2 * L + hd) if regather else 0)
        scatters = 2 * L + hd + ((1 + last) * L if full else 0)
        _add(out, BACKWARD, "all_gather", gathers, gathers * A)
        _add(out, BACKWARD, "reduce_scatter", scatters, scatters * A)
        if model.family == "gpt":  # 2 LayerNorms (4h), 2 row biases (2h); positions; the final LayerNorm
            partial = L * (4 * h + 2 * h) + emb * model.max_seq_len * h + hd * 2 * h
        else:  # Llama: 2 RMSNorm weights, no biases, rotary positions; the final RMSNorm
            partial = L * 2 * h + hd * h
        _add(out, STEP, "all_reduce", 1, partial * grad_bytes)
    else:  # per block: attention's proj and the MLP's fc2 in forward, qkv's and fc1's inputs in backward
        _add(out, FORWARD, "all_reduce", emb + 2 * L - M, (emb + 2 * L - M) * A)
        reduces = 2 * L - M + hd + ((1 + last) * L if full else 0)
        _add(out, BACKWARD, "all_reduce", reduces, reduces * A)
    if head:  # vocab-parallel cross-entropy, fp32 whatever the activations' precision
        _add(out, FORWARD, "all_reduce", 2, 3 * microbatch * seq_len * 4)
    return out


def tp_comm_per_step(model: ModelConfig, tp: int, sequence_parallel: bool, local_batch: int,
                     seq_len: int, microbatches: int = 1, recompute: str = "none") -> dict[str, tuple[int, int]]:
    """The traffic of one training step on the tp group of a model that is not pipelined,
    ``{op: (calls, bytes)}``, fp32; ``local_batch`` = global batch / dp, split into
    ``microbatches``. Includes the gradient norm's all-reduce (filed as ``grad_norm``). This is
    what ``comm``'s counters of the tp group show after one step (tested exactly).

    No term depends on the vocabulary, padded (:func:`~paratrain.core.vocab.padded_vocab_size`) or not: the logits
    never travel (the cross-entropy moves 3 floats per token), the embedding's sum and the LM
    head's input gradient are (b, s, h) activations, and the vocabulary-sized weights are not
    replicated over tp. Only the checkpoint gather (not per step; tagged ``"checkpoint"``)
    carries the padding rows: V'*h*4 bytes per embedding / untied head."""
    if tp == 1:
        return {}
    per = tp_traffic(model, tp, sequence_parallel, local_batch // microbatches, seq_len, recompute=recompute)
    out: dict[str, tuple[int, int]] = {"grad_norm": (1, 4)}
    for (phase, op), (calls, nbytes) in per.items():
        k = 1 if phase == STEP else microbatches
        c, b = out.get(op, (0, 0))
        out[op] = (c + k * calls, b + k * nbytes)
    return out


def p2p_sends_per_microbatch(pp: int, virtual_stages: int, placement: str = "loop") -> tuple[int, ...]:
    """Tensors each pipeline rank sends per micro-batch: at every boundary between stages
    ``c -> c + 1`` (stage ``c`` runs on rank ``c mod pp``, or as :func:`.schedules.place_of`
    says for ``placement``) the upstream rank sends the activation forward and the downstream
    rank its gradient back -- unless both stages are on one rank (the V placement's turn)."""
    sends = [0] * pp
    for c in range(pp * virtual_stages - 1):
        a, b = place_of(placement, pp, c)[0], place_of(placement, pp, c + 1)[0]
        if a != b:
            sends[a] += 1
            sends[b] += 1
    return tuple(sends)


def p2p_tensor_bytes(hidden: int, microbatch: int, seq_len: int, tp: int, sequence_parallel: bool,
                     elem_bytes: int = 4) -> int:
    """One pipeline message: ``(b, s, h)`` elements, ``(b, s/n, h)`` under sequence parallelism."""
    return microbatch * (seq_len // (tp if sequence_parallel else 1)) * hidden * elem_bytes


def pp_send_bytes_per_step(model: ModelConfig, pp: int, virtual_stages: int, rank: int, local_batch: int,
                           seq_len: int, tp: int = 1, sequence_parallel: bool = False,
                           elem_bytes: int = 4, placement: str = "loop") -> int:
    """Bytes pipeline rank ``rank`` sends on the pp group in one step: its sends per micro-batch
    times the local batch's hidden states (the micro-batches add up to ``local_batch``)."""
    if pp == 1:
        return 0
    sends = p2p_sends_per_microbatch(pp, virtual_stages, placement)[rank]
    return sends * p2p_tensor_bytes(model.hidden, local_batch, seq_len, tp, sequence_parallel, elem_bytes)


def tied_embedding_bytes(model: ModelConfig, tp: int, grad_bytes: int = 4) -> int:
    """The embedding gradient all-reduced between the first and last pipeline stage (per tp
    shard), once per step: ``V_pad/n x h`` gradients."""
    return padded_vocab_size(model.vocab_size, tp) // tp * model.hidden * grad_bytes


def zero_comm_per_step(stage: int, bucket_bytes: Sequence[int], microbatches: int = 1,
                       param_bucket_bytes: Sequence[int] | None = None, pp: int = 1,
                       gather: str = "microbatch", split_bytes: Sequence[int] = ()) -> dict[str, tuple[int, int]]:
    """The dp traffic of one training step, ``{op: (calls, bytes)}``, bytes counted as
    :mod:`paratrain.comm` does (reduce-scatter input, all-gather output: a bucket's padded
    bytes). ``B`` buckets (stage 3: units) of ``S = sum(bucket_bytes)`` bytes, ``m`` micro-batches::

        stage 0 (DP)  all_reduce      B, S
        stage 1       reduce_scatter  B, S          all_gather  B, S     (after the step)
        stage 2       reduce_scatter  m B, m S      all_gather  B, S
        stage 3       reduce_scatter  m B, m S      all_gather  2 m B, 2 m S  (forward, backward)
        stage 3, pp > 1, gather step   reduce_scatter B, S   all_gather B, S   (before the schedule)

    and, with ZeRO, ``grad_norm``: one all-reduce of 4 bytes (the shards' squared norm). On the
    wire an all-reduce is 2 (n-1)/n of its bytes, the others (n-1)/n: stage 1 sends exactly DP's
    traffic, stage 3 1.5x ([R20] sec. 7.2). With ``S = 4 psi`` (no padding) these are
    :func:`dp_parts` (tested equal). Mixed precision: ``bucket_bytes`` are the gradients' (2 bytes
    an element, 4 with ``--grad-dtype fp32``), ``param_bucket_bytes`` the all-gathered bf16
    parameters' (default: the same). ``split_bytes``: stage 3 per micro-batch under a zero-bubble
    split, the units (blocks) whose backward is split in two (I: norms and biases, W: linear
    weights), each reduced after both, the whole unit each time: ``m`` more reduce-scatters each."""
    B, S, m = len(bucket_bytes), sum(bucket_bytes), microbatches
    P = S if param_bucket_bytes is None else sum(param_bucket_bytes)
    if stage == 0:
        return {"all_reduce": (B, S)}
    once = stage == 1 or zero3_per_step(stage, pp, gather)
    rs = (B, S) if once else (m * B, m * S)
    if stage == 3 and not once and split_bytes:
        rs = (rs[0] + m * len(split_bytes), rs[1] + m * sum(split_bytes))
    ag = (2 * m * B, 2 * m * P) if stage == 3 and not once else (B, P)
    return {"reduce_scatter": rs, "all_gather": ag, "grad_norm": (1, 4)}


ZERO3_GATHERS = ("microbatch", "step")  # --zero3-gather: how ZeRO-3 gathers inside a pipeline


def zero3_per_step(zero: int, pp: int, gather: str = "microbatch") -> bool:
    """Whether ZeRO-3 gathers each unit once per step (inside a pipeline with ``--zero3-gather
    step``: ``parallel/zero3_pipeline.py``, whose stage keeps its parameters and gradients whole
    through the step) rather than around every micro-batch's forward and backward (``zero3.py``,
    and ``zero3_pipeline.py``'s per-micro-batch hooks)."""
    return zero == 3 and pp > 1 and gather == "step"


def dp_parts(zero: int, m: int, n: int, grad_b: float, param_b: float, pp: int = 1,
             gather: str = "microbatch") -> list[tuple[str, float, str, int]]:
    """Data-parallel collectives per step as (op, payload bytes per parameter, overlap window,
    count), over ``n`` dp ranks with ``m`` micro-batches, ``grad_b`` / ``param_b`` bytes per
    gradient / parameter:

    zero 0: all-reduce the gradients once, during the last backward ([R20] sec. 7: 2 psi).
    zero 1: reduce-scatter the gradients during the last backward, all-gather the updated
            parameters after the optimizer step (``step``: nothing to hide behind, the runtime
            waits for it before the next forward): the same 2 psi ([R20] sec. 7.2.1).
    zero 2: the gradient shard is reduced every micro-batch, during its backward (gradients stay
            sharded while they accumulate), parameters gathered once after the step.
    zero 3: every micro-batch all-gathers the parameters for forward (the next unit prefetched
            while one computes) and again for backward and reduce-scatters the gradients: 3 psi
            per micro-batch ([R20] sec. 7.2.2: 1.5x DP). Inside a pipeline (``pp`` > 1) with
            ``gather`` "step" once per step: all-gather before the schedule (``step``: nothing
            hides it), reduce-scatter during the last backward -- ZeRO-1's 2 psi.
    :func:`zero_comm_per_step`'s collectives, per parameter instead of per bucket."""
    if n == 1:
        return []
    if zero == 0:
        return [("all_reduce", grad_b, "backward", 1)]
    if zero == 1 or zero3_per_step(zero, pp, gather):
        return [("reduce_scatter", grad_b, "backward", 1), ("all_gather", param_b, "step", 1)]
    if zero == 2:
        return [("reduce_scatter", grad_b, "backward", m), ("all_gather", param_b, "step", 1)]
    return [("all_gather", param_b, "forward", m), ("all_gather", param_b, "backward", m),
            ("reduce_scatter", grad_b, "backward", m)]


def cp_kv_bytes(model: ModelConfig, cp: int, tp: int, microbatch: int, seq_len: int, elem_bytes: int = 4) -> int:
    """One ring message of keys and values: ``2 b (s/N) (h/n) e`` bytes (the two stacked)."""
    return 2 * microbatch * (seq_len // cp) * (model.hidden // tp) * elem_bytes


def cp_traffic(model: ModelConfig, cp: int, tp: int, microbatch: int, seq_len: int,
               num_layers: int | None = None, recompute: str = "none", elem_bytes: int = 4) -> Traffic:
    """Context-parallel ring traffic of one cp rank per micro-batch of ``microbatch`` sequences
    (phases ``forward`` / ``backward``), ``num_layers`` blocks (default all): the sends of the
    module docstring's table, receives the same. A ring of one moves nothing."""
    out: Traffic = {}
    if cp == 1:
        return out
    L = model.num_layers if num_layers is None else num_layers
    kv = cp_kv_bytes(model, cp, tp, microbatch, seq_len, elem_bytes)
    dkv = cp_kv_bytes(model, cp, tp, microbatch, seq_len, 4)
    replays = 1 if recompute in ("full", "selective") else 0
    for kind in ("send", "recv"):
        _add(out, FORWARD, f"ring_kv_{kind}", (cp - 1) * L, (cp - 1) * L * kv)
        _add(out, BACKWARD, f"ring_kv_{kind}", (1 + replays) * (cp - 1) * L, (1 + replays) * (cp - 1) * L * kv)
        _add(out, BACKWARD, f"ring_dkv_{kind}", cp * L, cp * L * dkv)
    return out


def cp_comm_per_step(model: ModelConfig, cp: int, tp: int, local_batch: int, seq_len: int,
                     microbatches: int = 1, num_layers: int | None = None,
                     recompute: str = "none") -> dict[str, tuple[int, int]]:
    """The traffic of one training step on the cp group, ``{op: (calls, bytes)}``, fp32:
    what ``comm``'s counters of the cp group show after one step (tested exactly)."""
    out: dict[str, tuple[int, int]] = {}
    per = cp_traffic(model, cp, tp, local_batch // microbatches, seq_len, num_layers, recompute)
    for (_, op), (calls, nbytes) in per.items():
        c, b = out.get(op, (0, 0))
        out[op] = (c + microbatches * calls, b + microbatches * nbytes)
    return out


EP_EXCHANGES = ("ep_dispatch", "ep_combine", "ep_dispatch_grad", "ep_combine_grad")


def ep_comm_per_step(model: ModelConfig, ep: int, local_batch: int, seq_len: int, microbatches: int = 1,
                     kept: int | None = None, elem_bytes: int = 4) -> dict[str, tuple[int, int]]:
    """Expert parallelism (``parallel/expert.py``, docs/expert.md): op -> (calls, payload bytes) of
    one rank's all-to-alls in one step, over all its mixture-of-experts blocks and micro-batches.

    Per block and micro-batch: the expert counts (E int64), then the kept rows (H each) dispatched,
    combined back, and the same two exchanges of their gradients in backward. ``kept``: the rows
    this rank keeps over the step (all blocks); default dropless, ``top_k x local_batch x seq_len``
    per block (a capacity factor keeps at most that). Wire: :func:`paratrain.core.ring.wire_bytes`
    ``("all_to_all", ep, ...)`` when the exchange is balanced, exact in ``comm``'s counters."""
    if ep == 1 or not model.num_experts:
        return {}
    blocks = model.num_moe_blocks
    calls = blocks * microbatches
    rows = model.top_k * local_batch * seq_len * blocks if kept is None else kept
    out = {op: (calls, rows * model.hidden * elem_bytes) for op in EP_EXCHANGES}
    out["ep_counts"] = (calls, calls * model.num_experts * 8)
    return out
