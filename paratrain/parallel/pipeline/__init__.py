"""Pipeline parallelism: the stack of layers cut into stages, one (or ``v`` chunks) per pipeline
rank, fed with micro-batches.

* :mod:`.partition` -- layers (embedding and head included) to stages, balanced by cost or by hand.
* :mod:`.schedules` -- GPipe, 1F1B and interleaved 1F1B as per-rank action lists (pure data).
* :mod:`.check` and :mod:`.timeline` -- the rules every schedule obeys, and its simulated timeline.
* :mod:`.stage`, :mod:`.runtime`, :mod:`.model` -- this rank's layers, the executor of a schedule
  over the pp group, and :class:`PipelineModel` for the training loop (these import torch).

This package's own import is light: the pure modules load without torch.
"""
