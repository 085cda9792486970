import os
import sys

import pytest

# One intra-op thread in the test process too: ranks are separate processes on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # property tests check results, never speed: hypothesis's 200 ms deadline per example fails
    # them on a loaded 2-core machine (seen: 483 ms on a first run, 20 ms on the rerun)
    from hypothesis import settings

    settings.register_profile("paratrain", deadline=None)
    settings.load_profile("paratrain")
except ImportError:  # hypothesis comes with the dev extra (make setup); without it those tests cannot import
    pass


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
