"""``graft serve`` as a user runs it: a subprocess on a local model directory, adapters by NAME=DIR, requests
over loopback, and a SIGTERM during a request that still gets its whole answer (graceful shutdown)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import grafting as gf

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from serving_models import add_random_adapter, free_port, save_tiny_lm, wait_healthy  # noqa: E402

pytest.importorskip("uvicorn")


def test_graft_serve_answers_and_shuts_down_gracefully(tmp_path):
    # room for an answer long enough to be cut short by a SIGTERM
    base, _ = save_tiny_lm(tmp_path / "tiny-gpt2", positions=320)
    model = gf.AdaptedModel(base)
    add_random_adapter(model, "style", "gpt2", r=8, seed=3)
    model.save_adapter(tmp_path / "style", name="style")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "grafting.cli.main", "serve", str(tmp_path / "tiny-gpt2"),
                             "--adapter", f"style={tmp_path / 'style'}", "--port", str(port), "--max-lora-rank", "16",
                             "--max-cpu-loras", "16", "--stack-dtype", "bfloat16",
                             "--preload", "--kv-cache-memory", "2M"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["tiny-gpt2", "style"]
        metrics = httpx.get(url + "/metrics").text
        assert "grafting_adapter_loads_total 1.0" in metrics  # --preload: read at startup
        assert "grafting_adapter_reads_total 1.0" in metrics and "grafting_adapters_in_memory 1.0" in metrics
        assert "grafting_kv_cache_bytes 0.0" in metrics and "grafting_preemptions_total 0.0" in metrics
        body = {"model": "style", "prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        first = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
        assert first["usage"]["completion_tokens"] == 5

        # a streamed request: SIGTERM goes out once its first token has arrived and /metrics shows it running,
        # with hundreds of tokens (several ms each) still to come
        long = {**body, "max_tokens": 250, "stream": True, "stream_options": {"include_usage": True}}
        data = []
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    data.append(line[6:])
                    break
            metrics = httpx.get(url + "/metrics").text
            proc.send_signal(signal.SIGTERM)
            data += [line[6:] for line in lines if line.startswith("data: ")]
        generated = float(re.search(r"^grafting_generated_tokens_total (\S+)$", metrics, re.M).group(1))
        assert "grafting_batch_size 1.0" in metrics and 5 < generated < 5 + 250, metrics  # mid-answer
        assert data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        assert events[-1]["usage"]["completion_tokens"] == 250  # the whole answer, after the signal
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        # uvicorn finishes open requests, runs the shutdown (engine drained), then re-raises the signal
        assert proc.wait(60) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert "Waiting for connections to close" in out  # uvicorn saw the stream still open at the signal
        assert "Finished server process" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
