"""Which lm_eval task index an evaluation builds (trainer/evaluation/lm_eval_runner.py)."""
from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.evaluation.lm_eval_runner import TASKS_DIR, check_tasks, task_manager


def test_local_tasks_alone_skip_lm_evals_own_index(tmp_path):
    smoke = (TASKS_DIR / "harness_smoke.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(smoke.replace("task: harness_smoke", "task: mine"))  # indexed, not loaded
    tm = task_manager(["harness_smoke", "mine"], [tmp_path])
    assert sorted(tm.all_tasks) == ["harness_smoke", "mine"]  # no hellaswag & co.: not indexed
    check_tasks(tm, ["harness_smoke", "mine"])
    with pytest.raises(UserError, match="unknown lm_eval task"):
        check_tasks(tm, ["harness_smoke", "no_such_task"])
