"""Closed-form costs of training a GPT: parameters, FLOPs, memory.

Pure arithmetic on numbers (no torch, no model objects except :class:`ModelConfig`). Each
function writes its formula out and cites where it comes from. The formulas the runtime shares
live in :mod:`paratrain.core`: the pipeline bubble and stash (:mod:`paratrain.core.bubble`), the
ring collectives' wire bytes and steps (:mod:`paratrain.core.ring`), what each strategy sends
(:mod:`paratrain.core.traffic`). Symbols, as in the papers:

    B global batch (sequences)   b micro-batch size   s sequence length   l layers
    h hidden size   F MLP width (4h in the papers)   a attention heads   V vocabulary
    t tensor-parallel degree   p pipeline stages   m micro-batches   v virtual stages (chunks)
    psi parameters on one device
    k key/value width (grouped-query attention: kv heads x head dim; h without GQA)
    gated: a SwiGLU MLP (Llama: down(silu(gate(x)) * up(x)), three h x F matrices) instead of
    GPT-2's two; :func:`shape_args` reads both from a ModelConfig

References:
  [N21] Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
        Megatron-LM", SC21 (arXiv:2104.04473).
  [K22] Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
        MLSys 2023 (arXiv:2205.05198).
  [R20] Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
        Models", SC20 (arXiv:1910.02054).
  [K20] Kaplan et al., "Scaling Laws for Neural Language Models", 2020 (C = 6 N D).
  [R21] Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model Training", USENIX ATC 2021
        (arXiv:2101.06840).
"""

from __future__ import annotations

from dataclasses import dataclass

from paratrain.core.state import ModelState
from paratrain.models.configs import ModelConfig

# ---------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class MoEShape:
    """A mixture of experts in the block formulas (docs/expert.md), averaged over the blocks: a
    fraction ``share`` of them hold ``experts`` MLPs and a router (h x E), a token runs ``top_k``.
    Like paratrain's runtime (``models/plans.py``), tensor parallelism leaves the experts and the
    router whole on every tp rank, which all run them on the same tokens (the dense blocks' MLPs
    are split); ``tp_split``: the experts' inner width split over tp like a dense MLP instead
    (Megatron's expert tensor parallelism), for comparison."""

    experts: int
    top_k: int
    share: float
    tp_split: bool = False

    def expert_tp(self, t: int) -> int:
        """The ways an expert's MLP is split under ``t``-way tensor parallelism."""
        return t if self.tp_split else 1

    def active(self) -> float:
        """MLPs one token runs per block, on average over the blocks."""
        return 1 + self.share * (self.top_k - 1)


def shape_args(model: ModelConfig) -> dict[str, int | bool | MoEShape | None]:
    """The keywords (``kv``, ``gated``, ``moe``) the block formulas below take for ``model``."""
    moe = MoEShape(model.num_experts, model.top_k, model.num_moe_blocks / model.num_layers) \
        if model.num_experts else None
    return {"kv": model.num_kv_heads * model.head_dim, "gated": model.family == "llama", "moe": moe}


def narayanan_param_count(l: int, h: int, V: int, s: int) -> float:
    """[N21] eq. (2): P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)).

    Equals ``param_count`` of a GPT with F = 4h and tied embeddings, minus the 2h of the final
    LayerNorm, which [N21] leaves out."""
    return 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


def block_params_per_device(h: int, F: int, t: int, kv: int | None = None, gated: bool = False,
                            moe: MoEShape | None = None, ep: int = 1) -> float:
    """Parameters of one transformer block on one tensor-parallel rank (Megatron sharding).

    Column-parallel qkv (3h^2 + 3h) and fc1 (hF + F) and the row-parallel weights proj (h^2)
    and fc2 (Fh) are split t ways; the row-parallel biases (2h) and both LayerNorms (4h) are
    replicated:  (4h^2 + 2hF + 3h + F) / t + 6h.  At t = 1: 4h^2 + 2hF + 9h + F (= 12h^2 + 13h
    for F = 4h, [N21] eq. 2).

    ``gated`` (Llama, no biases): q and o (h^2 each), k and v (h k each), gate, up and down
    (hF each) split t ways, the two RMSNorm weights (2h) replicated:
    (2h^2 + 2hk + 3hF) / t + 2h.

    ``moe``: the MLP's share ((2hF + F) / t + h, or 3hF / t) in the dense blocks, the whole
    expert MLPs (``moe.expert_tp``: split t ways only with ``tp_split``) times the E / ep a device
    holds in the mixture-of-experts ones, plus the router (h E per MoE block, replicated over tp)."""
    if gated:
        k = h if kv is None else kv
        rest, mlp = (2 * h * h + 2 * h * k) / t + 2 * h, 3 * h * F / t
    else:
        rest, mlp = (4 * h * h + 3 * h) / t + 5 * h, (2 * h * F + F) / t + h
    if moe is None:
        return rest + mlp
    u = moe.expert_tp(t)
    expert = 3 * h * F / u if gated else (2 * h * F + F) / u + h
    return rest + (1 - moe.share) * mlp + moe.share * (moe.experts / ep) * expert + moe.share * h * moe.experts


def expert_params_per_block(h: int, F: int, t: int, gated: bool = False, moe: MoEShape | None = None,
                            ep: int = 1, **_: object) -> float:
    """The share of :func:`block_params_per_device` that is experts sharded ``ep`` ways (0 at
    ep 1 or for a dense block): replicated only over the dp / ep ranks holding the same experts,
    which is what ZeRO shards them over (``parallel/zero.py``)."""
    if moe is None or ep == 1:
        return 0.0
    u = moe.expert_tp(t)
    return moe.share * (moe.experts / ep) * (3 * h * F / u if gated else (2 * h * F + F) / u + h)


# ---------------------------------------------------------------------------------- FLOPs


def layer_forward_flops(b: int, s: int, h: int, F: int, kv: int | None = None, gated: bool = False,
                        moe: MoEShape | None = None) -> float:
    """Forward FLOPs of one block for b sequences ([N21] sec. 5.1, generalised to any F).

    Matmuls cost 2 FLOPs per multiply-add: qkv 2bs*3h^2, scores QK^T 2bs^2h, attention over V
    2bs^2h, proj 2bs*h^2, MLP 2 * 2bs*hF:   2bs(4h^2 + 2hF) + 4bs^2h.
    With F = 4h: 24bsh^2 + 4bs^2h = 24bsh^2 (1 + s/(6h)).

    Grouped-query attention: k and v project to the k-wide kv heads (2bs*2hk instead of 2bs*2h^2;
    the scores still cover all a query heads); SwiGLU (``gated``): three MLP matmuls, 2bs*3hF:
    2bs(2h^2 + 2hk + 3hF) + 4bs^2h.

    ``moe``: the MLP term times the MLPs a token runs (``moe.active()``), plus the router's 2bs hE
    per MoE block (the routing itself, a softmax and a sort of E values per token, is left out)."""
    k = h if kv is None else kv
    mlps, router = (1.0, 0.0) if moe is None else (moe.active(), moe.share * h * moe.experts)
    return 2 * b * s * (2 * h * h + 2 * h * k + (3 if gated else 2) * h * F * mlps + router) + 4 * b * s * s * h


def unsplit_forward_flops(b: float, s: int, h: int, F: int, gated: bool = False, moe: MoEShape | None = None,
                          **_: object) -> float:
    """The part of :func:`layer_forward_flops` that every tp rank runs whole (0 for a dense
    block): the router's and, unless ``moe.tp_split``, the ``top_k`` experts' MLP matmuls."""
    if moe is None:
        return 0.0
    experts = 0.0 if moe.tp_split else (3 if gated else 2) * h * F * moe.top_k
    return 2 * b * s * moe.share * (experts + h * moe.experts)


def attention_core_forward_flops(b: int, s: int, h: int) -> float:
    """QK^T and attention-over-V: 4bs^2h. What selective recomputation redoes ([K22] sec. 5)."""
    return 4 * b * s * s * h


def head_forward_flops(b: int, s: int, h: int, V: int) -> float:
    """The LM head (logits = x W_e^T): 2bshV ([N21] sec. 5.1)."""
    return 2 * b * s * h * V


def recompute_forward_flops(recompute: str, b: int, s: int, h: int, F: int, kv: int | None = None,
                            gated: bool = False, moe: MoEShape | None = None) -> float:
    """Extra forward FLOPs per block that recomputation adds to the backward pass.

    none: 0; selective: the attention core, 4bs^2h ([K22] sec. 5); full: the whole forward of the
    block ([N21] sec. 5.1: "an extra forward pass")."""
    if recompute == "full":
        return layer_forward_flops(b, s, h, F, kv, gated, moe)
    if recompute == "selective":
        return attention_core_forward_flops(b, s, h)
    return 0.0


def step_flops(model: ModelConfig, batch: int, seq_len: int, recompute: str = "none") -> float:
    """FLOPs of one optimizer step over ``batch`` sequences: forward + backward (backward = 2x
    forward, [N21] sec. 5.1) of every block and of the LM head, plus recomputation. The head is
    never recomputed. For F = 4h this is [N21] eq. (3), see :func:`megatron_step_flops`."""
    b, s, h, F, l = batch, seq_len, model.hidden, model.ffn_hidden, model.num_layers
    shape = shape_args(model)
    per_layer = 3 * layer_forward_flops(b, s, h, F, **shape) + recompute_forward_flops(recompute, b, s, h, F, **shape)
    return l * per_layer + 3 * head_forward_flops(b, s, h, model.vocab_size)


def megatron_step_flops(B: int, s: int, l: int, h: int, V: int, recompute: bool) -> float:
    """[N21] eq. (3), in closed form (F = 4h):

        with full recomputation:    96 B s l h^2 (1 + s/(6h) + V/(16 l h))
        without recomputation:      72 B s l h^2 (1 + s/(6h) + V/(12 l h))"""
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def six_p_tokens(num_params: float, tokens: float) -> float:
    """The usual cross-check C = 6 P D ([K20] sec. 2.1): 2 FLOPs per parameter per token forward,
    4 backward. It omits the attention scores (4bs^2h per layer) and counts the embeddings."""
    return 6 * num_params * tokens


# ---------------------------------------------------------------------------------- memory

# Bytes per parameter (working copy, gradient, optimizer state) before any sharding:
# bf16 = mixed precision [R20] sec. 3.1: fp16/bf16 parameters 2 + gradients 2 + K = 12 for Adam
# (fp32 master copy 4, momentum 4, variance 4); fp32: parameters 4 + gradients 4 + Adam m, v 8;
# bf16-autocast (`train --precision bf16-autocast`): fp32 weights as fp32's, bf16 matmuls and
# activations. `--grad-dtype fp32` makes G = 4 under bf16 (2 + 4 + 12): ``grad_bytes``.
STATE_BYTES: dict[str, tuple[int, int, int]] = {"bf16": (2, 2, 12), "fp32": (4, 4, 8), "bf16-autocast": (4, 4, 8)}
ELEM_BYTES: dict[str, int] = {"bf16": 2, "fp32": 4, "bf16-autocast": 2}


def model_state_bytes(psi: float, zero: int, dp: int, precision: str, grad_bytes: int | None = None,
                      offload: bool = False) -> ModelState:
    """Model states of ``psi`` parameters on one device under ZeRO stage ``zero`` over ``dp``
    ranks, predicted into the record the runtime measures (``core/state.py``) ([R20] sec. 5.1,
    Fig. 1; P, G, K = bytes per parameter of each part, N_d = dp):

        stage 0 (plain DP):   (P + G + K) psi
        stage 1 (P_os):       (P + G) psi + K psi / N_d
        stage 2 (P_os+g):     P psi + (G + K) psi / N_d
        stage 3 (P_os+g+p):   (P + G + K) psi / N_d

    [R20]'s example: psi = 7.5e9, N_d = 64, mixed precision: 120, 31.4, 16.6, 1.88 GB.
    ``grad_bytes`` replaces G (``--grad-dtype fp32``: 4); ``offload`` (ZeRO-Offload, [R21]): the
    K bytes live in host memory (:func:`host_state_bytes`), the device holds none of them."""
    P, G, K = STATE_BYTES[precision]
    G = grad_bytes or G
    return ModelState(
        params=P * psi / (dp if zero >= 3 else 1),
        grads=G * psi / (dp if zero >= 2 else 1),
        optimizer=0.0 if offload else K * psi / (dp if zero >= 1 else 1),
    )


def offload_copy_seconds(owned: float, grad_bytes: float, param_bytes: float, host_link_bw: float) -> float:
    """ZeRO-Offload's copies per step for the ``owned`` parameters a device steps ([R21] sec. 4):
    their reduced gradients device -> host and the updated 16-bit weights host -> device, one
    after the other over the host link (``host_link_bw`` 0: the device is the host, no copy)."""
    return (grad_bytes + param_bytes) * owned / host_link_bw if host_link_bw else 0.0


def host_state_bytes(psi: float, zero: int, dp: int, precision: str, offload: bool) -> float:
    """Host memory of the optimizer's state under ``offload`` (K psi, / N_d from ZeRO-1 on)."""
    return STATE_BYTES[precision][2] * psi / (dp if zero >= 1 else 1) if offload else 0.0


def layer_activation_bytes(s: int, b: float, h: int, a: int, F: int, t: int = 1, sp: bool = False,
                           recompute: str = "none", elem_bytes: int = 2, dropout: bool = True,
                           store_scores: bool = True, sp_saves_gathered: bool = False,
                           kv: int | None = None, gated: bool = False, moe: MoEShape | None = None) -> float:
    """Activations one block stores for its backward pass, per micro-batch, on one device.

    [K22] sec. 4.1, Table 2, for 16-bit activations (e = 2) with dropout masks of 1 byte:

        no parallelism             s b h (34 + 5 a s / h)
        tensor parallel            s b h (10 + 24/t + 5 a s / (h t))
        tensor + sequence parallel s b h / t (34 + 5 a s / h)
        + selective recomputation  the 5 a s / h term (softmax, its dropout mask and output) goes
        full recomputation         2 s b h  (only the block's input; / t with sequence parallel)

    Generalised to e bytes per element and any MLP width F by counting what [K22] counts:
    replicated under TP (without SP): both LayerNorm inputs, the qkv and fc1 inputs (4sbh
    elements) and the two dropout masks (2sbh bytes); split t ways: Q, K, V and the proj input
    (4sbh elements), the GeLU input and fc2 input (2sbF elements), the softmax output and its
    dropout output (2as^2b elements) and the softmax dropout mask (as^2b bytes). With F = 4h and
    e = 2 these sum to 34sbh + 5as^2b. ``dropout=False`` drops the masks (a model trained without
    dropout stores none).

    ``store_scores=False``: a fused attention kernel (PyTorch's ``scaled_dot_product_attention``,
    which paratrain runs; FlashAttention, Dao et al. 2022) keeps no s x s scores: its output is
    the proj input already counted, plus the per-row log-sum-exp, 4 a s b bytes (fp32), split t
    ways; selective recomputation replays the kernel, so that is not kept then.

    ``sp_saves_gathered``: under sequence parallelism the qkv and fc1 linears save their
    all-gathered (b, s, h) input instead of the (b, s/t, h) shard that Megatron (and paratrain's
    runtime, ``tp_ops.GatheredLinearSP``) re-gathers in backward ([K22] sec. 4.2.2 counts the
    shard): those 2sbh elements are then not divided by t. The runtime does so under zero-bubble
    schedules and in ``tp_input`` regions (see ``CostOptions.sp_saves_gathered``).

    Grouped-query attention (``kv`` = k): K and V are (b, s, k), so Q, K, V and the proj input
    are 2sbh + 2sbk elements. SwiGLU (``gated``): the gate output (SiLU's input), SiLU's output
    and the up output (the product's inputs) and the product (down's input): 4sbF instead of
    GELU's 2sbF.

    A mixture of experts (``moe``): each token's row enters ``moe.active()`` MLPs per block on
    average, so the fc1 input and the MLP's inner activations count that many times, the experts'
    not split over tp (unless ``moe.tp_split``). A MoE block also keeps (``models/moe.py``, counted
    with ``ActivationMeter``) the router's input (sbh), each row's expert output and its gated copy
    (2k sbh, which the combine's multiply and index_add keep), and the routing's fp32 / int64
    tensors: per token the probabilities, the sort's indices and values (16 E bytes), the gates'
    sum (4), and per row the kept mask, two index vectors and the gate (21 bytes).
    """
    k = h if kv is None else kv
    if recompute == "full":
        return elem_bytes * s * b * h / (t if sp else 1)
    mlps = 1.0 if moe is None else moe.active()
    whole = 0.0 if (moe is None or moe.tp_split) else moe.share * moe.top_k  # experts kept whole over tp
    mask = 1 if dropout else 0
    e = elem_bytes
    replicated = e * 2 * s * b * h + mask * 2 * s * b * h  # LayerNorm inputs, residual dropout masks
    replicated += e * (4 if gated else 2) * s * b * F * whole  # the whole experts' inner activations
    if moe is not None:  # the router's input, the experts' outputs and their gated copy, the routing's tensors
        E, top = moe.experts, moe.top_k
        replicated += moe.share * (e * (1 + 2 * top) * s * b * h + (16 * E + 4 + 21 * top) * s * b)
    linear_inputs = e * (1 + mlps) * s * b * h  # qkv and fc1 inputs
    split = e * (2 * s * b * h + 2 * s * b * k + (4 if gated else 2) * s * b * F * (mlps - whole))
    if recompute != "selective":
        if store_scores:
            split += (2 * e + mask) * a * s * s * b
        else:
            split += 4 * a * s * b
    if not sp:
        return replicated + linear_inputs + split / t
    return (replicated + split) / t + linear_inputs / (1 if sp_saves_gathered else t)


def output_activation_bytes(s: int, b: float, h: int, V: int, t: int = 1, sp: bool = False,
                            elem_bytes: int = 2, sp_saves_gathered: bool = False) -> float:
    """Last-stage activations of the final LayerNorm and LM head, per micro-batch ([K22] sec. 4.3):
    LayerNorm input e*sbh and head input e*sbh (split t ways with sequence parallelism, the head
    input only when it is not saved all-gathered), and the logits kept in fp32 for the
    cross-entropy, 4 s b V / t (vocab-parallel; V the padded vocabulary)."""
    ln = elem_bytes * s * b * h / (t if sp else 1)
    head_in = elem_bytes * s * b * h / (t if sp and not sp_saves_gathered else 1)
    return ln + head_in + 4 * s * b * V / t


def embedding_activation_bytes(s: int, b: float, h: int, t: int = 1, sp: bool = False,
                               dropout: bool = True) -> float:
    """First-stage activations per micro-batch ([K22] sec. 4.3; Megatron's
    ``theoretical_memory_usage``): the token ids (8 s b, int64) and the embedding dropout mask
    (s b h bytes, split t ways with sequence parallelism)."""
    return 8 * s * b + (s * b * h / (t if sp else 1) if dropout else 0)


def w_deferred_layer_bytes(s: int, b: float, h: int, F: int, t: int = 1, elem_bytes: int = 2) -> float:
    """What one block keeps per micro-batch between a zero-bubble schedule's I and its W: the
    input ``x`` and output gradient ``dy`` of each of its four linears, for ``dL/dW = dy^T x``
    (``parallel/pipeline/split.py``; the rest of the graph is freed by I). Per token: qkv
    ``h + 3h/t``, proj ``h/t + h``, fc1 ``h + F/t``, fc2 ``F/t + h`` elements, i.e.
    ``4h + 4h/t + 2F/t`` (``8h + 2F`` without tp; the column-parallel inputs are whole, gathered
    under sequence parallelism)."""
    return elem_bytes * s * b * (4 * h + 4 * h / t + 2 * F / t)


def w_deferred_head_bytes(s: int, b: float, h: int, V: int, t: int = 1, elem_bytes: int = 2) -> float:
    """The LM head's share of the same: its input and the logits' gradient, ``h + V/t`` elements
    per token (``V`` the padded vocabulary)."""
    return elem_bytes * s * b * (h + V / t)
