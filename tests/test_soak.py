"""Opt-in soak (pytest -m slow): 5,000 tokens of offloaded generation, nothing accumulates."""

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_soak_5000_tokens_flat_rss_no_leaks_consistent_stats():
    spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "scripts" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert soak.main(["--tokens", "5000", "--round", "250"]) == 0
