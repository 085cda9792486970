"""Old home of :mod:`paratrain.core.schedules` (torch-free, shared with the planner), kept because
docs/pipeline_parallel.md showed this import path; new code imports from ``paratrain.core``."""

from paratrain.core.schedules import *  # noqa: F403
