"""``paratrain explain``: which rank holds what, and what it sends, for one layout. No processes.

Everything comes from the functions the runtime and the planner share: the rank <-> (dp, pp, tp)
arithmetic of :class:`paratrain.mesh.MeshShape`, the pipeline partition of
:func:`paratrain.plan.topology.pipeline_shape` (the one ``paratrain train`` uses), the traffic
formulas of :mod:`paratrain.core.traffic` and the ring algorithms of
:func:`paratrain.core.ring.wire_bytes`. Bytes are fp32 (gradients and activations, 4 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from paratrain.config import Layout
from paratrain.core import traffic
from paratrain.core.partition import stage_units
from paratrain.core.ring import wire_bytes
from paratrain.core.schedules import placement_of
from paratrain.core.vocab import padded_vocab_size
from paratrain.mesh import AXES, DPCP, MeshShape
from paratrain.models.configs import ModelConfig
from paratrain.plan.formulas import block_params_per_device, expert_params_per_block, shape_args
from paratrain.plan.topology import pipeline_shape
from paratrain.text import format_grid

ELEM = 4  # bytes per fp32 activation and gradient element


@dataclass(frozen=True)
class Send:
    """One kind of collective a rank takes part in per step: on ``group`` (an axis, or ``embedding``
    for the tied-embedding all-reduce of the first and last stage)."""

    group: str
    op: str
    calls: int
    payload: int  # bytes as paratrain.comm counts them
    wire: float  # bytes this rank puts on the wire (core.ring.wire_bytes)


@dataclass(frozen=True)
class RankView:
    rank: int
    dp: int
    pp: int
    tp: int
    units: tuple[str, ...]  # "embedding", "blocks 0-1", "head"
    params: int
    sends: tuple[Send, ...]
    cp: int = 0
    ep: int = 0  # index in its expert-parallel group (dp index mod ep)


def _units(model: ModelConfig, layout: Layout, seq_len: int, pp_index: int) -> tuple[tuple[str, ...], list[int]]:
    """What pipeline rank ``pp_index`` runs, in words, and the indices of its blocks."""
    shape = pipeline_shape(model, seq_len, layout.pp, layout.virtual_stages)
    ranges = stage_units(shape.chunks)
    names, blocks = [], []
    for k in _chunks_of(layout, pp_index, len(shape.chunks)):
        units = ranges[k]
        if 0 in units:
            names.append("embedding")
        layers = [u - 1 for u in units if 1 <= u <= model.num_layers]
        blocks += layers
        names.append(f"blocks {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"block {layers[0]}")
        if model.num_layers + 1 in units:
            names.append(f"final {'RMSNorm' if model.family == 'llama' else 'LayerNorm'} + head")
    return tuple(names), blocks


def _chunks_of(layout: Layout, pp_index: int, num_chunks: int) -> list[int]:
    """The stages (chunks) pipeline rank ``pp_index`` holds, in model order: every ``pp``-th
    (the loop placement) or, for ZB-V, stage ``r`` and stage ``2 p - 1 - r`` (the V)."""
    if placement_of(layout.schedule) == "v":
        return [pp_index, num_chunks - 1 - pp_index]
    return list(range(pp_index, num_chunks, layout.pp))


def _params(model: ModelConfig, layout: Layout, first: bool, last: bool, num_blocks: int) -> int:
    """Parameters this rank holds (before ZeRO shards them over dp): the planner's count."""
    t, h = layout.tp, model.hidden
    embed = padded_vocab_size(model.vocab_size, t) * h // t
    # the last stage keeps its own W_e, unless it is on the first stage's rank (ZB-V's V)
    head_copy = (not model.tie_embeddings) or (layout.pp > 1 and placement_of(layout.schedule) != "v")
    gpt = model.family == "gpt"  # Llama: rotary positions (no weights), an RMSNorm without bias
    positions = model.max_seq_len * h if gpt else 0
    final_norm = 2 * h if gpt else h
    own = (embed + positions if first else 0) + ((final_norm + (embed if head_copy else 0)) if last else 0)
    return int(num_blocks * block_params_per_device(h, model.ffn_hidden, t, **shape_args(model), ep=layout.ep) + own)


def _expert_params(model: ModelConfig, layout: Layout, num_blocks: int) -> int:
    """Of :func:`_params`, the experts sharded over ep (reduced over the dp / ep ranks holding them)."""
    return int(num_blocks * expert_params_per_block(model.hidden, model.ffn_hidden, layout.tp, **shape_args(model),
                                                    ep=layout.ep))


def _tp_sends(model: ModelConfig, layout: Layout, b: int, s: int, blocks: list[int], first: bool,
              last: bool) -> list[Send]:
    m, t = layout.microbatches, layout.tp
    moe = sum(model.is_moe_block(i) for i in blocks)
    per = traffic.tp_traffic(model, t, layout.sequence_parallel, b // m, s, num_layers=len(blocks), embedding=first,
                             head=last, recompute=layout.recompute, moe_blocks=moe)
    ops: dict[str, tuple[int, int]] = {}
    for (phase, op), (calls, nbytes) in per.items():
        k = 1 if phase == traffic.STEP else m
        c, n = ops.get(op, (0, 0))
        ops[op] = (c + k * calls, n + k * nbytes)
    if t > 1:
        c, n = ops.get("all_reduce", (0, 0))
        ops["all_reduce"] = (c + 1, n + 4)  # the gradient norm's squared sum
    return [Send("tp", op, c, n, wire_bytes(op, t, n)) for op, (c, n) in sorted(ops.items())]


def rank_views(model: ModelConfig, layout: Layout, global_batch: int, seq_len: int,
               zero3_gather: str = "microbatch") -> list[RankView]:
    """Every rank of the layout: its coordinates, layers, parameters and sends per step."""
    mesh = MeshShape(layout.dp, layout.pp, layout.tp, layout.cp, layout.ep)
    b = global_batch // layout.dp  # sequences per data-parallel rank and step
    s = seq_len // layout.cp  # tokens of each sequence a context-parallel rank holds
    m, ep = layout.microbatches, layout.ep
    placement = placement_of(layout.schedule)
    out = []
    for r in range(mesh.world_size):
        c = mesh.coords(r)
        first, last = c.pp == 0, c.pp == layout.pp - 1
        if placement == "v":  # ZB-V: rank 0 holds the first and the last stage
            first = last = c.pp == 0
        names, blocks = _units(model, layout, seq_len, c.pp)
        params = _params(model, layout, first, last, len(blocks))
        experts = _expert_params(model, layout, len(blocks))
        sends = _tp_sends(model, layout, b, s, blocks, first, last)
        if layout.cp > 1:  # the ring's keys and values (forward) and their gradients (backward)
            ring = traffic.cp_comm_per_step(model, layout.cp, layout.tp, b, seq_len, m, num_layers=len(blocks),
                                            recompute=layout.recompute)
            sends += [Send("cp", op.removesuffix("_send"), calls, nbytes, float(nbytes))
                      for op, (calls, nbytes) in sorted(ring.items()) if op.endswith("_send")]
        moe = sum(model.is_moe_block(i) for i in blocks)
        if ep > 1 and moe:  # the tokens' all-to-alls of this rank's mixture-of-experts blocks
            per_block = traffic.ep_comm_per_step(model, ep, b, s, m)
            share = moe / model.num_moe_blocks
            for op, (calls, nbytes) in sorted(per_block.items()):
                calls, nbytes = round(calls * share), round(nbytes * share)
                wire = nbytes * (ep - 1) / ep if op != "ep_counts" else float(nbytes)
                sends.append(Send("ep", op, calls, nbytes, wire))
        if layout.pp > 1:
            nbytes = traffic.pp_send_bytes_per_step(model, layout.pp, layout.virtual_stages, c.pp, b, s,
                                                    layout.tp, layout.sequence_parallel, placement=placement)
            calls = traffic.p2p_sends_per_microbatch(layout.pp, layout.virtual_stages, placement)[c.pp] * m
            sends.append(Send("pp", "send", calls, nbytes, wire_bytes("send", 2, nbytes)))
            sends.append(Send("pp", "all_reduce", 1, 4, wire_bytes("all_reduce", layout.pp, 4)))  # gradient norm
            if model.tie_embeddings and (first or last) and placement != "v":
                tied = traffic.tied_embedding_bytes(model, layout.tp)
                sends.append(Send("embedding", "all_reduce", 1, tied, wire_bytes("all_reduce", 2, tied)))
        # gradients: the dense ones averaged over dp x cp, the experts' over the dp / ep ranks holding them
        n, edp = layout.dp * layout.cp, layout.dp // ep * layout.cp
        dense = "dp x cp" if layout.cp > 1 else "dp"
        for group, size, count_params in ((dense, n, params - experts), ("edp", edp, experts)):
            if count_params <= 0:
                continue
            for op, per_param, _window, count in traffic.dp_parts(layout.zero, m, size, ELEM, ELEM, layout.pp,
                                                                   zero3_gather):
                nbytes = int(per_param * count_params) * count
                sends.append(Send(group, op, count, nbytes, wire_bytes(op, size, nbytes)))
            if layout.zero and size > 1:  # the sharded gradients' squared norm (core.traffic.zero_comm_per_step)
                sends.append(Send(group, "all_reduce", 1, 4, wire_bytes("all_reduce", size, 4)))
        out.append(RankView(r, c.dp, c.pp, c.tp, names, params, tuple(sends), c.cp, c.dp % ep))
    return out


def weight_slices(model: ModelConfig, tp: int, tp_index: int) -> list[tuple[str, str]]:
    """Which slice of each weight tensor-parallel rank ``tp_index`` holds, under the model's own
    names and shapes: the built-in GPT's and Llama's ``nn.Linear`` (out x in), Hugging Face
    GPT-2's ``Conv1D`` (in x out, so its column-parallel split takes columns)."""
    h, F, a, V = model.hidden, model.ffn_hidden, model.num_heads, padded_vocab_size(model.vocab_size, tp)

    def part(n: int) -> str:
        w = n // tp
        return f"[{tp_index * w}:{(tp_index + 1) * w}]"

    def heads(n: int, of: str = "") -> str:
        lo, hi = tp_index * n // tp, (tp_index + 1) * n // tp - 1
        return f"{of}head {lo} of {n}" if lo == hi else f"{of}heads {lo}-{hi} of {n}"

    vocab = (f"rows {part(V)} of ({V}, {h})" + (f" (vocabulary {model.vocab_size} padded)" if V != model.vocab_size
                                                else ""))
    tied = ", tied to the head" if model.tie_embeddings else ""
    if model.family == "llama":
        kv, d = model.num_kv_heads, model.head_dim
        kv_rows = f"rows {part(kv * d)} ({heads(kv, 'key/value ')}) of ({kv * d}, {h}): column-parallel"
        out = [("self_attn.q_proj.weight", f"rows {part(a * d)} ({heads(a)}) of ({a * d}, {h}): column-parallel"),
               ("self_attn.k_proj.weight", kv_rows), ("self_attn.v_proj.weight", kv_rows),
               ("self_attn.o_proj.weight", f"columns {part(a * d)} of ({h}, {a * d}): row-parallel, output "
                                           "all-reduced"),
               ("mlp.gate_proj.weight", f"rows {part(F)} of ({F}, {h}): column-parallel"),
               ("mlp.up_proj.weight", f"rows {part(F)} of ({F}, {h}): column-parallel"),
               ("mlp.down_proj.weight", f"columns {part(F)} of ({h}, {F}): row-parallel, output all-reduced"),
               ("embed_tokens.weight", vocab + tied)]
        if not model.tie_embeddings:
            out.append(("lm_head.weight", vocab + ": column-parallel over the vocabulary"))
        return out + [("replicated", "the RMSNorms (input_layernorm, post_attention_layernorm, norm); "
                                     "rotary positions have no weights")]
    if model.name == "hf-gpt2":  # transformers' GPT2LMHeadModel: Conv1D weights are (in, out)
        return [
            ("attn.c_attn.weight", f"columns {part(h)} of each of q, k, v ({heads(a)}) of ({h}, {3 * h}): "
                                   "column-parallel"),
            ("attn.c_proj.weight", f"rows {part(h)} of ({h}, {h}): row-parallel, output all-reduced"),
            ("mlp.c_fc.weight", f"columns {part(F)} of ({h}, {F}): column-parallel"),
            ("mlp.c_proj.weight", f"rows {part(F)} of ({F}, {h}): row-parallel, output all-reduced"),
            ("wte.weight", vocab + tied),
            ("replicated", "ln_1, ln_2, ln_f, row-parallel biases, wpe (positions)"),
        ]
    return [
        ("attn.qkv.weight", f"rows {part(h)} of each of q, k, v ({heads(a)}) of ({3 * h}, {h}): column-parallel"),
        ("attn.proj.weight", f"columns {part(h)} of ({h}, {h}): row-parallel, output all-reduced"),
        ("mlp.fc1.weight", f"rows {part(F)} of ({F}, {h}): column-parallel"),
        ("mlp.fc2.weight", f"columns {part(F)} of ({h}, {F}): row-parallel, output all-reduced"),
        ("wte.weight", vocab + tied),
        ("replicated", "LayerNorms, row-parallel biases, wpe (positions)"),
    ]


def human(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def explain_text(model: ModelConfig, layout: Layout, global_batch: int, seq_len: int,
                 zero3_gather: str = "microbatch") -> str:
    mesh = MeshShape(layout.dp, layout.pp, layout.tp, layout.cp, layout.ep)
    views = rank_views(model, layout, global_batch, seq_len, zero3_gather)
    cp, ep = layout.cp > 1, layout.ep > 1
    numbering = ("rank = ((pp * dp + dp_index) * cp + cp_index) * tp + tp_index" if cp
                 else "rank = (pp * dp + dp_index) * tp + tp_index")
    lines = [f"paratrain explain: {model.name} [{layout}] on {mesh.world_size} ranks, global batch "
             f"{global_batch} x {seq_len} tokens, fp32; {numbering}", ""]
    groups = ["dp x cp" if cp else "dp", *(["edp"] if ep else []), "tp", *(["cp"] if cp else []),
              *(["ep"] if ep else []), "pp", "embedding"]
    coords = ["dp", *(["ep"] if ep else []), "pp", *(["cp"] if cp else []), "tp"]
    rows = [[str(v.rank), *(str(getattr(v, a)) for a in coords), ", ".join(v.units), f"{v.params:,}",
             *(human(sum(s.wire for s in v.sends if s.group == g)) for g in groups)]
            for v in views]
    names = {"embedding": "emb sends", "edp": "edp sends (experts)"}
    lines += [format_grid(["rank", *coords, "layers", "params", *(names.get(g, f"{g} sends") for g in groups)],
                          rows), ""]
    lines.append("process groups (global ranks):")
    for axis in AXES:
        if axis != "cp" or cp:
            lines.append(f"  {axis}: " + "  ".join(str(g) for g in mesh.all_groups(axis)))
    if cp:
        lines.append("  dp x cp (gradients averaged): " + "  ".join(str(g) for g in mesh.all_groups(DPCP)))
    if ep:
        lines.append("  ep (tokens exchanged, E / ep experts each): "
                     + "  ".join(str(g) for g in mesh.expert_groups("ep")))
        lines.append("  edp (the same experts, their gradients averaged): "
                     + "  ".join(str(g) for g in mesh.expert_groups("edp")))
    if model.tie_embeddings and layout.pp > 1 and placement_of(layout.schedule) != "v":
        pairs = [[mesh.rank_of(d, 0, t, c), mesh.rank_of(d, layout.pp - 1, t, c)] for d in range(layout.dp)
                 for c in range(layout.cp) for t in range(layout.tp)]
        lines.append("  embedding (first and last stage, tied weights): " + "  ".join(str(p) for p in pairs))
    lines += ["", f"weight slices of every block, per tp rank (tp = {layout.tp}):"]
    for t in range(layout.tp):
        lines.append(f"  tp rank {t}:")
        slices = weight_slices(model, layout.tp, t)
        width = max(len(name) for name, _ in slices) + 1
        lines += [f"    {name:<{width}} {what}" for name, what in slices]
    if ep:
        e = model.num_experts // layout.ep
        lines += ["", f"experts per ep rank (ep = {layout.ep}, {model.num_experts} experts in each of "
                      f"{model.num_moe_blocks} mixture-of-experts blocks):"]
        lines += [f"  ep rank {j}: experts {j * e}-{(j + 1) * e - 1}" for j in range(layout.ep)]
    lines += ["", "sends per step of rank 0 (payload as counted by paratrain.comm; wire: what this rank sends, "
              "ring algorithms):"]
    lines.append(format_grid(["group", "op", "calls", "payload", "wire"],
                             [[s.group, s.op, str(s.calls), human(s.payload), human(s.wire)] for s in views[0].sends]))
    return "\n".join(lines)
