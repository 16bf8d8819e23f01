"""`--dry-run`, the planner: validate a config and say what the run would cost, without data
or hardware.

    python -m trainer.train CONFIG --dry-run [--world-size N] [--gpu H100] [--mfu 0.4]

It builds the model on the meta device (no memory, no compute) and prints the parameters,
training FLOPs per token, the batch and token budget, memory per GPU by component, and the
wall time on the named GPU at the assumed MFU.

Memory per GPU (bytes; N parameters, shard = world size, because DeepSpeed partitions ZeRO
state over the whole data × sequence-parallel group):

- weights: N × (2 under bf16, else 4), / shard at ZeRO-3;
- gradients: N × 4 (accumulated in fp32 under bf16 too), / shard at ZeRO ≥ 2;
- bf16 gradients: N × 2 more where the derived DeepSpeed config selects BF16_Optimizer
  (bf16 ZeRO-1 with fp32 accumulation): it keeps the module's bf16 `.grad` of every
  parameter as well as its fp32 accumulation buffer (deepspeed/runtime/bf16_optimizer.py,
  `clear_lp_grads` zeroes them and never frees them); 2.1 GiB at 1B;
- optimizer: N × (8 for AdamW's two fp32 moments, + 4 for the fp32 master under bf16),
  / shard at ZeRO ≥ 1;
- activations: what autograd keeps for the backward, counted tensor by tensor for this
  model's implementation (see `block_activation_bytes`), for micro_batch × seq_len / sp
  tokens per rank; with full activation checkpointing only each block's input is kept, plus
  one block's activations while it is recomputed;
- logits: the fp32 log-probabilities the loss keeps and, at the start of the backward, the
  gradients of the log-probabilities and logits (12 bytes per vocabulary entry per token);
- context: what a GPU process holds outside torch's allocator, `CONTEXT_BYTES`: the CUDA
  context with torch's kernels and the cuBLAS workspace, and NCCL's communicator buffers.
  `torch.cuda.max_memory_allocated` does not see it (compare that with `Memory.allocated`),
  `nvidia-smi` does.

Not counted: DeepSpeed's communication buckets (ZeRO-1/2: a `reduce_bucket_size` = 5e8
element bf16 bucket, 0.9 GiB, plus its fp32 copy while it is reduced), allocator
fragmentation (budget ~10-20% on top), and the optimizer step's temporaries.
`tests/unit/test_summary.py` checks the arithmetic against tensor allocations tracked by torch's
`MemTracker` during a real forward, backward and AdamW step on CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from model import Transformer
from model.config import ModelConfig
from model.mod import predictor_hidden, tokens_per_chunk
from trainer.config import RunConfig, activation_checkpoint_every
from trainer.errors import UserError
from trainer.metrics import datasheet_peak
from trainer.parallel.dist import print0
from trainer.parallel.engine import deepspeed_config
from trainer.parallel.layout import BatchLayout
from trainer.parallel.ulysses import grad_scale, largest_param

GIB = 2**30
# CUDA context (~0.5 GiB on an H100 under CUDA 12's lazy module loading, more as kernels
# load), cuBLAS workspace and NCCL communicators (NCCL_BUFFSIZE 4 MiB per channel and peer;
# DeepSpeed opens a world group and, under Ulysses, SP and SP-data groups): 1.5 GiB.
CONTEXT_BYTES = 1.5 * GIB


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense datasheet peak in the run's precision (trainer.metrics.PEAK_FLOPS_TABLE)
    peak_source: str
    memory_gib: float  # nominal HBM capacity


# --gpu names the planner knows: HBM capacity here, peaks from the training loop's own table.
GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 80, "H100-PCIE": 80, "H100-NVL": 94, "H200": 141, "H200-NVL": 141, "B200": 180,
    "A100": 80, "A100-40GB": 40, "L40S": 48, "L4": 24, "A10G": 24,
}


def gpu_spec(name: str, precision: str) -> GPU:
    key = name.upper()
    found = datasheet_peak(key, precision) if key in GPU_MEMORY_GIB else None
    if found is None:
        raise UserError(f"--gpu {name!r} is not in the peak-FLOPs table; expected one of {' | '.join(GPU_MEMORY_GIB)}")
    return GPU(key, found[0], found[1], GPU_MEMORY_GIB[key])


# ---- activation memory ---------------------------------------------------------------

def _norm_bytes(cfg: ModelConfig, a: int, output_saved: bool) -> int:
    """RMSNorm computes in fp32: its fp32 input (4d) and normalised value (a·d) are saved;
    LayerNorm's fused kernel keeps its input (a·d) and per-token stats. Plus the output
    (a·d) when the next op is a matmul that keeps its input."""
    d = cfg.d_model
    kept = 4 * d + a * d if cfg.norm_type == "rmsnorm" else a * d + 8
    return kept + (a * d if output_saved else 0)


def block_activation_bytes(cfg: ModelConfig, layer: int, a: int, seq_len: int) -> float:
    """Bytes autograd keeps per token of the sequence for 1-based block `layer`, `a` being
    the activation dtype's size. Dense block: two norms, q and k after RoPE, v, the
    attention output and its head-merged copy, the flash log-sum-exp (fp32, per head), and
    SwiGLU's gate, silu(gate), up and their product. A routed MoD block runs that on its
    k/T share of the tokens, plus the router's input and the MoD update's operands."""
    d, f, q, kv, dh = cfg.d_model, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.head_dim
    nb = 2 * _norm_bytes(cfg, a, True)  # pre/peri: sublayer-input norms; post: the two post norms
    if cfg.norm == "peri":
        nb += 2 * _norm_bytes(cfg, a, False)  # output norms: their output only joins the residual
    attn = a * (q + kv + kv + q + q) + 4 * cfg.n_heads
    if layer > 1 and cfg.value_residual == "learned":
        attn += a * kv  # λ1 is a parameter, so W_v x is kept for its gradient
    elif layer > 1 and cfg.value_residual == "shared":
        attn -= a * kv  # attends with V1 itself: nothing new
    dense = nb + attn + 4 * a * f
    if not cfg.is_routed(layer):
        return dense
    chunk = seq_len // cfg.mod.route_chunks
    share = tokens_per_chunk(cfg.mod.capacity, chunk) / chunk
    routed = share * (dense + a * d + 2 * a * dh) + a * d
    if cfg.mod.causal == "predictor":
        routed += 2 * a * predictor_hidden(d)
    return routed


def activation_bytes(cfg: ModelConfig, seq_len: int, tokens: float, a: int, checkpointed: set[int]) -> float:
    """Bytes kept for the backward for `tokens` tokens per rank; blocks in `checkpointed`
    keep only their input (a·d). See `recompute_bytes` for the block being recomputed."""
    per_block = {layer: block_activation_bytes(cfg, layer, a, seq_len) for layer in range(1, cfg.n_layers + 1)}
    kept = sum(a * cfg.d_model if layer in checkpointed else b for layer, b in per_block.items())
    if checkpointed and cfg.value_residual != "none":
        kept += a * cfg.kv_heads * cfg.head_dim  # V1, an input of every recomputed block
    kept += _norm_bytes(cfg, a, True)  # final norm
    if cfg.embed_norm:
        kept += _norm_bytes(cfg, a, True)
    return kept * tokens


def recompute_bytes(cfg: ModelConfig, seq_len: int, tokens: float, a: int, checkpointed: set[int]) -> float:
    """The largest checkpointed block's activations, live again while it is recomputed."""
    return max((block_activation_bytes(cfg, layer, a, seq_len) for layer in checkpointed), default=0.0) * tokens


def logits_bytes(cfg: ModelConfig, tokens: float, a: int) -> float:
    """fp32 log-probs (kept by the loss), their gradient and the fp32 logits' gradient at the
    start of the backward (the bf16 logits' gradient comes after the first two are freed)."""
    return tokens * cfg.vocab_size * 12


def checkpointed_blocks(mode: str, n_layers: int) -> set[int]:
    """The 1-based blocks `parallel.activation_checkpointing` wraps: none, full, or
    every_<k> (blocks k, 2k, ...)."""
    k = activation_checkpoint_every(mode) or 0
    return set(range(k, n_layers + 1, k)) if k else set()


# ---- the plan ------------------------------------------------------------------------

@dataclass
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float  # no activation checkpointing
    activations_ckpt: float  # full activation checkpointing: block inputs
    recompute: float  # full activation checkpointing: one block recomputed in the backward
    logits: float
    bf16_grads: float = 0.0  # BF16_Optimizer's module gradients, beside its fp32 ones
    context: float = CONTEXT_BYTES  # CUDA context and NCCL buffers, outside torch's allocator

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.bf16_grads + self.optimizer

    def allocated(self, checkpointing: bool = False) -> float:
        """The peak of torch's allocator (`torch.cuda.max_memory_allocated`). With
        checkpointing, the logits' gradients are freed before the first block is recomputed,
        so the two never coincide."""
        if checkpointing:
            return self.states + self.activations_ckpt + max(self.logits, self.recompute)
        return self.states + self.activations + self.logits

    def total(self, checkpointing: bool = False) -> float:
        """What the GPU must hold at the peak: the allocator's peak plus the context."""
        return self.allocated(checkpointing) + self.context


@dataclass
class Plan:
    world: int
    dp: int
    params: int  # at the final depth
    params_non_embedding: int
    params_initial: int  # before growth
    flops_per_token: float  # at the final depth
    tokens_per_step: int
    steps: int
    total_tokens: int
    tokens_per_param: float
    total_flops: float  # summed over growth stages
    data_passes: float  # total tokens / the train split's token cap (data.max_tokens); 0 = no cap set
    memory: Memory
    gpu: str
    gpu_spec: GPU
    mfu: float
    hours: float


def _meta_model(cfg: RunConfig, n_layers: int) -> Transformer:
    with torch.device("meta"):
        return Transformer(dataclasses.replace(cfg.model, n_layers=n_layers), sp_degree=1)


def memory_per_gpu(cfg: RunConfig, n_params: int, world: int, checkpointing: str = "full") -> Memory:
    """`checkpointing` (full | every_<k>) sizes the `activations_ckpt`/`recompute` fields."""
    p, m = cfg.parallel, dataclasses.replace(cfg.model, n_layers=cfg.final_layers)
    bf16 = p.precision == "bf16"
    shard, z = max(1, world), p.zero_stage
    a = 2 if bf16 else 4
    tokens = BatchLayout.of(cfg, world // p.sp).tokens_per_micro / p.sp  # per rank: SP ranks split each sample
    every = checkpointed_blocks(checkpointing, m.n_layers)
    return Memory(
        weights=n_params * a / (shard if z == 3 else 1),
        grads=n_params * 4 / (shard if z >= 2 else 1),
        optimizer=n_params * (12 if bf16 else 8) / (shard if z >= 1 else 1),
        activations=activation_bytes(m, cfg.data.seq_len, tokens, a, set()),
        activations_ckpt=activation_bytes(m, cfg.data.seq_len, tokens, a, every),
        recompute=recompute_bytes(m, cfg.data.seq_len, tokens, a, every),
        logits=logits_bytes(m, tokens, a),
        bf16_grads=n_params * 2 if uses_bf16_optimizer(deepspeed_config(cfg)) else 0.0,
    )


def uses_bf16_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed 0.19.8 wraps the optimizer in BF16_Optimizer for this merged config
    (engine._do_optimizer_sanity_check: bf16 parameters, fp32 accumulation, ZeRO-1, no
    offload)."""
    zero = ds.get("zero_optimization", {})
    return (ds.get("bf16", {}).get("enabled", False) and zero.get("stage", 0) == 1
            and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"
            and zero.get("offload_optimizer", {}).get("device", "none") == "none")


def plan(cfg: RunConfig, world_size: int = 0, gpu: str = "H100", mfu: float = 0.4) -> Plan:
    p = cfg.parallel
    world = world_size or p.sp
    if world % p.sp:
        raise UserError(f"--world-size {world} is not a multiple of parallel.sp={p.sp}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must be in (0, 1]")
    spec = gpu_spec(gpu, p.precision)
    dp = world // p.sp
    final = _meta_model(cfg, cfg.final_layers)
    n = final.num_params()
    tokens_per_step = BatchLayout.of(cfg, dp).tokens_per_step  # the training loop's own arithmetic
    steps = cfg.run.max_steps
    # Growth: each stage trains at its own depth, so FLOPs are summed stage by stage.
    bounds = [(0, cfg.model.n_layers)] + [(s.at_step, s.layers) for s in cfg.growth.stages]
    total_flops = 0.0
    for i, (start, layers) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else steps
        total_flops += (end - start) * tokens_per_step * _meta_model(cfg, layers).flops_per_token(cfg.data.seq_len)
    return Plan(
        world=world, dp=dp, params=n, params_non_embedding=final.num_params(non_embedding=True),
        params_initial=_meta_model(cfg, cfg.model.n_layers).num_params(),
        flops_per_token=final.flops_per_token(cfg.data.seq_len), tokens_per_step=tokens_per_step, steps=steps,
        total_tokens=tokens_per_step * steps, tokens_per_param=tokens_per_step * steps / n, total_flops=total_flops,
        data_passes=tokens_per_step * steps / (cfg.data.max_tokens * (1 - cfg.data.val_fraction))
        if cfg.data.max_tokens else 0.0,
        memory=memory_per_gpu(cfg, n, world), gpu=spec.name, gpu_spec=spec, mfu=mfu,
        hours=total_flops / (world * spec.peak_flops * mfu) / 3600,
    )


def dry_run(cfg: RunConfig, world_size: int = 0, gpu: str = "H100", mfu: float = 0.4) -> Plan:
    pl = plan(cfg, world_size, gpu, mfu)
    m, p, mem = cfg.model, cfg.parallel, pl.memory
    # Refuses SP gradient-reduction paths no loss scale corrects, as the engine build would.
    grad_scale(deepspeed_config(cfg), p.sp, pl.world, largest_param(_meta_model(cfg, cfg.final_layers)))
    depth = f"{m.n_layers} -> {cfg.final_layers} layers (growth)" if cfg.growth.stages else f"{m.n_layers} layers"
    grown = f" ({pl.params_initial:,} before growth)" if cfg.growth.stages else ""
    print0(f"config OK: {cfg.run.name}")
    print0(f"  model       {depth}, d_model {m.d_model}, heads {m.n_heads}/{m.kv_heads} kv, "
           f"norm {m.norm}, ln_scaling {m.ln_scaling}, value_residual {m.value_residual}, "
           f"mod capacity {m.mod.capacity}, rope_theta {m.rope_theta:g}")
    print0(f"  parameters  {pl.params:,} total, {pl.params_non_embedding:,} non-embedding{grown}")
    print0(f"  FLOPs/token {pl.flops_per_token:,.0f} (training, seq_len {cfg.data.seq_len})")
    print0(f"  batch       {pl.tokens_per_step:,} tokens per step (micro {p.micro_batch} x accum "
           f"{p.grad_accum} x dp {pl.dp}, seq {cfg.data.seq_len}, sp {p.sp}; world {pl.world})")
    print0(f"  budget      {pl.steps:,} steps, {pl.total_tokens:,} tokens, "
           f"{pl.tokens_per_param:.1f} tokens/parameter, {pl.total_flops:.3g} FLOPs")
    if pl.data_passes:
        print0(f"  data        data.max_tokens {cfg.data.max_tokens:,} (train split ~"
               f"{cfg.data.max_tokens * (1 - cfg.data.val_fraction):,.0f}): the run reads it {pl.data_passes:.2f} times"
               + (" (repeats data)" if pl.data_passes > 1 else ""))
    ac = p.activation_checkpointing
    print0(f"  memory/GPU  ZeRO-{p.zero_stage} over {pl.world} ranks, {p.precision}, activation_checkpointing {ac}")
    bf16_grads = f" + {mem.bf16_grads / GIB:.2f} GiB bf16 (BF16_Optimizer)" if mem.bf16_grads else ""
    print0(f"    weights {mem.weights / GIB:.2f} GiB, grads {mem.grads / GIB:.2f} GiB{bf16_grads}, "
           f"optimizer {mem.optimizer / GIB:.2f} GiB, logits {mem.logits / GIB:.2f} GiB, "
           f"CUDA/NCCL context {mem.context / GIB:.1f} GiB")
    print0(f"    activations {mem.activations / GIB:.2f} GiB (no checkpointing), "
           f"{mem.activations_ckpt / GIB:.2f} GiB + {mem.recompute / GIB:.2f} GiB recompute (full checkpointing)")
    if ac.startswith("every_"):
        sel = memory_per_gpu(cfg, pl.params, pl.world, ac)
        print0(f"    activations {sel.activations_ckpt / GIB:.2f} GiB + {sel.recompute / GIB:.2f} GiB recompute "
               f"({ac}): total {sel.total(True) / GIB:.1f} GiB")
    cap = pl.gpu_spec.memory_gib
    print0(f"    total {mem.total() / GIB:.1f} GiB, or {mem.total(True) / GIB:.1f} GiB with full checkpointing "
           f"({pl.gpu}: {cap:g} GiB; add ~10-20% for communication buckets and fragmentation)")
    print0(f"  time        {pl.hours:,.1f} h ({pl.hours / 24:.1f} days) on {pl.world} x {pl.gpu} at MFU {pl.mfu:g} "
           f"(peak {pl.gpu_spec.peak_flops / 1e12:g} TFLOP/s, {pl.gpu_spec.peak_source})")
    print0(f"  run dir     {cfg.run_dir}")
    return pl
