"""Torch-free core shared by the runtime (``paratrain.parallel``) and the planner (``paratrain.plan``).

Nothing in this package imports torch, the strategies, the training loop, the launcher or metrics:
schedules and their checker, the timeline simulator, pipeline partitioning, the traffic formulas
(the bytes each collective moves, which ``comm`` counts with and the planner prices with), the
bubble formulas and the model-state byte accounting.

* :mod:`.schedules`, :mod:`.check`, :mod:`.timeline` -- pipeline schedules as data, the checker,
  simulated and measured timelines; :mod:`.partition` -- layers to pipeline stages
* :mod:`.bubble` -- the pipeline bubble and activation-stash formulas
* :mod:`.ring` -- wire bytes and latency steps of a ring collective (the one formula)
* :mod:`.traffic` -- what tensor, pipeline and data parallelism (ZeRO) send per step
* :mod:`.vocab` -- the vocabulary padding under tensor parallelism

Its modules import the standard library, each other, :mod:`paratrain.errors` (a bad partition
is a user error) and :mod:`paratrain.models.configs` (the model shapes the formulas count over),
nothing else; ``tests/unit/test_imports.py`` enforces it.
"""
