"""Pipeline parallelism: the stack of layers cut into stages, one (or ``v`` chunks) per pipeline
rank, fed with micro-batches.

The pure parts live in the torch-free :mod:`paratrain.core`, shared with the planner and
``paratrain schedule``: :mod:`~paratrain.core.partition` (layers to stages, balanced by cost or by
hand), :mod:`~paratrain.core.schedules` (GPipe, 1F1B and interleaved 1F1B as per-rank action
lists), :mod:`~paratrain.core.check` and :mod:`~paratrain.core.timeline` (the rules every schedule
obeys, and its simulated timeline), :mod:`~paratrain.core.bubble` (the bubble formula).

Here, importing torch: :mod:`.stage`, :mod:`.runtime`, :mod:`.model` -- this rank's layers, the
executor of a schedule over the pp group, and :class:`PipelineModel` for the training loop.
``.schedules``, ``.check`` and ``.timeline`` re-export their old contents from the core.
"""
