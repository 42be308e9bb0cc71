"""An adapter's files and memory over its life in a server: a PEFT directory holding only a pickled
``adapter_model.bin`` is refused, naming the file, and never unpickled (whether named at start, loaded at run
time or found under the adapter root); unloading an adapter frees its resident copy and its host copy.
A tiny GPT-2 with a byte tokenizer behind uvicorn on 127.0.0.1."""

from __future__ import annotations

import gc
import pickle
import time
import weakref
from pathlib import Path

import httpx
import pytest
from serving_models import add_random_adapter, save_tiny_lm, tiny_lm, uvicorn_server

import grafting as gf
from grafting.errors import GraftingError

pytest.importorskip("uvicorn")


class _Touch:
    """Unpickling this creates ``path``: the marker that something unpickled the checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)


@pytest.fixture()
def files(tmp_path):
    """A model directory, an adapter root with two servable adapters and a pickled one, and the marker path."""
    save_tiny_lm(tmp_path / "model")
    source = gf.AdaptedModel(tiny_lm("gpt2"))
    for i, name in enumerate(("keep", "gone")):
        add_random_adapter(source, name, "gpt2", r=4, seed=30 + i)
        source.save_adapter(tmp_path / "root" / name, name=name)
    pickled = tmp_path / "root" / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "root" / "keep" / "adapter_config.json").read_text())
    marker = tmp_path / "unpickled"
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    # the payload works: unpickling a copy aimed elsewhere creates its file, so a missing marker means no unpickling
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists()
    return {"dir": tmp_path, "root": tmp_path / "root", "pickled": pickled, "marker": marker}


def test_a_pickled_checkpoint_is_refused_naming_the_file_and_never_unpickled(files):
    from grafting.serve.http import create_app
    from grafting.serve.server import build_engine
    root, pickled, marker = files["root"], files["pickled"], files["marker"]
    model_dir = str(files["dir"] / "model")
    with pytest.raises(GraftingError, match=r"pickled/adapter_model\.bin: pickle checkpoints are never loaded"):
        build_engine(model_dir, adapters={"p": str(pickled)})  # named by the operator: the start stops
    assert not marker.exists()
    engine, _ = build_engine(model_dir, adapter_root=str(root))  # registered from its config only
    app = create_app(engine, "tiny", adapter_root=root, request_timeout=30)
    with uvicorn_server(app) as url:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "p2", "lora_path": "pickled"}, timeout=30)
        assert r.status_code == 400 and "adapter_model.bin" in r.json()["error"]["message"], r.text
        assert "pickle" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "pickled", "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 400 and "adapter_model.bin" in r.json()["error"]["message"], r.text
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
        assert "p2" not in ids  # a refused load registers nothing
        r = httpx.post(url + "/v1/completions", timeout=30,  # and the server serves on
                       json={"model": "keep", "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
    assert not marker.exists()


@pytest.mark.parametrize("then", ["another_request", "idle"])
def test_unloading_an_adapter_frees_its_resident_and_host_copies(files, then):
    from grafting.serve.http import create_app
    from grafting.serve.server import build_engine
    engine, _ = build_engine(str(files["dir"] / "model"), adapter_root=str(files["root"]), max_loras=4)
    pool = engine.pool
    app = create_app(engine, "tiny", adapter_root=files["root"], request_timeout=30)

    def complete(model):
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text

    with uvicorn_server(app) as url:
        for name in ("keep", "gone"):
            complete(name)
        digests = {n: pool._registered[n].digest for n in ("keep", "gone")}
        assert set(pool.resident) == set(digests.values()) and set(pool.in_memory) == {"keep", "gone"}
        internal = pool._resident[digests["gone"]].internal
        params = [p for n, p in pool.model.named_parameters() if f".{internal}." in n]
        assert params
        held = [weakref.ref(p) for p in params] + [weakref.ref(t) for t in pool._host["gone"].tensors.values()]
        resident_bytes = sum(r.nbytes for r in pool._resident.values())
        host_bytes = pool._host.nbytes
        del params
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gone"}, timeout=30)
        assert r.status_code == 200, r.text
        assert pool.in_memory == ["keep"] and pool._host.nbytes < host_bytes  # the host copy goes at once
        if then == "another_request":
            complete("tiny")  # the loop's next step evicts the resident copy nobody holds now
        wait_for(lambda: pool.resident == [digests["keep"]], "the unloaded adapter's eviction", timeout=3)
        assert sum(r.nbytes for r in pool._resident.values()) < resident_bytes
        # the pool forgets the copy before the engine thread deletes its modules from the model: wait for both
        wait_for(lambda: internal not in pool.model.adapter_names(), "its modules' deletion", timeout=3)
        wait_for(lambda: gc.collect() >= 0 and all(ref() is None for ref in held),
                 "the unloaded adapter's tensors being freed", timeout=3)
        complete("keep")  # the other adapter serves on
