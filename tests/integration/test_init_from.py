"""`run.init_from`: a new run starts from a finished run's weights, with another seq_len,
SP degree and RoPE theta, and a fresh optimizer, step counter and schedule."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import Transformer
from tests.helpers import ROOT, losses, metrics, tiny_overrides, train
from trainer.checkpoint.init_from import InitSource, check_tokenizer, resolve_init_source
from trainer.config import ConfigError, load_config
from trainer.data import prepare_data
from trainer.export.load import consolidated_state_dict, load_model, resolve_checkpoint
from trainer.parallel.layout import BatchLayout
from trainer.schedule import lr_at

TINY = ROOT / "configs/tiny.yaml"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished 30-step tiny run (seq 64, one rank)."""
    out = tmp_path_factory.mktemp("init_from") / "runs"
    train(tiny_overrides(out, "src", **{"run.max_steps": 30}))
    return out


def _stage2(out, name="dst", **extra):
    # Another context length and RoPE theta, SP=2 on 2 ranks: only the weights carry over.
    return tiny_overrides(out, name, **{"run.init_from": str(out / "src"), "data.seq_len": 32,
                                        "model.max_seq_len": 128, "model.rope_theta": 50000.0,
                                        "parallel.sp": 2, "run.max_steps": 2, "checkpoint.every": 1, **extra})


@pytest.mark.slow
def test_init_from_starts_from_source_weights_with_new_seq_len_and_sp(source_run, tmp_path):
    out = source_run
    overrides = _stage2(out)
    proc = train(overrides, nproc=2)
    assert "initialised from" in proc.stdout and "step-30" in proc.stdout
    assert not (out / "dst" / "init_from.weights.pt").exists()  # rank 0's consolidated copy, once loaded

    # Reference: the source's weights in a model built with the new run's config (theta,
    # table length), on the new run's first batch, SP=1, one process.
    cfg = load_config(TINY, overrides)
    src = load_model(out / "src")
    ref = Transformer(dataclasses.replace(cfg.model, n_layers=src.cfg.n_layers))
    ref.load_state_dict(src.state_dict())
    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.run.seed, cfg.cache_dir, tmp_path, True,
                        lambda: None, log=lambda s: None)
    data.seek(0, 0)
    x, y = data.train_batch(0, 0, BatchLayout.of(cfg, dp_size=1))
    with torch.no_grad():
        want = F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).item()
    rows = [r for r in metrics(out / "dst") if "loss" in r]
    first = rows[0]
    assert first["step"] == 1 and first["tokens"] == cfg.parallel.micro_batch * cfg.data.seq_len  # fresh counters
    assert first["lr"] == pytest.approx(lr_at(cfg, 0))  # the new run's own schedule, from its step 0
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    # ...and is well below what this run's own fresh initialisation would give.
    torch.manual_seed(cfg.run.seed)
    with torch.no_grad():
        fresh = F.cross_entropy(Transformer(cfg.model)(x).flatten(0, 1), y.flatten()).item()
    assert first["loss"] < fresh - 0.5, (first["loss"], fresh)

    # The weights moved from the source's, by a fresh AdamW's first steps (≈ lr per element).
    _, ckpt = resolve_checkpoint(out / "dst", step=1)
    after = consolidated_state_dict(ckpt)
    before = src.state_dict()
    step = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < step <= 1.5 * lr_at(cfg, 0)

    # With checkpoints of its own, the run resumes from them; init_from no longer matters.
    more = [o for o in overrides if not o.startswith(("run.max_steps", "run.init_from"))]
    proc = train([*more, "run.max_steps=3", f"run.init_from={out / 'missing'}"], nproc=2)
    assert "resumed from" in proc.stdout and "initialised from" not in proc.stdout
    assert sorted(losses(out / "dst")) == [1, 2, 3]


@pytest.mark.slow
def test_init_from_an_incompatible_model_is_one_line(source_run):
    cfg = load_config(TINY, _stage2(source_run, "bad", **{"model.d_model": 128, "model.norm": "peri",
                                                          "parallel.sp": 1}))
    with pytest.raises(ConfigError) as e:
        resolve_init_source(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"run.init_from={str(source_run / 'src')!r}")
    assert "model.d_model (64 there, 128 here)" in msg and "model.norm ('pre' there, 'peri' here)" in msg
    assert "max_seq_len" not in msg.split("only")[0] and "rope_theta" not in msg.split("only")[0]  # allowed to differ


@pytest.mark.parametrize("where", ["nope", "empty"])
def test_init_from_a_missing_or_empty_dir_is_one_line(tmp_path, where):
    (tmp_path / "empty").mkdir()
    cfg = load_config(TINY, tiny_overrides(tmp_path, "x", **{"run.init_from": str(tmp_path / where)}))
    with pytest.raises(ConfigError, match=r"^run.init_from=.*(no such directory|complete checkpoint)") as e:
        resolve_init_source(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_init_from_fills_the_fp32_masters_exactly_under_bf16_zero1(source_run):
    """Under bf16 the engine builds its fp32 masters from the bf16 module, which would round
    the source's weights (~4e-3 relative); init_from writes the exact fp32 values. With an
    lr of 1e-10 one step leaves them unchanged to ~1e-9, so the step-1 checkpoint's fp32
    weights show what the masters started from."""
    out = source_run
    train(tiny_overrides(out, "bf16", **{"run.init_from": str(out / "src"), "parallel.precision": "bf16",
                                         "parallel.zero_stage": 1, "optim.lr": 1e-10, "run.max_steps": 1}))
    src = consolidated_state_dict(resolve_checkpoint(out / "src")[1])
    got = consolidated_state_dict(resolve_checkpoint(out / "bf16")[1])
    assert max((got[k] - src[k]).abs().max().item() for k in src) < 1e-6
    rounded = max((src[k].bfloat16().float() - src[k]).abs().max().item() for k in src)
    assert rounded > 1e-5  # what starting from the bf16 copy would have cost


def test_init_from_with_another_tokenizer_is_one_line(tmp_path):
    """Token ids would mean other tokens: refused, naming the source's tokenizer to use."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for run, text in ((src, b"merges A"), (dst, b"merges B")):
        (run / "tokenizer").mkdir(parents=True)
        (run / "tokenizer" / "tokenizer.model").write_bytes(text)
    source = InitSource(src, src / "checkpoints" / "step-1", 2)
    with pytest.raises(ConfigError, match=r"^run.init_from=.*tokenizer.*data.tokenizer=.*src/tokenizer/tokenizer.model"):
        check_tokenizer(source, dst)
    (dst / "tokenizer" / "tokenizer.model").write_bytes(b"merges A")
    check_tokenizer(source, dst)  # the same file: accepted


def test_source_weights_are_consolidated_once_by_rank_0_and_mapped_by_every_rank(source_run, tmp_path, monkeypatch):
    from trainer.checkpoint import init_from

    class Rank:  # a Dist of 2 as these functions use it, its collectives run one rank after the other
        world = 2

        def __init__(self, main):
            self.is_main = main

        def barrier(self):
            pass

        def broadcast_object(self, obj):
            return "rank 0's token"

    reads = []
    real = init_from.source_weights
    monkeypatch.setattr(init_from, "source_weights", lambda src: reads.append(src.checkpoint) or real(src))
    src = resolve_init_source(load_config(TINY, _stage2(source_run)))
    want = consolidated_state_dict(src.checkpoint)
    got = {rank: init_from.shared_source_weights(src, tmp_path, Rank(rank == 0)) for rank in (0, 1)}
    assert reads == [src.checkpoint]  # rank 1 read rank 0's file, not the source checkpoint
    for weights in got.values():
        assert weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in want)
    assert init_from.shared_weights_path(tmp_path).is_file()
    init_from.release_shared_weights(tmp_path, Rank(False))
    assert init_from.shared_weights_path(tmp_path).is_file()  # only rank 0 removes it
    init_from.release_shared_weights(tmp_path, Rank(True))
    assert not init_from.shared_weights_path(tmp_path).exists() and not list(tmp_path.iterdir())
