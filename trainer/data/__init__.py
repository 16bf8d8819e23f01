"""Data at scale, in two phases.

**Prepare** (offline, CPU, parallel, resumable; `python -m trainer.prepare`): sources
(`sources.py`) are cut into units of work, tokenized by worker processes into token shards
with checksummed sidecars (`shards.py`), and published with an `index.json` (`prepare.py`).

**Train** only opens what prepare wrote: `loader.py` memory-maps the shards and turns global
sample indices into batches, through `mixture.py` when `data.mix` weighs several sources.
The training loop touches only the loader (`prepare_data` and the object it returns).
"""
from trainer.data.loader import HeldOut, Loader, MixedData, PackedData, permute, prepare_command, prepare_data
from trainer.data.mixture import Mixture
from trainer.data.prepare import plan, prepare_all
from trainer.data.shards import TokenStream, token_dtype
from trainer.data.sources import ACCEPTED, EXCLUDED_STDLIB_DIRS, DataError, open_source

__all__ = ["ACCEPTED", "EXCLUDED_STDLIB_DIRS", "DataError", "HeldOut", "Loader", "MixedData", "Mixture", "PackedData",
           "TokenStream", "open_source", "permute", "plan", "prepare_all", "prepare_command", "prepare_data",
           "token_dtype"]
