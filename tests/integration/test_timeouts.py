"""Collective timeouts: `parallel.timeout_minutes` bounds how long a rank waits for a peer
that hung or died, so a stuck job ends with a clear message instead of never. Validation and
the messages: tests/unit/test_timeout_config.py; a hung rank: tests/cluster/test_hung_rank.py."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, _env


def test_timeout_reaches_every_process_group():
    """The world group and groups created later without a timeout (DeepSpeed's SP/ZeRO
    groups) all get parallel.timeout_minutes."""
    code = (
        "import torch, torch.distributed as d\n"
        "from trainer.parallel.dist import init_distributed\n"
        "init_distributed('gloo', 1, 0.2)\n"
        "for pg in (d.group.WORLD, d.new_group([0])):\n"
        "    print(pg._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["12.0", "12.0"], out.stdout
