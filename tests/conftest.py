"""Suite-wide collection rules.

`make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`). The cluster tier
shares two SLURM clusters of two CPUs a node: its tests go to one worker, one after another, so
a job never queues behind another test's job and outlives its timeout. Most of their time is
spent waiting on the scheduler, which the other worker fills with the integration tier."""
from __future__ import annotations

from pathlib import Path

import pytest

CLUSTER = Path(__file__).parent / "cluster"


def pytest_collection_modifyitems(items):
    for item in items:
        if CLUSTER in Path(item.path).parents:
            item.add_marker(pytest.mark.xdist_group("cluster"))
