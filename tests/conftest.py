"""Shared fixtures: the tiny model is built once per test session into a temporary cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test (and every worker process a test starts) uses a fresh model cache, offline."""
    cache = tmp_path_factory.mktemp("stepfleet-cache")
    old = {k: os.environ.get(k) for k in ("STEPFLEET_CACHE", "HF_HUB_OFFLINE")}
    os.environ["STEPFLEET_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
