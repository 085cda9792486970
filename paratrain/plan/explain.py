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
from paratrain.core.vocab import padded_vocab_size
from paratrain.mesh import AXES, MeshShape
from paratrain.models.configs import ModelConfig
from paratrain.plan.formulas import block_params_per_device, shape_args
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


def _units(model: ModelConfig, layout: Layout, seq_len: int, pp_index: int) -> tuple[tuple[str, ...], list[int]]:
    """What pipeline rank ``pp_index`` runs, in words, and its chunks' block ranges' sizes."""
    shape = pipeline_shape(model, seq_len, layout.pp, layout.virtual_stages)
    ranges = stage_units(shape.chunks)
    names, blocks = [], []
    for k in range(pp_index, len(shape.chunks), layout.pp):
        units = ranges[k]
        if 0 in units:
            names.append("embedding")
        layers = [u - 1 for u in units if 1 <= u <= model.num_layers]
        blocks.append(len(layers))
        names.append(f"blocks {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"block {layers[0]}")
        if model.num_layers + 1 in units:
            names.append(f"final {'RMSNorm' if model.family == 'llama' else 'LayerNorm'} + head")
    return tuple(names), blocks


def _params(model: ModelConfig, layout: Layout, first: bool, last: bool, num_blocks: int) -> int:
    """Parameters this rank holds (before ZeRO shards them over dp): the planner's count."""
    t, h = layout.tp, model.hidden
    embed = padded_vocab_size(model.vocab_size, t) * h // t
    head_copy = (not model.tie_embeddings) or layout.pp > 1  # the last stage keeps its own W_e
    gpt = model.family == "gpt"  # Llama: rotary positions (no weights), an RMSNorm without bias
    positions = model.max_seq_len * h if gpt else 0
    final_norm = 2 * h if gpt else h
    own = (embed + positions if first else 0) + ((final_norm + (embed if head_copy else 0)) if last else 0)
    return int(num_blocks * block_params_per_device(h, model.ffn_hidden, t, **shape_args(model)) + own)


def _tp_sends(model: ModelConfig, layout: Layout, b: int, s: int, blocks: int, first: bool, last: bool) -> list[Send]:
    m, t = layout.microbatches, layout.tp
    per = traffic.tp_traffic(model, t, layout.sequence_parallel, b // m, s, num_layers=blocks, embedding=first,
                             head=last, recompute=layout.recompute)
    ops: dict[str, tuple[int, int]] = {}
    for (phase, op), (calls, nbytes) in per.items():
        k = 1 if phase == traffic.STEP else m
        c, n = ops.get(op, (0, 0))
        ops[op] = (c + k * calls, n + k * nbytes)
    if t > 1:
        c, n = ops.get("all_reduce", (0, 0))
        ops["all_reduce"] = (c + 1, n + 4)  # the gradient norm's squared sum
    return [Send("tp", op, c, n, wire_bytes(op, t, n)) for op, (c, n) in sorted(ops.items())]


def rank_views(model: ModelConfig, layout: Layout, global_batch: int, seq_len: int) -> list[RankView]:
    """Every rank of the layout: its coordinates, layers, parameters and sends per step."""
    mesh = MeshShape(layout.dp, layout.pp, layout.tp)
    b = global_batch // layout.dp  # sequences per data-parallel rank and step
    out = []
    for r in range(mesh.world_size):
        c = mesh.coords(r)
        first, last = c.pp == 0, c.pp == layout.pp - 1
        names, chunks = _units(model, layout, seq_len, c.pp)
        params = _params(model, layout, first, last, sum(chunks))
        sends = _tp_sends(model, layout, b, seq_len, sum(chunks), first, last)
        if layout.pp > 1:
            nbytes = traffic.pp_send_bytes_per_step(model, layout.pp, layout.virtual_stages, c.pp, b, seq_len,
                                                    layout.tp, layout.sequence_parallel)
            calls = traffic.p2p_sends_per_microbatch(layout.pp, layout.virtual_stages)[c.pp] * layout.microbatches
            sends.append(Send("pp", "send", calls, nbytes, wire_bytes("send", 2, nbytes)))
            sends.append(Send("pp", "all_reduce", 1, 4, wire_bytes("all_reduce", layout.pp, 4)))  # gradient norm
            if model.tie_embeddings and (first or last):
                tied = traffic.tied_embedding_bytes(model, layout.tp)
                sends.append(Send("embedding", "all_reduce", 1, tied, wire_bytes("all_reduce", 2, tied)))
        for op, per_param, _window, count in traffic.dp_parts(layout.zero, layout.microbatches, layout.dp, ELEM, ELEM):
            nbytes = int(per_param * params) * count
            sends.append(Send("dp", op, count, nbytes, wire_bytes(op, layout.dp, nbytes)))
        if layout.zero and layout.dp > 1:  # the sharded gradients' squared norm (core.traffic.zero_comm_per_step)
            sends.append(Send("dp", "all_reduce", 1, 4, wire_bytes("all_reduce", layout.dp, 4)))
        out.append(RankView(r, c.dp, c.pp, c.tp, names, params, tuple(sends)))
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


def explain_text(model: ModelConfig, layout: Layout, global_batch: int, seq_len: int) -> str:
    mesh = MeshShape(layout.dp, layout.pp, layout.tp)
    views = rank_views(model, layout, global_batch, seq_len)
    lines = [f"paratrain explain: {model.name} [{layout}] on {mesh.world_size} ranks, global batch "
             f"{global_batch} x {seq_len} tokens, fp32; rank = (pp * dp + dp_index) * tp + tp_index", ""]
    rows = [[str(v.rank), str(v.dp), str(v.pp), str(v.tp), ", ".join(v.units), f"{v.params:,}",
             *(human(sum(s.wire for s in v.sends if s.group == g)) for g in ("dp", "tp", "pp", "embedding"))]
            for v in views]
    lines += [format_grid(["rank", "dp", "pp", "tp", "layers", "params", "dp sends", "tp sends", "pp sends",
                           "emb sends"], rows), ""]
    lines.append("process groups (global ranks):")
    for axis in AXES:
        lines.append(f"  {axis}: " + "  ".join(str(g) for g in mesh.all_groups(axis)))
    if model.tie_embeddings and layout.pp > 1:
        pairs = [[mesh.rank_of(d, 0, t), mesh.rank_of(d, layout.pp - 1, t)] for d in range(layout.dp)
                 for t in range(layout.tp)]
        lines.append("  embedding (first and last stage, tied weights): " + "  ".join(str(p) for p in pairs))
    lines += ["", f"weight slices of every block, per tp rank (tp = {layout.tp}):"]
    for t in range(layout.tp):
        lines.append(f"  tp rank {t}:")
        slices = weight_slices(model, layout.tp, t)
        width = max(len(name) for name, _ in slices) + 1
        lines += [f"    {name:<{width}} {what}" for name, what in slices]
    lines += ["", "sends per step of rank 0 (payload as counted by paratrain.comm; wire: what this rank sends, "
              "ring algorithms):"]
    lines.append(format_grid(["group", "op", "calls", "payload", "wire"],
                             [[s.group, s.op, str(s.calls), human(s.payload), human(s.wire)] for s in views[0].sends]))
    return "\n".join(lines)
