"""A bounded load test of `graft serve` over loopback (benchmarks/serve_load.py runs the 10,000-request one):
64 concurrent clients, streaming and not, adapters churned during the run, malformed requests mixed in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from serve_load import run  # noqa: E402


def test_sustained_concurrent_load_never_fails_a_request():
    out = run(n_requests=1500, clients=64)
    assert out["server_errors"] == 0 and out["incomplete"] == 0 and out["unexpected"] == 0, out
    assert out["ok"] + out["expected_4xx"] == out["requests"]
    assert out["expected_4xx"] > 0 and out["loads"] > 0 and out["unloads"] > 0  # the bad and the churn ran
    assert out["reload_checks"] > 0 and out["stale"] == 0, out  # every reload answers with its new weights
    assert out["health_after"] == 200
    assert out["rss_mb_end"] - out["rss_mb_after_warmup"] < 100, out  # flat, not growing per request
