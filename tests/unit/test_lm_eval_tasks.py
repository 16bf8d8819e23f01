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


def test_a_local_group_gets_lm_evals_own_index_too(tmp_path, monkeypatch):
    """A group under --include-path may list lm_eval's own tasks (here hellaswag): indexed
    locally it could not be loaded, so it needs the full index. The full index itself is
    lm_eval's (seconds to build), so the spy records which index is asked for and builds the
    local one either way."""
    import lm_eval.tasks

    (tmp_path / "mygroup.yaml").write_text("group: mygroup\ntask:\n  - hellaswag\n  - harness_smoke\n")
    real, asked = lm_eval.tasks.TaskManager, []

    def spy(*args, include_defaults=True, **kwargs):
        asked.append(include_defaults)
        return real(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    local = task_manager(["mygroup"], [tmp_path])
    assert "mygroup" in local.all_groups and asked == [False, True]  # the group was found locally, then the full index
    asked.clear()
    task_manager(["harness_smoke"], [tmp_path])
    assert asked == [False]
