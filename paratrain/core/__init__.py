"""Torch-free core shared by the runtime (``paratrain.parallel``) and the planner (``paratrain.plan``).

Nothing in this package imports torch, the strategies, the training loop, the launcher or metrics:
schedules and their checker, the timeline simulator, pipeline partitioning, the traffic formulas
(the bytes each collective moves, which ``comm`` counts with and the planner prices with), the
bubble formulas and the model-state byte accounting.
"""
