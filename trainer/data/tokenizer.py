"""SentencePiece tokenizer: training on a corpus sample, loading, and batch encode/decode.

Trained models are byte-level lossless for code and prose: BPE with byte fallback, identity
normalisation, no whitespace collapsing, no dummy prefix, and newline/tab as their own
pieces, so `decode(encode(s)) == s` for any text without U+2581 ('▁', SentencePiece's
space marker, which decodes to a space).

Reserved ids of a trained model: unk=0, bos=1, eos=2, pad=3, "\\n"=4, "\\t"=5, then the 256
byte pieces <0x00>..<0xFF>, then the learned merges. A user-supplied `.model` keeps its own
ids; `eos_id` must exist because packing ends every document with it.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import sentencepiece as spm

from trainer.errors import UserError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Bump when the training recipe below changes, so cached tokenizers are not reused.
RECIPE_VERSION = 1
# The thread count SentencePiece records in the model file; training may use more threads,
# but the file always says this, so it (and its fingerprint) is the same on every machine.
TRAIN_THREADS = 2


class TokenizerError(UserError):
    """A tokenizer file or training request that cannot work; the message is one line."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Tokenizer:
    """A loaded SentencePiece model. Pickles as its path (for `datasets.map(num_proc>1)`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist; set data.tokenizer to a "
                                 f"SentencePiece .model file, or to '' to train one on the corpus")
        self.fingerprint = file_sha256(self.path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError):
            raise TokenizerError(f"tokenizer file {self.path} is not a valid SentencePiece model") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"tokenizer {self.path} defines no EOS piece, which packing needs between "
                                 f"documents; train it with eos_id set, or set data.tokenizer='' to train one")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(Path(path))

    @classmethod
    def train(cls, sample: str, vocab_size: int, out_path: Path, threads: int = TRAIN_THREADS) -> "Tokenizer":
        """BPE on `sample` (split into lines, SentencePiece's sentences), written atomically to
        `out_path`, with SentencePiece's multi-threaded trainer on `threads` threads."""
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # Lines in, proto bytes out: no temp paths recorded in the model, so the same sample and
        # settings give a byte-identical file (and fingerprint) on every machine.
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample.split("\n")), model_writer=model, vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n", "\t"],
                unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, num_threads=max(1, threads),
                minloglevel=2)
        except RuntimeError as e:
            raise TokenizerError(_training_error(str(e), vocab_size, len(sample))) from None
        tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(_with_recorded_threads(model.getvalue()))
        os.replace(tmp, out_path)
        return cls(out_path)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def copy_to(self, directory: Path) -> Path:
        """Atomic copy as `directory/tokenizer.model` (the run dir's tokenizer/, docs/design.md §3)."""
        directory.mkdir(parents=True, exist_ok=True)
        dst = directory / "tokenizer.model"
        tmp = directory / f".tokenizer.model.tmp-{os.getpid()}"
        shutil.copyfile(self.path, tmp)
        os.replace(tmp, dst)
        return dst

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["path"]))


def _with_recorded_threads(proto: bytes) -> bytes:
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    if m.trainer_spec.num_threads == TRAIN_THREADS:
        return proto
    m.trainer_spec.num_threads = TRAIN_THREADS
    return m.SerializeToString()


def _training_error(message: str, vocab_size: int, sample_chars: int) -> str:
    """SentencePiece's multi-line internal error, reduced to what the user can change."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (f"model.vocab_size={vocab_size} is too large for this corpus: SentencePiece can learn at most "
                f"{too_high.group(2)} pieces from the {sample_chars}-char sample; lower model.vocab_size, or "
                f"use more text (data.tokenizer_sample_chars, a larger data.source or data.max_docs)")
    last = " ".join(message.split())
    return f"SentencePiece could not train a {vocab_size}-piece tokenizer on the {sample_chars}-char sample: {last}"
