"""Checkpoints: sharded, resharding, atomic, checksummed, never pickled.

* :mod:`~paratrain.checkpoint.boxes` (pure): where a rank's tensors sit in the global tensors;
* :mod:`~paratrain.checkpoint.manifest` (pure): the JSON manifest, checked field by field;
* :mod:`~paratrain.checkpoint.store`: each rank writes its safetensors file, rank 0 commits the
  manifest and the ``latest`` pointer; asynchronous saves; reading only the boxes a rank needs;
* :mod:`~paratrain.checkpoint.legacy`: the single-file ``model.pt`` + ``checkpoint.json`` of
  earlier runs (read with ``weights_only=True``).
"""

from __future__ import annotations

from paratrain.checkpoint.legacy import load_checkpoint, save_checkpoint
from paratrain.checkpoint.manifest import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
