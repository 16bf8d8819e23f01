"""Config loading, overrides and the one-line errors users see for bad input."""
from __future__ import annotations

import pytest

from tests.helpers import ROOT, SHAKESPEARE, load_shipped_config
from trainer.config import ConfigError, load_config, resume_diff
from trainer.train import main

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads_and_validates(path):
    if "ablations" in path.parts and not SHAKESPEARE.exists():
        pytest.skip(f"ablation configs read {SHAKESPEARE}, which is absent")
    cfg = load_shipped_config(path)
    assert cfg.run.name


def test_overrides_are_parsed_as_yaml_into_typed_fields():
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "optim.lr=1e-4", "growth.stages=[{at_step: 12, layers: 8, method: stack}]", "model.mod.capacity=0.5",
        "parallel.deepspeed={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert cfg.optim.lr == 1e-4
    assert cfg.growth.stages[0].layers == 8 and cfg.growth.stages[0].method == "stack"
    assert cfg.model.mod.capacity == 0.5
    assert cfg.parallel.deepspeed["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.parametrize("value,expected", [("on", "on"), ("no", "no"), ("123", "123"), ("1e-3", "1e-3"),
                                            ('"quoted"', "quoted"), ("a=b", "a=b")])
def test_a_string_key_takes_its_override_verbatim_where_yaml_would_read_a_bool_or_number(value, expected):
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run.name={value}", "model.embed_norm=on", "optim.lr=1e-3"])
    assert cfg.run.name == expected
    assert cfg.model.embed_norm is True and cfg.optim.lr == 1e-3  # typed keys still parse as YAML


def test_extends_merges_parent_then_child(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {d_model: 128, n_heads: 4}\nrun: {name: base}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrun: {name: child}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.run.name, cfg.model.d_model) == ("child", 128)


BAD = [
    (["model.d_modle=64"], "unknown config key 'model.d_modle'"),
    (["optim.lr=abc"], "optim.lr"),
    (["model.n_layers=two"], "model.n_layers"),
    (["model.n_heads=5"], "must divide model.d_model"),
    (["model.norm=sandwich"], "pre | post | peri"),
    (["model.mod.capacity=1.5"], "(0, 1]"),
    (["model.mod.capacity=-0.1"], "(0, 1]"),
    (["parallel.sp=3"], "must divide model.n_heads"),
    (["data.seq_len=0"], "data.seq_len=0"),
    (["data.seq_len=-8"], "positive"),
    (["data.source=/nonexistent/corpus.txt"], "does not exist"),
    (["run.max_steps=10", "growth.stages=[{at_step: 20, layers: 8}]"], "must be < run.max_steps"),
    (["growth.stages=[{at_step: 20, layers: 8}, {at_step: 10, layers: 16}]"], "increasing step order"),
    (["growth.stages=[{at_step: 20, layers: 2}]"], "previous depth"),
    (["model.ln_scaling=true", "model.norm=post"], "pre or peri"),
    (["parallel.zero_stage=4"], "0, 1, 2 or 3"),
    (["model.value_residual=some"], "none | fixed | learned | shared"),
    (["parallel.sp=2", "data.seq_len=63", "model.max_seq_len=64"], "divisible by parallel.sp"),
    (["parallel.sp=2", "model.mod.capacity=0.5"], "multiple of parallel.sp"),
    (["nonsense"], "key.sub=value"),
    (["parallel.activation_checkpointing=selective"], "none | full | every_<k>"),
    (["parallel.activation_checkpointing=every_0"], "parallel.activation_checkpointing='every_0'"),
    (["logging.profile_steps=[5, 3]"], "1 <= first <= last"),
    (["logging.profile_steps=[0, 3]"], "logging.profile_steps=[0, 3]"),
    (["logging.profile_steps=[4]"], "logging.profile_steps=[4]"),
    (["model.out_norm_gain=0.1"], "model.norm=pre has none"),
    (["model.norm=peri", "model.out_norm_gain=-1"], "must be a number >= 0"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_gives_one_clear_line_and_nonzero_exit(overrides, needle, capsys):
    assert main(["configs/tiny.yaml", *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("overrides,warned", [
    (["model.norm=peri"], True),
    (["model.norm=peri", "model.embed_norm=true"], False),
    (["model.norm=peri", "model.out_norm_gain=0.02"], False),
    (["model.norm=pre"], False),
])
def test_peri_without_embed_norm_warns_once_at_start_and_still_runs(overrides, warned, capsys):
    assert main(["configs/tiny.yaml", *overrides, "--dry-run"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: model.norm=peri")]
    assert len(err) == (1 if warned else 0), err
    if warned:
        assert "model.embed_norm=true" in err[0] and "ablation" in err[0]


def test_empty_data_file_is_rejected(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["configs/tiny.yaml", f"data.source={empty}", "--dry-run"]) == 2
    assert "empty" in capsys.readouterr().err


def test_sp_must_divide_world_size():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["parallel.sp=2"])
    from trainer.config import validate

    with pytest.raises(ConfigError, match="must divide the world size 3"):
        validate(cfg, world_size=3)


def test_resume_diff_names_model_and_data_keys_but_not_schedule():
    a = load_config(ROOT / "configs/tiny.yaml")
    b = load_config(ROOT / "configs/tiny.yaml", ["model.d_model=512", "data.seq_len=128", "optim.lr=1e-4",
                                                 "run.max_steps=999"])
    assert resume_diff(a, b) == ["data.seq_len", "model.d_model"]


def test_dry_run_prints_parameters_and_flops(capsys):
    assert main(["configs/tiny.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "non-embedding" in out and "FLOPs/token" in out


def test_pretrain_1b_dry_run_is_about_1b_parameters(capsys):
    import re

    assert main(["configs/pretrain_1b.yaml", "--dry-run", "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"parameters\s+([\d,]+) total", out).group(1).replace(",", ""))
    assert 1.0e9 <= total <= 1.2e9, total
    assert "2,097,152 tokens per step" in out and "memory/GPU" in out
