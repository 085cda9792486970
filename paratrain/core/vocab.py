"""How the vocabulary is padded when tensor parallelism splits it. Pure Python (no torch): the
runtime's vocab-parallel embedding and head, the traffic formulas and the planner share it."""

from __future__ import annotations

VOCAB_PAD_MULTIPLE = 64


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows of the token embedding / LM head once split over ``tp`` ranks.

    Unchanged when ``tp`` divides the vocabulary. Otherwise padded up to a multiple of
    ``64 * tp`` (each rank's shard a multiple of 64 rows, friendly to matrix units), as Megatron
    pads to a multiple of 128 * tp: GPT-2's 50257 becomes 50304 at tp=2, 50432 at tp=4. The extra
    rows are zero, never looked up, and their logits are masked out of the loss, so the model
    computes exactly the reference's function; checkpoints keep the reference's V rows.
    """
    if vocab_size % tp == 0:
        return vocab_size
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple
