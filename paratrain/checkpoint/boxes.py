"""Where a rank's tensors sit inside the global (reference-shaped) tensors: boxes.

Pure Python, no torch. A **box** is a rectangular region of a global tensor: one
``(offset, length)`` pair per dimension (a scalar's box is ``()``). Every way a layout cuts a
tensor is a list of boxes:

* tensor parallelism splits one dimension into ``chunks`` blocks and gives each rank an equal
  slice of every block (``qkv.weight``: 3 blocks, one box per block; a padded vocabulary: the
  rows past the reference's ``V`` are in no box);
* ZeRO cuts a *flat* range ``[start, stop)`` out of a tensor laid out in C order, which
  :func:`flat_range_boxes` turns into at most ``2 * ndim - 1`` boxes, each contiguous in that
  order (a partial row, then whole rows, then a partial row, recursively);
* pipeline parallelism keeps whole tensors, a box covering everything.

Saving writes one array per box; loading under any other layout fills each of its own boxes
from the saved boxes that :func:`intersect` it, so a rank reads only the elements it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[tuple[int, int], ...]


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def numel(box: Box) -> int:
    out = 1
    for _, length in box:
        out *= length
    return out


def lengths(box: Box) -> tuple[int, ...]:
    return tuple(length for _, length in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The common region of two boxes of one tensor, or None when they share no element."""
    assert len(a) == len(b), f"boxes of different rank: {a} and {b}"
    out = []
    for (oa, la), (ob, lb) in zip(a, b):
        lo, hi = max(oa, ob), min(oa + la, ob + lb)
        if lo >= hi:
            return None
        out.append((lo, hi - lo))
    return tuple(out)


def relative(inner: Box, outer: Box) -> Box:
    """``inner`` (inside ``outer``) in the coordinates of ``outer``'s own array."""
    return tuple((oi - oo, li) for (oi, li), (oo, _) in zip(inner, outer))


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[int, Box]]:
    """The flat range ``[start, stop)`` of a C-ordered tensor of ``shape`` as boxes, each with
    the position of its first element in the range: ``[(0, box0), (numel(box0), box1), ...]``.
    Each box's elements, read in C order, are consecutive in the range."""
    total = numel(full_box(shape))
    assert 0 <= start <= stop <= total, f"range [{start}, {stop}) outside a tensor of {total}"
    out: list[tuple[int, Box]] = []

    def walk(dims: tuple[int, ...], lo: int, hi: int, prefix: tuple[tuple[int, int], ...], at: int) -> None:
        if lo >= hi:
            return
        if not dims:
            out.append((at, prefix))
            return
        inner = numel(full_box(dims[1:]))  # elements per index of the leading dimension

        def in_row(a: int, b: int, at_: int) -> None:  # [a, b) inside one row: recurse into it
            row = a // inner
            walk(dims[1:], a - row * inner, b - row * inner, prefix + ((row, 1),), at_)

        whole_lo, whole_hi = -(-lo // inner), hi // inner  # rows [whole_lo, whole_hi) are whole
        if whole_lo > whole_hi:
            in_row(lo, hi, at)
            return
        if lo < whole_lo * inner:  # the partial first row
            in_row(lo, whole_lo * inner, at)
        if whole_lo < whole_hi:  # whole rows: one box
            out.append((at + whole_lo * inner - lo, prefix + ((whole_lo, whole_hi - whole_lo),) + full_box(dims[1:])))
        if whole_hi * inner < hi:  # the partial last row
            in_row(whole_hi * inner, hi, at + whole_hi * inner - lo)

    walk(tuple(int(n) for n in shape), start, stop, (), 0)
    return out


def tp_boxes(shape: Sequence[int], dim: int, chunks: int, rank: int, size: int,
             padded: int | None = None) -> list[tuple[int, Box]]:
    """Rank ``rank`` of ``size``'s tensor-parallel shard of a global tensor of ``shape``, split
    along ``dim`` into ``chunks`` blocks (``padded``: the length along ``dim`` after zero rows
    were added, see ``config.padded_vocab_size``). Returns ``(offset along dim in the local
    shard, global box)`` per block; padding rows belong to no box."""
    full = int(shape[dim]) if padded is None else padded
    assert full % (chunks * size) == 0, f"dim {dim} of {tuple(shape)} does not split into {chunks} x {size}"
    block, piece = full // chunks, full // chunks // size
    out = []
    for c in range(chunks):
        lo = c * block + rank * piece
        hi = min(lo + piece, int(shape[dim]))  # drop the padding rows
        if lo < hi:
            box = list(full_box(shape))
            box[dim] = (lo, hi - lo)
            out.append((c * piece, tuple(box)))
    return out
