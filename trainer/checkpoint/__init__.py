"""Checkpoints: atomic, verifiable, parallel checkpoints, optionally written in the background, and
resumable on another world size or ZeRO stage.

Layout of `checkpoints/step-N/`:
- DeepSpeed's engine files (`mp_rank_00_model_states.pt`, `*zero_pp_rank_*_optim_states.pt`);
- `trainer_state_rank{r}.pt`: step, tokens, depth, RNG, and the layout (world size, DP, SP,
  ZeRO stage) the checkpoint was saved with;
- `manifest.rank{r}.json`: size and xxh3-128 of every file rank r wrote;
- `MANIFEST.json`: the union of the rank parts, merged by rank 0;
- `COMPLETE`, written last, once every rank's bytes are fsync'd;
- `universal/`, only after a resume on another layout: DeepSpeed's universal checkpoint,
  converted from the files above (which stay untouched).

Saving. Every rank writes and hashes its own files at the same time. DeepSpeed hands each
state dict to its checkpoint engine; ours (`RankWriter`) streams torch.save's bytes through
xxh3 into the file and fsyncs it, so the hash costs no second read. Files go to
`step-N.tmp/`; rank 0 merges the parts, writes `COMPLETE`, then renames the directory to
`step-N/`: the rename commits, so no crash leaves a `step-N/` without `COMPLETE`. DeepSpeed's
own `latest` file is never written or trusted (it is updated before DeepSpeed's barrier).

Async (`checkpoint.async: true`). The engine copies each state dict to host memory and a
background thread per rank writes it; the loop waits only for the copy. Rank 0's thread
seals the checkpoint once every rank's manifest part is on disk. The next save and the end
of the run (a preemption stop included) wait for a pending save. DeepSpeed 0.19.8's
DecoupledCheckpointEngine is not used: it needs the `deepspeed` launcher's CROSS_SIZE, fails
without a model-parallel unit ('UniversalParallelInfo' has no 'dp_rank') as in our pure-DP
runs, and moves live tensors into /dev/shm for a spawned writer process.

Modules, from the bottom of the import graph up: `state` (TrainState, the loop's own state),
`manifest` (finding and verifying, no DeepSpeed), `io` (hashed, fsync'd writes through
DeepSpeed's checkpoint engine), `universal` (resharding through DeepSpeed's universal
checkpoint), `checkpointer` (the Checkpointer), `init_from` (a new run from another's
weights) and `preemption` (stop requests that end in a checkpoint).
"""
