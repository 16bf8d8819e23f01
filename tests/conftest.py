"""Suite-wide fixtures. (`make test` runs the suite on two pytest-xdist workers, one module
to a worker: the Makefile says why.)"""
from __future__ import annotations

import os

import pytest

SHARED_DATA_CACHE_ENV = "TESTS_SHARED_DATA_CACHE"  # tests/helpers.py reads it (not imported here: it imports torch)


@pytest.fixture(scope="session", autouse=True)
def shared_data_cache(tmp_path_factory):
    """One tiny-data cache for every `tiny_overrides` run of this pytest process (see
    tests/helpers.py): the tokenizer is trained and the shards packed once per data config, not
    once per test. Each xdist worker has its own, so two preparers of one fingerprint never meet
    (the cache has no lock); tests within a worker run one at a time."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = tmp_path_factory.getbasetemp() / f"data-cache-{worker}"
    path.mkdir(exist_ok=True)
    old = os.environ.get(SHARED_DATA_CACHE_ENV)
    os.environ[SHARED_DATA_CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(SHARED_DATA_CACHE_ENV, None)
    else:
        os.environ[SHARED_DATA_CACHE_ENV] = old
