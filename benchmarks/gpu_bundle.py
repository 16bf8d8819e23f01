"""Wheels for the project's GPU test machine, which has no network (`make gpu-bundle`).

    python -m benchmarks.gpu_bundle [--out .gpu-bundle] [--check-only]

That machine (one H200, CPython 3.12, torch 2.11 cu130) already holds torch, numpy,
transformers, sentencepiece, pyarrow, xxhash, pyyaml, psutil, pytest and the rest of
MACHINE below. It lacks what the trainer imports on top: DeepSpeed and its pydantic, hjson,
and omegaconf. This writes those as wheels for CPython 3.12 manylinux x86_64 into an
ignored folder that travels with the working tree, and `make gpu-check` installs them there
offline with `--no-deps`, so that machine's own torch is never touched.

DeepSpeed publishes only an sdist. It is built here into a pure-Python wheel (no ops
compiled; DS_BUILD_OPS=0), whose CUDA ops JIT-build on first use, where nvcc exists.

The check: pip resolves the trainer's imports offline, for Python 3.12 on manylinux, from
this folder plus MACHINE (written as empty placeholder wheels at the machine's versions into
a scratch folder, so "already installed there" counts as present), with
`pip install --dry-run --no-index --only-binary=:all: --target`. A missing wheel or a
version conflict fails it, and the bundle is refused over 40 MB.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".gpu-bundle"
MAX_BYTES = 40 * 2**20
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux_2_28_x86_64"]

# What the trainer and its GPU tests import that the machine lacks: the project's pins
# (pyproject.toml) for DeepSpeed and omegaconf, and the versions of their dependencies that
# this venv resolved with them.
BUNDLE = ["deepspeed", "omegaconf", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]

# Already on the machine (device/KINDS.md's package list). Versions that list gives are
# used; for the rest, this venv's version stands in (the machine's own is only known there).
MACHINE = {"torch": "2.11.0", "numpy": "2.5.2", "transformers": "5.17.0", "tokenizers": "0.23.2",
           "safetensors": "0.8.0", "sentencepiece": "0.2.2", "huggingface-hub": "1.33.0", "accelerate": "1.15.0"}
MACHINE_UNVERSIONED = ["pyarrow", "xxhash", "pyyaml", "tqdm", "psutil", "pytest", "pytest-xdist", "pytest-timeout",
                       "matplotlib", "pandas", "scipy", "packaging", "einops", "msgpack", "ninja", "py-cpuinfo",
                       "typing-extensions", "filelock", "jinja2", "sympy", "networkx", "fsspec", "regex", "requests"]

# What must resolve: every third-party module the trainer and tests/gpu import for training.
REQUIRED = ["deepspeed", "omegaconf", "pyyaml", "numpy", "xxhash", "sentencepiece", "safetensors", "transformers",
            "psutil", "tqdm", "pyarrow", "accelerate", "torch", "pytest", "pytest-xdist", "pytest-timeout"]


def _pip(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, **kw)


def installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    pins = [f"{n}=={installed_version(n)}" for n in BUNDLE]
    rest = [p for p in pins if not p.startswith("deepspeed==")]
    got = _pip("download", "-q", "--no-deps", "-d", str(out), *PLATFORM, *rest)
    if got.returncode:
        raise SystemExit(f"gpu-bundle: pip could not download {' '.join(rest)} for CPython 3.12 manylinux: "
                         f"{got.stderr.strip().splitlines()[-1] if got.stderr.strip() else got.returncode}")
    ds = next(p for p in pins if p.startswith("deepspeed=="))
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, ds)
        if sdist.returncode:
            raise SystemExit(f"gpu-bundle: pip could not download the {ds} sdist: {sdist.stderr.strip()[-300:]}")
        src = next(Path(tmp).glob("deepspeed-*.tar.gz"))
        # No build isolation: DeepSpeed's setup.py imports torch, and an isolated build env
        # would download a multi-GB CUDA torch; this venv's CPU torch serves for a wheel
        # with no compiled ops.
        wheel = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src),
                     env={**os.environ, "DS_BUILD_OPS": "0"})
        if wheel.returncode:
            raise SystemExit(f"gpu-bundle: building the {ds} wheel failed: {wheel.stderr.strip()[-500:]}")


def placeholder_wheel(folder: Path, name: str, version: str) -> None:
    """An empty, valid wheel standing for a package the machine already has."""
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(t.encode())}\n" for p, t in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        for p, t in {**files, f"{info}/RECORD": record}.items():
            z.writestr(p, t)


def machine_versions() -> dict[str, str]:
    """MACHINE, plus this venv's version of each unversioned one (0+machine where this venv
    lacks it: no requirement the trainer resolves bounds those)."""
    from importlib.metadata import PackageNotFoundError

    out = {}
    for name in MACHINE_UNVERSIONED:
        try:
            out[name] = installed_version(name)
        except PackageNotFoundError:
            out[name] = "0+machine"
    return {**out, **MACHINE}


def check(out: Path) -> str:
    """The pip dry run over bundle ∪ machine; returns pip's 'Would install' line."""
    size = sum(p.stat().st_size for p in out.glob("*.whl"))
    if size > MAX_BYTES:
        raise SystemExit(f"gpu-bundle: {out} holds {size / 2**20:.1f} MB of wheels, over the 40 MB the GPU machine's "
                         f"working tree allows")
    with tempfile.TemporaryDirectory() as tmp:
        present = Path(tmp) / "machine"
        present.mkdir()
        for name, version in machine_versions().items():
            placeholder_wheel(present, name, version)
        wanted = [f"{n}=={MACHINE[n]}" if n in MACHINE else n for n in REQUIRED]
        proc = _pip("install", "--dry-run", "--no-index", "--find-links", str(out), "--find-links", str(present),
                    *PLATFORM, "--target", str(Path(tmp) / "target"), *wanted)
    if proc.returncode:
        raise SystemExit("gpu-bundle: the offline resolution for the GPU machine failed: "
                         + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    would = next((ln for ln in proc.stdout.splitlines() if ln.startswith("Would install")), "")
    bundled = {re.sub(r"[-_.]+", "-", p.name.split("-")[0]).lower() for p in out.glob("*.whl")}
    missing = [n for n in BUNDLE if n not in bundled]
    if missing:
        raise SystemExit(f"gpu-bundle: {out} lacks wheels for {', '.join(missing)}; run `make gpu-bundle`")
    return f"{len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MB; resolved offline for cp312 manylinux: {would}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder (default .gpu-bundle)")
    ap.add_argument("--check-only", action="store_true", help="only re-run the offline resolution check")
    args = ap.parse_args(argv)
    if not args.check_only:
        build(args.out)
    print(f"{os.path.relpath(args.out, ROOT)}: {check(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
