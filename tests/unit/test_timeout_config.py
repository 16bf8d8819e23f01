"""Collective timeouts: `parallel.timeout_minutes` is validated, and a failed collective is
one line naming the cause (the process groups' timeouts: tests/integration/test_timeouts.py;
a hung rank under the trainer: tests/cluster/test_hung_rank.py)."""
from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config
from trainer.parallel.dist import collective_failure


@pytest.mark.parametrize("bad", ["0", "-1", ".nan"])
def test_timeout_must_be_positive(bad):
    with pytest.raises(ConfigError, match="parallel.timeout_minutes"):
        load_config("configs/tiny.yaml", [f"parallel.timeout_minutes={bad}"])
    assert load_config("configs/tiny.yaml", ["parallel.timeout_minutes=0.2"]).parallel.timeout_minutes == 0.2


def test_collective_failure_messages():
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 12000ms for recv operation")
    msg = collective_failure(timed_out, 0.2)
    assert "did not complete within parallel.timeout_minutes=0.2" in msg and "resume" in msg
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5000")
    assert "went away" in collective_failure(gone, 30)
    assert collective_failure(RuntimeError("shape mismatch in matmul"), 30) is None
    assert collective_failure(RuntimeError("gloo: unsupported dtype for all_reduce"), 30) is None
