"""Depth diagnostics (docs/design.md §8): per-layer numbers that make the seeds' claims visible,
computed every `logging.diag_every` steps on one fixed batch (the first validation batch).

One row per call, flat keys so W&B plots each as a series; l = 1..L is the 1-based block
index (as in docs/design.md §4 and the MoD stats):

    diag/resid_rms/l{l}       RMS of block l's output, the residual stream after block l;
                              l0 is the stream entering block 1 (the embedding output)
    diag/angle/l{l}           mean over tokens of arccos(cos(x_in, x_out)) / π: 0 = block l
                              leaves the stream's direction alone, 0.5 = orthogonal update
    diag/grad_norm/l{l}       ‖∂loss/∂θ_l‖ of block l's parameters on the fixed batch
    diag/attn_entropy/l{l}    softmax(QKᵀ/√Dh + causal mask) entropy in nats, mean over
                              heads and queries (batch too)
    diag/lambda1|lambda2/l{l} value-residual mixing weights (fixed or learned modes)
    diag/mod/selected_frac/l{l}, diag/mod/causal_acc/l{l}
                              routed block l's `Routing(collect_stats=True)` stats for the
                              top-k rule it trains with: fraction processed, and how often
                              the causal rule (σ(logit) > 0.5) agrees with top-k
    diag/mod/causal_frac/l{l} fraction of tokens the causal rule would process
    diag/mod/mean_pos/l{l}    mean position / T of the top-k tokens (0.5 = no position bias)
    diag/mod/pos_hist/l{l}/b{j}  fraction of top-k selections in position bin j of POS_BINS
    diag/loss                 mean token CE on the fixed batch (MoD: top-k rule, no aux)
    diag/loss_skip_last_quarter  the same with the last ⌊L/4⌋ blocks skipped (the final norm
                              and head read block ⌈3L/4⌉'s output): near diag/loss means
                              the deep layers add little (the Curse-of-Depth measure)

How it stays out of training's way:
- The forward runs on `engine.module`, not the engine: DeepSpeedEngine.forward registers
  backward hooks on its output (gradient-accumulation bookkeeping) that must not fire here.
- Gradients come from `torch.autograd.grad(loss, block params)`. With explicit inputs autograd
  returns the leaf gradients without running AccumulateGrad, so `.grad` is untouched and
  DeepSpeed's ZeRO-1/2/3 reduction hooks (`register_post_accumulate_grad_hook`) never fire;
  tests/integration/test_diagnostics.py checks that the training losses are bit-identical with it on.
- ZeRO-3: the forward and backward go through the module's own ZeRO-3 hooks, which gather
  each block's parameters when it runs and release them after, exactly as in training and
  evaluation; every rank runs it (the gathers are collectives). The λ's are read inside
  `deepspeed.zero.GatheredParameters` (a no-op below stage 3).
- Attention probabilities never exist in SDPA, so each block's attention core is swapped, for
  this one forward, for a wrapper that records q and k (after RoPE, after the MoD gather,
  before Ulysses' all-to-all) and then calls the real core.
- No optimizer state, RNG or engine counter is touched; the model has no dropout.
- Blocks compiled by `parallel.compile` run eagerly for this forward (their
  `_compiled_call_impl` is set aside and put back). The recording core and the hooks above
  therefore never reach a compiled graph: dynamo does not guard on module hooks
  (`skip_nnmodule_hook_guards`), so a compiled block would skip hooks added after its
  compilation, and a swapped core would be a new guard failure, and a recompile, every call.
- Everything is computed on the device: per-layer sums and per-block squared gradient norms
  stay there (a block's gradient at a time; at 1B, copying them all to the host was 4.4 GB
  of fp32 per rank), and the row's numbers reach the host in one transfer at the end.

Parallel layouts: data-parallel ranks all see the same fixed batch and compute the same
numbers, so they need no collective. Under Ulysses each rank holds a slice of the sequence:
sums and counts (and the gradients, which are summed like training's are) are all-reduced
over the SP group; entropies use the local queries against the gathered keys; MoD positions
are global. The row is therefore the same at every ZeRO stage and SP degree (up to float
rounding), which tests/integration/test_diagnostics.py checks for SP=2.
Rank 0 logs the row (the caller passes it to `Metrics.log`, a no-op elsewhere).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from model import Routing
from model.attention import causal_key_mask
from trainer.config import RunConfig
from trainer.parallel.dist import Dist
from trainer.parallel.ulysses import gather_sequence, shard_sequence

POS_BINS = 8
SCORE_ELEMENTS = 2**26  # attention scores materialised at once for the entropy (256 MB in fp32)


def fixed_batch(data, dist: Dist, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first validation batch (the train batch of step 0 if there is no val split), as
    this rank's sequence slice: inputs, labels [B, T/sp], global position ids [T/sp]."""
    batch = next(iter(data.val_batches(1, cfg.parallel.micro_batch)), None)
    if batch is None:
        # Global samples 0..B-1, by index: a step's batch is placed relative to the resume
        # anchor, so "step 0" after a resume at another accumulation x DP is another batch.
        batch = data.samples(np.arange(cfg.parallel.micro_batch))
    x, y, pos = shard_sequence(*batch, dist)
    return x.to(dist.device), y.to(dist.device), pos.to(dist.device)


def _pair(total, count) -> torch.Tensor:
    """(sum, count) as a float64 pair, the unit every mean here is reduced in; on the sum's
    device when it is a tensor (no host sync)."""
    total = torch.as_tensor(total).detach().to(torch.float64).reshape(1)
    return torch.cat([total, torch.full((1,), float(count), dtype=torch.float64, device=total.device)])


class _Sums:
    """Named float64 accumulators on `device`, reduced over the SP group in one all-reduce
    and brought to the host in one copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(self.device, torch.float64).reshape(-1)
        self.values[key] = self.values[key] + value if key in self.values else value

    def reduce(self, dist: Dist) -> dict[str, torch.Tensor]:
        """The sums over the SP group, on the host."""
        if not self.values:
            return {}
        keys = sorted(self.values)
        flat = torch.cat([self.values[k] for k in keys])
        if dist.sp > 1:
            dist.all_reduce(flat, group=dist.sp_group)
        return dict(zip(keys, flat.cpu().split([self.values[k].numel() for k in keys])))


def attention_entropy_sum(q: torch.Tensor, k: torch.Tensor, q_offset: int,
                          key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Σ over (batch, head, query) of the causal attention entropy, and the count.

    q [B, Tq, H, Dh] are queries at global positions q_offset..q_offset+Tq-1 of the sequence
    k [B, Tk, Hkv, Dh] spans (Tk >= q_offset + Tq); key_mask [B, Tk] bool or None, as the core
    receives it. GQA: query head h uses kv head h // (H / Hkv), as SDPA's enable_gqa does.
    Scores are formed for one sample and at most SCORE_ELEMENTS of [H, queries, Tk] at a time,
    so long sequences (T = 4096, 32 heads) stay within a few hundred MB.
    """
    B, Tq, H, Dh = q.shape
    Tk = k.shape[1]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    if key_mask is None:
        allowed = torch.ones(Tk, Tk, dtype=torch.bool, device=q.device).tril().expand(B, 1, Tk, Tk)
    else:
        allowed = causal_key_mask(key_mask)
    allowed = allowed[:, :, q_offset:q_offset + Tq]  # [B, 1, Tq, Tk]
    chunk = max(1, SCORE_ELEMENTS // (H * Tk))
    total = torch.zeros((), dtype=torch.float64, device=q.device)
    for b in range(B):
        for lo in range(0, Tq, chunk):
            scores = torch.einsum("qhd,khd->hqk", q[b, lo:lo + chunk].float(), k[b].float()) / math.sqrt(Dh)
            p = scores.masked_fill(~allowed[b, :, lo:lo + chunk], float("-inf")).softmax(-1)
            total += torch.special.entr(p).sum().double()
    return total, B * H * Tq


def angle_between(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angle in radians between x and y [..., D] along the last dim, as 2·atan2(‖x̂−ŷ‖, ‖x̂+ŷ‖):
    exact where arccos(cos) loses everything below ~1e-4 rad to rounding."""
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    y = y / y.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return 2 * torch.atan2((x - y).norm(dim=-1), (x + y).norm(dim=-1))


@contextmanager
def _recording_cores(blocks, sums: _Sums, dist: Dist) -> Iterator[None]:
    """Swap each block's attention core for one that also accumulates attention entropy."""

    def recorder(core, layer: int):
        def core_and_entropy(q, k, v, key_mask=None):
            with torch.no_grad():
                qd, kd, mask = q.detach(), k.detach(), key_mask
                if dist.sp > 1:
                    kd = gather_sequence(kd, dist)
                    mask = None if mask is None else gather_sequence(mask, dist)
                total, count = attention_entropy_sum(qd, kd, dist.sp_rank * q.shape[1], mask)
                sums.add(f"entropy/{layer}", _pair(total, count))
            return core(q, k, v, key_mask=key_mask)

        return core_and_entropy

    originals = [block.attn.core for block in blocks]
    try:
        for layer, block in enumerate(blocks, start=1):
            block.attn.core = recorder(block.attn.core, layer)
        yield
    finally:
        for block, core in zip(blocks, originals):
            block.attn.core = core


def _stream_hooks(stack: ExitStack, blocks, sums: _Sums, dist: Dist, seq_len: int) -> None:
    """Forward hooks: residual RMS and input/output angle per block; for routed blocks the
    top-k position histogram (global positions) and the causal rule's selected fraction."""

    def on_block(layer: int):
        def hook(module, args, output):
            x, y = args[0].detach().double(), output[0].detach().double()
            if layer == 1:  # the stream entering block 1: the (normed) embedding, "l0"
                sums.add("sq/0", _pair(x.pow(2).sum(), x.numel()))
            sums.add(f"sq/{layer}", _pair(y.pow(2).sum(), y.numel()))
            angle = angle_between(x, y)
            sums.add(f"angle/{layer}", _pair(angle.sum() / math.pi, angle.numel()))
        return hook

    def on_router(block, layer: int):
        def hook(module, args, output):
            r = output.detach().squeeze(-1)  # [B, T_local]
            pos = (block.select(r) + dist.sp_rank * r.shape[1]).flatten()
            sums.add(f"pos_hist/{layer}", torch.bincount(pos * POS_BINS // seq_len, minlength=POS_BINS).double())
            sums.add(f"mean_pos/{layer}", _pair(pos.sum() / seq_len, pos.numel()))
        return hook

    def on_causal_rule(layer: int):
        def hook(module, args, output):
            sums.add(f"causal_frac/{layer}", _pair((output.detach() > 0).sum(), output.numel()))
        return hook

    for layer, block in enumerate(blocks, start=1):
        stack.enter_context(block.register_forward_hook(on_block(layer)))
        if hasattr(block, "router"):
            stack.enter_context(block.router.register_forward_hook(on_router(block, layer)))
            stack.enter_context(block.causal_rule.register_forward_hook(on_causal_rule(layer)))


def _lambdas(blocks) -> dict[str, float]:
    """Value-residual λ1, λ2 of every block that mixes (a parameter under `learned`, a
    buffer under `fixed`). Gathered first under ZeRO-3, a collective on every rank."""
    import deepspeed

    mixers = [(layer, block.attn.value) for layer, block in enumerate(blocks, start=1)
              if hasattr(block.attn.value, "lambdas")]
    params = [m.lambdas for _, m in mixers if isinstance(m.lambdas, torch.nn.Parameter)]
    if not mixers:
        return {}
    with deepspeed.zero.GatheredParameters(params):
        lams = torch.stack([m.lambdas.detach().float()[:2] for _, m in mixers]).tolist()  # one copy
    row = {}
    for (layer, _), (lam1, lam2) in zip(mixers, lams):
        row[f"diag/lambda1/l{layer}"], row[f"diag/lambda2/l{layer}"] = lam1, lam2
    return row


def _block_grad_norms(loss: torch.Tensor, blocks, dist: Dist) -> dict[str, float]:
    """‖∂loss/∂θ_l‖ per block without touching `.grad` (see module docstring), on the device,
    one block's gradients at a time. Under SP the gradient is the sum of the ranks' (as
    DeepSpeed sums them in training), so the block's fp32 gradient is all-reduced over the
    group before its norm is taken; only the L norms reach the host."""
    params = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
    grads = list(torch.autograd.grad(loss, [p for ps in params for p in ps], allow_unused=True))
    device = loss.device
    squares, i = [], 0
    for ps in params:
        own, grads[i:i + len(ps)] = grads[i:i + len(ps)], [None] * len(ps)  # freed once used
        i += len(ps)
        if dist.sp > 1:
            # Every rank contributes the same shapes (zeros where a parameter got no gradient).
            flat = torch.cat([torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape, device=device).flatten()
                              if g is None else g.detach().float().flatten() for p, g in zip(ps, own)]
                             or [torch.zeros(0, device=device)])
            squares.append(dist.all_reduce(flat, group=dist.sp_group).double().square().sum())
        else:
            squares.append(sum((torch.linalg.vector_norm(g.detach().float()).double().square() for g in own
                                if g is not None), torch.zeros((), dtype=torch.float64, device=device)))
        del own
    norms = torch.stack(squares).sqrt().tolist()
    return {f"diag/grad_norm/l{layer}": v for layer, v in enumerate(norms, start=1)}


class Diagnostics:
    """Depth diagnostics every `logging.diag_every` steps (0 = off), logged as one row."""

    def __init__(self, cfg: RunConfig, dist: Dist, data, metrics):
        self.cfg, self.dist, self.data, self.metrics = cfg, dist, data, metrics

    def maybe_run(self, state, engine) -> dict | None:
        """Compute and log a row when `state.step` is due; every rank calls it (collectives)."""
        every = self.cfg.logging.diag_every
        if not (every and state.step % every == 0):
            return None
        row = depth_diagnostics(engine, self.data, self.dist, self.cfg, state.step)
        self.metrics.log(row)
        return row


def depth_diagnostics(engine, data, dist: Dist, cfg: RunConfig, step: int) -> dict:
    """One diagnostics row for the model in `engine` on the fixed batch; every rank calls it."""
    model = engine.module
    blocks = list(model.blocks)
    x, y, pos = fixed_batch(data, dist, cfg)
    sums = _Sums(dist.device)
    with ExitStack() as stack, torch.enable_grad():
        stack.enter_context(_eager(blocks))
        stack.enter_context(_recording_cores(blocks, sums, dist))
        _stream_hooks(stack, blocks, sums, dist, cfg.data.seq_len)
        routing = Routing(collect_stats=True)
        logits = model(x, pos, routing)
        aux, stats = routing.aux_loss(), routing.stats
        # The training objective on the fixed batch: Σ token CE / tokens of the whole batch.
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        loss = (ce + cfg.model.mod.aux_weight * aux) / (x.shape[0] * cfg.data.seq_len)
    row: dict = {"step": step, "diag": True, "n_layers": len(blocks)}
    row.update(_block_grad_norms(loss, blocks, dist))
    del logits, aux, loss

    sums.add("loss/full", _pair(ce, y.numel()))
    keep = blocks[:len(blocks) - len(blocks) // 4]
    with _eager(keep):
        sums.add("loss/skip_last_quarter", _pair(_ce_with_blocks(model, keep, x, y, pos), y.numel()))
    for key, value in sorted(stats.items()):  # "mod/block{l}/name" from collect_stats
        _, block, name = key.split("/")
        if name != "mean_pos":  # recomputed by the router hook at global positions
            sums.add(f"stat/{name}/{block[len('block'):]}", _pair(value, 1))
    for key, v in sums.reduce(dist).items():
        kind, layer = key.rsplit("/", 1)
        if kind == "sq":
            row[f"diag/resid_rms/l{layer}"] = math.sqrt(v[0] / v[1])
        elif kind == "angle":
            row[f"diag/angle/l{layer}"] = (v[0] / v[1]).item()
        elif kind == "entropy":
            row[f"diag/attn_entropy/l{layer}"] = (v[0] / v[1]).item()
        elif kind in ("causal_frac", "mean_pos"):
            row[f"diag/mod/{kind}/l{layer}"] = (v[0] / v[1]).item()
        elif kind == "pos_hist":
            for j, frac in enumerate((v / v.sum().clamp(min=1)).tolist()):
                row[f"diag/mod/pos_hist/l{layer}/b{j}"] = frac
        elif kind == "loss":
            row["diag/loss" + ("" if layer == "full" else f"_{layer}")] = (v[0] / v[1]).item()
        elif kind.startswith("stat/"):
            row[f"diag/mod/{kind[len('stat/'):]}/l{layer}"] = (v[0] / v[1]).item()
    row.update(_lambdas(blocks))
    head = {k: row.pop(k) for k in ("step", "diag", "n_layers")}
    return {**head, **dict(sorted(row.items(), key=_series_order))}


@contextmanager
def _eager(blocks) -> Iterator[None]:
    """Run blocks compiled with `nn.Module.compile` eagerly inside the block (see the module
    docstring); `_compiled_call_impl` is what `Module.__call__` dispatches to."""
    compiled = [block._compiled_call_impl for block in blocks]
    try:
        for block in blocks:
            block._compiled_call_impl = None
        yield
    finally:
        for block, fn in zip(blocks, compiled):
            block._compiled_call_impl = fn


@torch.no_grad()
def _ce_with_blocks(model, keep: list, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Σ token CE of `model` with only the blocks in `keep` (a prefix of model.blocks)."""
    full = model.blocks
    model.blocks = torch.nn.ModuleList(keep)
    try:
        logits = model(x, pos)
    finally:
        model.blocks = full
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")


def _series_order(item: tuple[str, float]) -> tuple:
    """Group keys by series, layers in numeric order: diag/angle/l2 before diag/angle/l10."""
    parts = item[0].split("/")
    return tuple((0, int(p[1:]), "") if p[:1] in "lb" and p[1:].isdigit() else (1, 0, p) for p in parts)
