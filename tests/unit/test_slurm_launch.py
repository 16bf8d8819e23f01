"""slurm/launch.sh's helpers, run in bash with stubbed SLURM commands (no cluster needed)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.helpers import ROOT


def _bash(script: str, stubs: dict[str, str], tmp_path: Path, env: dict | None = None) -> str:
    """Source launch.sh and run `script`, with `stubs` (name -> shell body) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    proc = subprocess.run(["bash", "-c", f"source slurm/launch.sh; {script}"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_master_addr_falls_back_to_slurm_node_addr(tmp_path):
    scontrol = 'echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.9.8.7 NodeHostName=$3 Version=22.05"'
    # A name that resolves is used as is; one that does not becomes SLURM's NodeAddr.
    out = _bash("_hl_node_addr localhost; echo; _hl_node_addr no-such-node-7f3a; echo", {"scontrol": scontrol},
                tmp_path)
    assert out.split() == ["localhost", "10.9.8.7"]
    # Neither: empty, so harness_launch stops with a message instead of a hanging rendezvous.
    out = _bash("echo \"[$(_hl_node_addr no-such-node-7f3a)]\"", {"scontrol": "exit 1"}, tmp_path)
    assert out.strip() == "[]"


def test_port_skips_one_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        port = int(_bash(f"_hl_free_port {busy} 127.0.0.1", {}, tmp_path))
    assert port != busy and busy < port < busy + 100


def test_nccl_flight_recorder_only_on_gpu_nodes(tmp_path):
    show = 'echo "${TORCH_NCCL_TRACE_BUFFER_SIZE:-unset} ${TORCH_NCCL_DUMP_ON_TIMEOUT:-unset}' \
           ' ${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-unset}"'
    trace = tmp_path / "logs" / "nccl-trace-7"
    no_gpu = {"nvidia-smi": "exit 0"}
    out = _bash(f"_hl_nccl_trace_env {trace} >/dev/null; {show}", no_gpu, tmp_path)
    assert out.split() == ["unset", "unset", "unset"]
    out = _bash(f"_hl_nccl_trace_env {trace} >/dev/null; {show}", no_gpu, tmp_path, {"SLURM_GPUS_ON_NODE": "8"})
    assert out.split() == ["2000", "1", f"{trace}/rank_"]
    assert trace.is_dir()
    # A user's own setting wins.
    out = _bash(f"_hl_nccl_trace_env {trace} >/dev/null; {show}", no_gpu, tmp_path,
                {"SLURM_GPUS_ON_NODE": "8", "TORCH_NCCL_TRACE_BUFFER_SIZE": "50"})
    assert out.split()[0] == "50"
