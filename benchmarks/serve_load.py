"""A bounded load test of `graft serve` on loopback: many concurrent clients, streaming and not, several
adapters, adapters loaded, reloaded and unloaded during the run, malformed requests mixed in.

Question: does the server stay up and answer every request completely, with its memory flat, under
sustained concurrent load? Starts `graft serve` on a small random GPT-2 (or uses ``--url``), drives
``--requests`` requests from ``--clients`` concurrent clients, and reports server errors (5xx), incomplete
responses, expected client errors (400 / 404 for the malformed ones), stale answers (a name reloaded with
other weights that answers as before), requests per second and the server's resident memory after warm-up and
at the end. The last line printed is one JSON object.

    python benchmarks/serve_load.py [--requests 10000] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "sk-load"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_model(root: Path, n_adapters: int = 4) -> tuple[Path, dict]:
    """A small random GPT-2 with a byte-level tokenizer and ``n_adapters`` LoRA adapters, saved under root."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    import grafting as gf
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=260, n_positions=128,
                                      bos_token_id=256, eos_token_id=256))
    base.save_pretrained(root / "model")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(root / "model")
    model = gf.AdaptedModel(base)
    dirs = {}
    for i in range(n_adapters):
        name = f"style{i}"
        model.add_adapter(name, gf.LoraConfig(r=[4, 8, 16, 32][i % 4], target_modules=["c_attn", "c_fc"],
                                              init_lora_weights=False, use_dora=(i == 1)))
        with torch.no_grad():  # large updates: each adapter answers differently (the churn's reload check)
            for pname, p in model.named_parameters():
                if f".{name}." in pname and ("lora_A" in pname or "lora_B" in pname):
                    p.normal_(0, 0.3)
        model.save_adapter(root / "adapters" / name, name=name)
        dirs[name] = root / "adapters" / name
    return root / "model", dirs


def start_server(model_dir: Path, adapter_root: Path, port: int, max_loras: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grafting.cli.main", "serve", str(model_dir), "--adapter-root", str(adapter_root),
           "--port", str(port), "--api-key", KEY, "--max-loras", str(max_loras), "--max-batch", "64",
           "--max-queue", "4096", "--request-timeout", "300", "--timeout-keep-alive", "30"]
    # stderr to a file, not a pipe nobody reads while the server runs: a full pipe would stall the server
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"graft serve exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("graft serve did not come up in 120 s")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, i: int, models: list, rng: random.Random, stats: dict) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    kind = i % 4
    if i % 53 == 0:  # malformed JSON
        r = await client.post("/v1/completions", content=b"{oops", headers={**headers, "Content-Type":
                                                                              "application/json"})
        stats["expected_4xx" if r.status_code == 400 else "unexpected"] += 1
        return
    if i % 97 == 0:  # unknown model
        r = await client.post("/v1/completions", json={"model": "nobody", "prompt": "x"}, headers=headers)
        stats["expected_4xx" if r.status_code == 404 else "unexpected"] += 1
        return
    n = rng.randint(1, 6)
    model = rng.choice(models)
    if kind < 2:
        body = {"model": model, "prompt": "req %d says" % i, "max_tokens": n, "temperature": 0.7, "seed": i,
                "ignore_eos": True}
        path = "/v1/completions"
    else:
        body = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": n,
                "ignore_eos": True}
        path = "/v1/chat/completions"
    if kind % 2 == 0:
        r = await client.post(path, json=body, headers=headers)
        if r.status_code != 200:
            fail(stats, "server_errors" if r.status_code >= 500 else "unexpected",
                 f"{path}: HTTP {r.status_code} {r.text[:200]}")
        elif r.json()["usage"]["completion_tokens"] != n:
            fail(stats, "incomplete", f"{path}: {r.json()['usage']['completion_tokens']} of {n} tokens")
        else:
            stats["ok"] += 1
        return
    finished, done, reasons = False, False, []
    async with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            fail(stats, "server_errors" if r.status_code >= 500 else "unexpected",
                 f"{path} stream: HTTP {r.status_code} {r.text[:200]}")
            return
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    fail(stats, "server_errors", f"{path} stream: {chunk['error']}")
                    return
                reasons += [c.get("finish_reason") for c in chunk["choices"] if c.get("finish_reason")]
                finished |= bool(reasons)
    if finished and done:
        stats["ok"] += 1
    else:
        fail(stats, "incomplete", f"{path} stream: finish_reasons {reasons}, [DONE] {'seen' if done else 'missing'}")


def fail(stats: dict, kind: str, why: str) -> None:
    """Count a failure and keep the first few reasons, so a failing run says what went wrong."""
    stats[kind] += 1
    if len(stats["why"]) < 10:
        stats["why"].append(f"{kind}: {why}")


async def greedy(client: httpx.AsyncClient, model: str, headers: dict) -> str | None:
    """A short greedy completion (None if the request failed)."""
    r = await client.post("/v1/completions", json={"model": model, "prompt": "churn", "max_tokens": 8,
                                                   "temperature": 0, "ignore_eos": True}, headers=headers)
    return r.json()["choices"][0]["text"] if r.status_code == 200 else None


async def churn(client: httpx.AsyncClient, dirs: dict, stop: asyncio.Event, stats: dict) -> None:
    """Load, reload and unload adapters while the clients run. After each load, the name's greedy answer must
    be the answer of the adapter registered from the same directory: a name reloaded with other weights
    never serves what it held before (counted as ``stale``)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    k = 0
    while not stop.is_set():
        name, path = f"churn{k % 3}", list(dirs.values())[k % len(dirs)].name
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=headers)
        if r.status_code == 200:
            stats["loads"] += 1
            got, want = await greedy(client, name, headers), await greedy(client, path, headers)
            stats["reload_checks"] += 1
            if got is None or want is None:
                fail(stats, "unexpected", f"greedy answers of {name} / {path}: a request failed")
            elif got != want:
                fail(stats, "stale", f"{name} reloaded from {path} answered {got!r}, {path} itself {want!r}")
        else:
            fail(stats, "unexpected", f"load {name}: HTTP {r.status_code} {r.text[:200]}")
        if k % 2:
            r = await client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers)
            if r.status_code == 200:
                stats["unloads"] += 1
            else:
                fail(stats, "unexpected", f"unload {name}: HTTP {r.status_code} {r.text[:200]}")
        k += 1
        await asyncio.sleep(0.2)


async def drive(url: str, n_requests: int, clients: int, models: list, dirs: dict, pid: int | None) -> dict:
    stats = {"ok": 0, "server_errors": 0, "incomplete": 0, "expected_4xx": 0, "unexpected": 0, "loads": 0,
             "unloads": 0, "reload_checks": 0, "stale": 0, "why": []}
    rng, counter, stop = random.Random(0), iter(range(n_requests)), asyncio.Event()
    warm = {"rss": None, "series": []}
    # idle connections expire on the client well before the server's keep-alive timeout closes them: a request
    # sent on a connection the server is closing at that moment fails with a reset, which is no server error
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=10)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker():
            for i in counter:
                try:
                    await one_request(client, i, models, rng, stats)
                except httpx.HTTPError as e:
                    fail(stats, "incomplete", f"request {i}: {type(e).__name__}: {e}")
                if pid is not None and warm["rss"] is None and i >= n_requests // 10:
                    warm["rss"] = rss_mb(pid)
                if pid is not None and i % max(n_requests // 10, 1) == 0:
                    warm["series"].append(round(rss_mb(pid)))

        t0 = time.monotonic()
        churner = asyncio.create_task(churn(client, dirs, stop, stats))
        await asyncio.gather(*(worker() for _ in range(clients)))
        stop.set()
        await churner
        elapsed = time.monotonic() - t0
        health = (await client.get("/health")).status_code
    out = {**stats, "requests": n_requests, "clients": clients, "seconds": elapsed,
           "requests_per_s": n_requests / elapsed, "health_after": health}
    if pid is not None:
        out["rss_mb_after_warmup"], out["rss_mb_end"] = warm["rss"], rss_mb(pid)
        out["rss_mb_every_tenth"] = warm["series"]
    return out


def run(n_requests: int, clients: int, max_loras: int = 2) -> dict:
    """Start a server on a fresh small model, drive the load, stop the server; the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, dirs = make_model(Path(tmp))
        port = free_port()
        proc = start_server(model_dir, Path(tmp) / "adapters", port, max_loras)
        try:
            out = asyncio.run(drive(f"http://127.0.0.1:{port}", n_requests, clients,
                                    ["model", *dirs], dirs, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"# graft serve load test: {args.requests} requests, {args.clients} concurrent clients")
    out = run(args.requests, args.clients)
    for k, v in out.items():
        print(f"# {k}: {v}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
