"""The planner: predict memory, communication and step time of a layout, and search for the best.

Nothing here imports torch, the strategies (:mod:`paratrain.parallel`), the training loop, the
launcher, ``comm`` or ``metrics`` (``tests/unit/test_imports.py`` enforces it): ``paratrain
estimate`` and ``paratrain plan`` answer in milliseconds. The formulas the runtime shares come
from :mod:`paratrain.core`; measuring this machine is the runtime's :mod:`paratrain.calibrate`,
which writes the profile :mod:`~paratrain.plan.hardware` reads.

* :mod:`~paratrain.plan.hardware` - device catalog, explicit figures, calibrated profiles
* :mod:`~paratrain.plan.formulas` - the closed-form formulas, each cited
* :mod:`~paratrain.plan.topology` - which link each axis uses; layers per pipeline chunk
* :mod:`~paratrain.plan.cost` - :func:`estimate`: one layout -> :class:`Estimate`
* :mod:`~paratrain.plan.search` - :func:`search`: every valid layout, ranked
"""

from paratrain.plan.cost import CostOptions, Estimate, estimate
from paratrain.plan.hardware import CATALOG, Hardware, get_hardware

__all__ = ["CATALOG", "CostOptions", "Estimate", "Hardware", "estimate", "get_hardware"]
