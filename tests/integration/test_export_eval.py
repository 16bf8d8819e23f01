"""A trained model people can use: export for every option set (HF remote code or plain
Llama), generation, lm-evaluation-harness evaluation, and downstream evals in the loop.

References are independent of the code under test: `transformers` loading the export in a
process that cannot import our packages, HF's own `generate()`, lm_eval's own scoring, and
SentencePiece itself for the tokenizer.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from model import ModConfig, ModelConfig, Transformer
from tests.helpers import ROOT, _env, losses, metrics, tiny_overrides, train
from trainer.export.causal import causal_logits
from trainer.export.hf import write_export

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ALL_ON = {"model.norm": "peri", "model.embed_norm": "true", "model.ln_scaling": "true",
          "model.value_residual": "learned", "model.mod.capacity": 0.5, "model.mod.every": 2,
          "model.mod.causal": "predictor", "model.n_layers": 4, "model.tie_embeddings": "true"}
PROMPT = "def main():\n    "
SMOKE = ROOT / "trainer" / "evaluation" / "tasks" / "smoke.jsonl"

# Loads an export with no `model`/`trainer` importable (a meta-path hook refuses them, since an
# editable install would otherwise find them), from an unrelated cwd, and saves what HF computes.
HF_SIDE = textwrap.dedent('''
    import sys, torch

    class NoRepo:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("model", "trainer", "tests"):
                raise ImportError(f"{name} must not be needed to load an export")

    sys.meta_path.insert(0, NoRepo())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir, io = sys.argv[1], sys.argv[2]
    inp = torch.load(io + "/in.pt")
    model, info = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    prompt = tok(inp["prompt"], return_tensors="pt")
    with torch.no_grad():
        logits = model(inp["ids"]).logits
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    torch.save({"class": type(model).__name__, "missing": sorted(info["missing_keys"]), "logits": logits,
                "prompt_ids": prompt.input_ids[0].tolist(), "generated": out[0, prompt.input_ids.shape[1]:].tolist(),
                "text_ids": tok(inp["text"], add_special_tokens=False).input_ids,
                "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("model", "trainer"))}, io + "/out.pt")
''')


def sample_text() -> str:
    """Prose, code, whitespace runs, tabs, newlines and non-ASCII (byte fallback)."""
    return (ROOT / "trainer" / "evaluate.py").read_text()[:4000] + "  To be,\tor not\n\n to be — naïve 日本語 \n"


def our_sp(run_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer" / "tokenizer.model"))


def run_cli(module: str, *args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env({**OFFLINE, **(env or {})}),
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------
# Fast: every option set exports and loads with the same logits (random weights, no run).

OPTION_SETS = {
    "post_layernorm": dict(norm="post", norm_type="layernorm"),
    "peri_lns_fixed_vr": dict(norm="peri", ln_scaling=True, value_residual="fixed"),
    "shared_vr_mod_aux": dict(value_residual="shared", mod=ModConfig(capacity=0.25, every=2, route_chunks=2)),
    "all_on_tied": dict(norm="peri", embed_norm=True, ln_scaling=True, value_residual="learned", tie_embeddings=True,
                        mod=ModConfig(capacity=0.5, every=2, causal="predictor")),
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_every_option_set_exports_to_remote_code_with_identical_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=32,
                      init_std=0.2, **OPTION_SETS[name])
    ours = Transformer(cfg).eval()
    with torch.no_grad():  # gains away from 1 and λ away from 0.5, so a dropped norm or λ shows
        for n, p in ours.named_parameters():
            if n.endswith(("norm.weight", "_in.weight", "_out.weight", "_post.weight", "lambdas")):
                p.uniform_(0.5, 1.5)
    out = write_export(ours, None, tmp_path / f"hf_{name}")
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_harness.HarnessForCausalLM"
    hf, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, causal_logits(ours, ids), rtol=0, atol=1e-5)


def test_generate_rejects_a_prompt_with_no_room_left():
    from trainer.errors import UserError
    from trainer.export.generate import generate_ids

    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8)).eval()
    assert len(generate_ids(model, [1, 2, 3], max_new_tokens=50)) == 5  # stops at max_seq_len
    with pytest.raises(UserError, match=r"prompt is 8 tokens.*max_seq_len=8"):
        generate_ids(model, list(range(8)), max_new_tokens=1)


@pytest.mark.parametrize("cli", ["trainer.generate", "trainer.evaluate"])
def test_missing_run_dir_is_one_line(tmp_path, capsys, cli):
    import importlib

    main = importlib.import_module(cli).main
    extra = ["--prompt", "x"] if cli == "trainer.generate" else ["--tasks", "harness_smoke"]
    assert main([str(tmp_path / "nope"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope does not exist" in err


# ---------------------------------------------------------------------------------------
# Slow: one trained all-options run (with the in-loop eval) and one Llama run per module.


@pytest.fixture(scope="module")
def all_on_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train(tiny_overrides(out, "allon", **ALL_ON, **{"run.max_steps": 4, "run.eval_every": 2, "optim.lr": 1e-2,
                                                     "run.eval_tasks": "[harness_smoke]"}), env=OFFLINE)
    return out / "allon"


@pytest.fixture(scope="module")
def evaluated(all_on_run, tmp_path_factory):
    """`python -m trainer.evaluate` on the finished run, lm_eval's results with samples."""
    res = tmp_path_factory.mktemp("eval") / "results.json"
    proc = run_cli("trainer.evaluate", all_on_run, "--tasks", "harness_smoke", "--output", res)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "harness_smoke" in proc.stdout and "acc" in proc.stdout
    return json.loads(res.read_text())


@pytest.mark.slow
def test_all_options_export_loads_without_our_packages_matches_logits_and_greedy_generation(all_on_run, tmp_path):
    from trainer import load_model
    from trainer.export.generate import generate_ids

    export_dir, io = tmp_path / "export", tmp_path / "io"
    proc = run_cli("trainer.export", all_on_run, export_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"modeling_harness.py", "configuration_harness.py", "tokenizer.json"} <= {p.name for p in export_dir.iterdir()}
    io.mkdir()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids, "prompt": PROMPT, "text": sample_text()}, io / "in.pt")
    (tmp_path / "hf_side.py").write_text(HF_SIDE)
    clean = subprocess.run([sys.executable, str(tmp_path / "hf_side.py"), str(export_dir), str(io)], cwd=tmp_path,
                           env=_env({**OFFLINE, "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}),
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    hf = torch.load(io / "out.pt")
    assert hf["class"] == "HarnessForCausalLM" and hf["missing"] == [] and hf["modules"] == []

    ours = load_model(all_on_run)
    with torch.no_grad():
        torch.testing.assert_close(hf["logits"], causal_logits(ours, ids), rtol=0, atol=1e-4)
    sp = our_sp(all_on_run)
    assert hf["text_ids"] == sp.encode(sample_text()) and hf["prompt_ids"] == sp.encode(PROMPT)
    assert hf["generated"] == generate_ids(ours, sp.encode(PROMPT), 20, eos_id=sp.eos_id())
    assert len(hf["generated"]) == 20 or hf["generated"][-1] == sp.eos_id()


@pytest.mark.slow
def test_llama_compatible_export_stays_plain_llama_and_generates_our_greedy_continuation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from trainer import load_model
    from trainer.export import main as export_main
    from trainer.export.generate import generate_ids

    out = tmp_path / "runs"
    train(tiny_overrides(out, "llama", **{"run.max_steps": 4, "optim.lr": 1e-2, "model.tie_embeddings": "true"}),
          env=OFFLINE)
    export_dir = tmp_path / "export"
    assert export_main([str(out / "llama"), str(export_dir)]) == 0
    assert not (export_dir / "modeling_harness.py").exists()
    assert json.loads((export_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()  # no remote code needed
    tok = AutoTokenizer.from_pretrained(export_dir)
    assert type(hf) is LlamaForCausalLM
    ours = load_model(out / "llama")
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)
    sp = our_sp(out / "llama")
    assert tok(sample_text(), add_special_tokens=False).input_ids == sp.encode(sample_text())
    prompt = tok(PROMPT, return_tensors="pt")
    got = hf.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt.input_ids.shape[1]:].tolist()
    assert got == generate_ids(ours, sp.encode(PROMPT), 20, eos_id=sp.eos_id())


def our_choice_loglikelihoods(model, sp, doc: dict) -> list[float]:
    """Σ log p(choice tokens | question), scored by our model on our tokenizer's ids."""
    ctx = sp.encode(doc["question"] + "\nAnswer:")
    out = []
    for choice in doc["choices"]:
        cont = sp.encode(" " + choice)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = causal_logits(model, ids)[0].log_softmax(-1)
        out.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
    return out


@pytest.mark.slow
def test_evaluate_cli_gives_our_own_loglikelihood_accuracy_on_the_local_task(all_on_run, evaluated):
    from trainer import load_model

    model, sp = load_model(all_on_run), our_sp(all_on_run)
    docs = [json.loads(line) for line in SMOKE.read_text().splitlines()]
    samples = sorted(evaluated["samples"]["harness_smoke"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == 24
    acc, acc_norm = [], []
    for doc, sample in zip(docs, samples):
        ll = our_choice_loglikelihoods(model, sp, doc)
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert ll == pytest.approx(theirs, abs=1e-4), doc
        acc.append(max(range(4), key=lambda i: ll[i]) == doc["answer"])
        norm = [x / len(c) for x, c in zip(ll, doc["choices"])]  # lm_eval's acc_norm: per character
        acc_norm.append(max(range(4), key=lambda i: norm[i]) == doc["answer"])
    result = evaluated["results"]["harness_smoke"]
    assert result["acc,none"] == pytest.approx(sum(acc) / 24)
    assert result["acc_norm,none"] == pytest.approx(sum(acc_norm) / 24)


@pytest.mark.slow
def test_in_loop_eval_rows_match_offline_evaluate_and_leave_training_unchanged(all_on_run, evaluated, tmp_path):
    rows = [r for r in metrics(all_on_run) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [2, 4]
    final = evaluated["results"]["harness_smoke"]
    assert rows[-1]["eval/harness_smoke/acc"] == pytest.approx(final["acc,none"])
    assert rows[-1]["eval/harness_smoke/acc_norm"] == pytest.approx(final["acc_norm,none"])
    assert not (all_on_run / "downstream").exists()
    # lm_eval reseeds the global RNGs; the loop restores them, so training is unaffected.
    out = tmp_path / "runs"
    train(tiny_overrides(out, "allon", **ALL_ON, **{"run.max_steps": 4, "run.eval_every": 2, "optim.lr": 1e-2}))
    assert losses(out / "allon") == losses(all_on_run)


@pytest.mark.slow
def test_in_loop_eval_at_zero3_on_two_ranks_scores_the_gathered_weights(tmp_path):
    """ZeRO-3 partitions every weight over the ranks; the in-loop row must equal an offline
    evaluation of the checkpoint written at the same step."""
    out = tmp_path / "runs"
    train(tiny_overrides(out, "z3", **{"run.max_steps": 2, "run.eval_every": 0, "parallel.zero_stage": 3,
                                        "run.eval_tasks": "[harness_smoke]", "run.eval_tasks_limit": 12}),
          nproc=2, env=OFFLINE)
    row = [r for r in metrics(out / "z3") if "eval/harness_smoke/acc" in r]
    assert [r["step"] for r in row] == [2]
    res = tmp_path / "res.json"
    proc = run_cli("trainer.evaluate", out / "z3", "--tasks", "harness_smoke", "--limit", 12, "--output", res)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads(res.read_text())["results"]["harness_smoke"]
    assert row[0]["eval/harness_smoke/acc"] == pytest.approx(offline["acc,none"])
    assert row[0]["eval/harness_smoke/acc_norm"] == pytest.approx(offline["acc_norm,none"])


@pytest.mark.slow
def test_unknown_task_and_too_long_prompt_are_one_line_errors(all_on_run, tmp_path):
    proc = run_cli("trainer.evaluate", all_on_run, "--tasks", "harness_smoke,no_such_task")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown lm_eval task(s) no_such_task" in proc.stderr
    proc = run_cli("trainer.generate", all_on_run, "--prompt", "word " * 200)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "max_seq_len=64" in proc.stderr
    proc = train(tiny_overrides(tmp_path / "runs", "bad", **{"run.eval_tasks": "[no_such_task]"}), check=False)
    assert proc.returncode == 2 and "run.eval_tasks: unknown lm_eval task(s) no_such_task" in proc.stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()
