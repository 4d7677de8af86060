"""``frankenllama serve``: the real server (uvicorn on 127.0.0.1, a random port) driven by the real
``openai`` client, compared with direct frankenllama.Llama calls (greedy, same settings)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import frankenllama
from frankenllama import Llama

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")  # the server extra: pip install ".[server]"

KEY = "sk-frankenllama-test"
RYS = "0-20,12-29"          # alias "rys": layers 12..20 run twice
PRUNED = "0-19,25-29"
MERGE = "0-29,8-22"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]
# llama_cpp.server's defaults for what the client doesn't send (direct calls must pass them)
SAMPLING = dict(temperature=0.0, repeat_penalty=1.1)
# the settings of every alias, passed to the direct models too; one thread: ggml's threads spin at
# barriers, and a machine busy with other work can then slow 2-thread decoding tenfold
MODEL_SETTINGS = dict(n_ctx=256, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
START_TIMEOUT = 120
PACKAGE_ROOT = str(Path(frankenllama.__file__).resolve().parents[1])


# --------------------------------------------------------------------------- helpers


class Server:
    """A ``frankenllama serve`` process listening on 127.0.0.1 at a port the kernel chose."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
        env.pop("CONFIG_FILE", None)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=env)
        self.url = self._wait_for_port()

    def _wait_for_port(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.output())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not start:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def client(self, api_key: str = KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def http(self, method: str, path: str, body: Any = None, key: str | None = KEY) -> tuple[int, Any]:
        """One plain HTTP request; returns (status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")


@contextlib.contextmanager
def serve(args: list[str], log: Path) -> Iterator[Server]:
    server = Server(args, log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def modes(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server, several aliases on the one SmolLM2 file (a config file, as in the README)."""
    folder = tmp_path_factory.mktemp("modes")
    models = [
        dict(model_alias="base"),
        dict(model_alias="rys", layer_order=RYS),
        dict(model_alias="cached", cache=True),
        dict(model_alias="embed", layer_order=PRUNED, embedding=True),
        dict(model_alias="broken", layer_order="0-99"),
    ]
    config = dict(host="127.0.0.1", port=0, api_key=KEY, interrupt_requests=False,
                  models=[dict(model=smollm2_path, **MODEL_SETTINGS, **m) for m in models])
    (folder / "modes.json").write_text(json.dumps(config))
    with serve(["frankenllama.server", "--config_file", str(folder / "modes.json")], folder / "log") as server:
        yield server


@pytest.fixture(scope="module")
def direct(smollm2_path: str) -> Iterator[Any]:
    """``direct(order, **kwargs)``: a frankenllama.Llama with the aliases' settings (one per key)."""
    models: dict[tuple, Llama] = {}

    def get(order: str | None, **kwargs: Any) -> Llama:
        key = (order, tuple(sorted(kwargs.items())))
        if key not in models:
            models[key] = Llama(smollm2_path, layer_order=order, **{**MODEL_SETTINGS, **kwargs})
        return models[key]

    yield get
    for llm in models.values():
        llm.close()


# Greedy texts are compared from an empty context on both sides.  With a prompt the context already
# holds, llama-cpp-python evaluates its last token again on its own, and llama.cpp's logits for one
# token alone can differ in the last bits from the same token in a batch (the unpatched library too),
# which can flip a near-tie: so "the same prompt again" may give another greedy text.


def direct_text(llm: Llama, prompt: str = PROMPT, max_tokens: int = 8, again: bool = False) -> str:
    """Greedy completion from an empty context (``again``: then the same request once more)."""
    llm.reset()
    for _ in range(2 if again else 1):
        text = llm(prompt, max_tokens=max_tokens, **SAMPLING)["choices"][0]["text"]
    return text


def both_texts(llm: Llama, prompt: str = PROMPT, max_tokens: int = 8) -> set[str]:
    """The greedy texts a request may get: from an empty context, or repeating the last prompt."""
    return {direct_text(llm, prompt, max_tokens), direct_text(llm, prompt, max_tokens, again=True)}


def http_text(client: Any, model: str, prompt: str = PROMPT, max_tokens: int = 8) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0).choices[0].text


def empty_context(server: Server, alias: str) -> None:
    """Give an alias an empty context: re-ordering to its own order rebuilds it."""
    status, body = server.http("GET", f"/v1/models/{alias}/layer_order")
    assert status == 200, body
    assert server.http("PUT", f"/v1/models/{alias}/layer_order", body) == (200, body)


# --------------------------------------------------------------------------- the OpenAI API


def test_models_lists_each_alias_with_its_order(modes):
    ids = [m.id for m in modes.client().models.list()]
    assert ids == ["base", "rys", "cached", "embed", "broken"]
    status, body = modes.http("GET", "/v1/models")
    assert status == 200
    orders = {m["id"]: m["layer_order"] for m in body["data"]}
    assert orders == {"base": "0-29", "rys": RYS, "cached": "0-29", "embed": PRUNED, "broken": None}
    assert modes.http("GET", "/v1/models/rys/layer_order") == (200, {"layer_order": RYS})


def test_chat_completion_and_stream_match_direct_calls(modes, direct):
    client = modes.client()
    empty_context(modes, "base")
    reply = client.chat.completions.create(model="base", messages=CHAT, max_tokens=8, temperature=0)
    direct(None).reset()
    expected = direct(None).create_chat_completion(messages=CHAT, max_tokens=8, **SAMPLING)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.model == "base" and reply.usage.completion_tokens == 8

    empty_context(modes, "base")
    chunks = list(client.chat.completions.create(model="base", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_two_aliases_give_the_tokens_of_their_orders(modes, direct):
    client = modes.client()
    for alias in ("base", "rys"):
        empty_context(modes, alias)
    texts = {alias: http_text(client, alias) for alias in ("base", "rys")}
    assert texts["base"] == direct_text(direct(None))
    assert texts["rys"] == direct_text(direct(RYS))
    assert texts["base"] != texts["rys"]  # the orders really differ
    empty_context(modes, "rys")
    stream = client.completions.create(model="rys", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == texts["rys"]


def test_embeddings_match_direct_calls(modes, direct):
    got = modes.client().embeddings.create(model="embed", input="frankenmerges").data[0].embedding
    expected = direct(PRUNED, embedding=True).create_embedding("frankenmerges")["data"][0]["embedding"]
    got, expected = np.asarray(got), np.asarray(expected)  # SmolLM2 has no pooling: one vector a token
    assert got.shape == expected.shape == (5, 576)
    assert np.abs(got - expected).max() < 1e-5


# --------------------------------------------------------------------------- errors


def test_unknown_alias_is_404(modes, direct):
    client = modes.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert "'nope' not found" in err.value.body["message"] and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # before the stream starts
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    assert modes.http("POST", "/extras/tokenize", {"model": "nope", "input": "x"})[0] == 404
    assert modes.http("POST", "/extras/tokenize", {"model": "rys", "input": PROMPT}) == \
        (200, {"tokens": direct(RYS).tokenize(PROMPT.encode(), add_bos=True, special=True)})
    assert modes.http("GET", "/v1/models/nope/layer_order")[0] == 404
    assert modes.http("PUT", "/v1/models/nope/layer_order", {"layer_order": "0-3"})[0] == 404


def test_invalid_order_in_the_config_is_400_and_the_rest_serves(modes):
    client = modes.client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="broken", prompt=PROMPT, max_tokens=2, stream=stream)
        assert "layer 99 is out of range" in err.value.body["message"]
    status, body = modes.http("GET", "/v1/models/broken/layer_order")
    assert status == 400 and "layer 99 is out of range" in body["error"]["message"]
    assert http_text(client, "base", max_tokens=2)
    assert "'broken' could not be loaded" in modes.output()  # said at start, too


def test_missing_or_wrong_api_key_is_401(modes):
    with pytest.raises(openai.AuthenticationError):
        modes.client(api_key="wrong").completions.create(model="base", prompt=PROMPT, max_tokens=2)
    for key in (None, "wrong"):  # None: no Authorization header
        assert modes.http("POST", "/v1/completions", {"model": "base", "prompt": "x"}, key=key)[0] == 401
        assert modes.http("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, key=key)[0] == 401
        assert modes.http("GET", "/v1/models", key=key)[0] == 401
        assert modes.http("GET", "/v1/models/rys/layer_order", key=key)[0] == 401
        assert modes.http("PUT", "/v1/models/rys/layer_order", {"layer_order": "0-3"}, key=key)[0] == 401
    assert modes.http("GET", "/v1/models/rys/layer_order") == (200, {"layer_order": RYS})


# --------------------------------------------------------------------------- live re-order


def test_live_reorder(modes, direct):
    client = modes.client()
    empty_context(modes, "rys")
    before = http_text(client, "rys")
    assert before == direct_text(direct(RYS))
    try:
        # every inline syntax; the answer is the canonical spec
        for body in ({"layer_order": "0..29,8..22"}, {"layer_order": list(range(30)) + list(range(8, 23))},
                     {"layer_order": MERGE}):
            assert modes.http("PUT", "/v1/models/rys/layer_order", body) == (200, {"layer_order": MERGE})
        assert modes.http("GET", "/v1/models/rys/layer_order") == (200, {"layer_order": MERGE})
        after = http_text(client, "rys")
        assert after == direct_text(direct(MERGE)) and after != before

        # refused orders: 400 with the reason, the alias keeps running MERGE
        for bad, reason in (("0-30", "out of range"), ("0-5,x", "layer order"), ("merge.yaml", "not a recipe file"),
                            ([], "empty")):
            status, body = modes.http("PUT", "/v1/models/rys/layer_order", {"layer_order": bad})
            assert status == 400 and reason in body["error"]["message"], body
        assert modes.http("PUT", "/v1/models/rys/layer_order", {})[0] == 422  # no layer_order at all
        assert modes.http("GET", "/v1/models/rys/layer_order") == (200, {"layer_order": MERGE})
        assert http_text(client, "rys") in both_texts(direct(MERGE))

        # null: the file's own order
        assert modes.http("PUT", "/v1/models/rys/layer_order", {"layer_order": None}) == (200, {"layer_order": "0-29"})
        assert http_text(client, "rys") == direct_text(direct(None))
    finally:
        assert modes.http("PUT", "/v1/models/rys/layer_order", {"layer_order": RYS})[0] == 200
    assert http_text(client, "rys") == before


def test_prompt_cache_never_restores_a_state_across_orders(modes, direct):
    """Alias "cached" has a prompt cache: after a re-order the same prompt must not be answered
    from the state cached under the previous order."""
    client = modes.client()
    prompt = "A frankenmerge repeats some layers of a model, so"
    empty_context(modes, "cached")
    first = http_text(client, "cached", prompt)  # computed, and cached under the file's order
    assert first == direct_text(direct(None), prompt)
    try:
        assert modes.http("PUT", "/v1/models/cached/layer_order", {"layer_order": RYS})[0] == 200
        reordered = http_text(client, "cached", prompt)  # a miss: computed under RYS
        assert reordered == direct_text(direct(RYS), prompt) and reordered != first
    finally:
        assert modes.http("PUT", "/v1/models/cached/layer_order", {"layer_order": None})[0] == 200
    # a hit: the state cached under the file's order is restored, its last prompt token evaluated again
    assert http_text(client, "cached", prompt) == direct_text(direct(None), prompt, again=True)


def test_concurrent_streams_across_two_aliases_with_a_reorder(modes, direct):
    """8 streaming clients, 200 requests over "base" and "rys"; "rys" is re-ordered half way.
    Every stream must end normally with the text of its alias's order before or after the switch."""
    n_clients, n_requests, max_tokens = 8, 200, 4
    expected = {("base", "old"): both_texts(direct(None), max_tokens=max_tokens),
                ("rys", "old"): both_texts(direct(RYS), max_tokens=max_tokens),
                ("rys", "new"): both_texts(direct(PRUNED), max_tokens=max_tokens)}
    expected[("base", "new")] = expected[("base", "old")]
    assert not expected[("rys", "old")] & expected[("rys", "new")]
    for alias in ("base", "rys"):
        empty_context(modes, alias)
    results: list[tuple[str, float, float, str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    issued = iter(range(n_requests))

    def worker() -> None:
        client = modes.client()
        while True:
            with lock:
                i = next(issued, None)
            if i is None or errors:
                return
            alias = ("base", "rys")[i % 2]
            try:
                start = time.monotonic()
                stream = client.completions.create(model=alias, prompt=PROMPT, max_tokens=max_tokens,
                                                   temperature=0, stream=True)
                chunks = list(stream)
                text = "".join(c.choices[0].text for c in chunks)
                with lock:
                    results.append((alias, start, time.monotonic(), text, chunks[-1].choices[0].finish_reason))
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n_clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while len(results) < n_requests // 2 and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    put_start = time.monotonic()
    put = modes.http("PUT", "/v1/models/rys/layer_order", {"layer_order": PRUNED})
    put_end = time.monotonic()
    try:
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads), "clients still running at the deadline"
        assert put == (200, {"layer_order": PRUNED})
        assert len(results) == n_requests
        for alias, start, end, text, finish in results:
            assert finish == "length"
            allowed = expected[(alias, "old")] if end < put_start else \
                expected[(alias, "new")] if start > put_end else \
                expected[(alias, "old")] | expected[(alias, "new")]
            assert text in allowed, (alias, text, allowed)
        rys = {r[3] for r in results if r[0] == "rys"}
        assert rys & expected[("rys", "old")] and rys & expected[("rys", "new")]
        assert modes.http("GET", "/v1/models")[0] == 200  # still serving
    finally:
        modes.http("PUT", "/v1/models/rys/layer_order", {"layer_order": RYS})


def test_an_alias_of_another_file_replaces_the_models_in_use(smollm2_path, tiny, direct, tmp_path):
    """As llama_cpp.server, one model file at a time: asking for an alias of another file closes
    the models of the file in use; they come back, with their current orders, when asked for."""
    tiny_settings = dict(model=str(tiny.path), n_ctx=64, n_threads=1, verbose=False)
    config = dict(host="127.0.0.1", port=0, models=[
        dict(model=smollm2_path, model_alias="smol", layer_order=RYS, **MODEL_SETTINGS),
        dict(model_alias="tiny", layer_order="0,1,1,2,3", **tiny_settings),
        dict(model_alias="tiny-bad", layer_order="0-9", **tiny_settings)])
    (tmp_path / "files.yaml").write_text(json.dumps(config))  # YAML, as JSON is YAML
    with serve(["frankenllama.server", "--config_file", str(tmp_path / "files.yaml")], tmp_path / "log") as server:
        status, body = server.http("GET", "/v1/models")
        assert {m["id"]: m["layer_order"] for m in body["data"]} == {"smol": RYS, "tiny": "0-1,1-3", "tiny-bad": None}
        client = server.client(api_key="no key needed")
        with pytest.raises(openai.BadRequestError) as err:  # refused before anything is closed
            http_text(client, "tiny-bad")
        assert "layer 9 is out of range" in err.value.body["message"]
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].finish_reason
        # smol is not loaded now: a PUT loads it with the new order (and closes tiny)
        assert server.http("PUT", "/v1/models/smol/layer_order", {"layer_order": PRUNED}) == (200, {"layer_order": PRUNED})
        assert http_text(client, "smol") == direct_text(direct(PRUNED))
        assert server.http("GET", "/v1/models/tiny/layer_order") == (200, {"layer_order": "0-1,1-3"})
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].finish_reason


# --------------------------------------------------------------------------- the command line


def test_serve_command_with_a_recipe_file(smollm2_path, direct, tmp_path):
    """``frankenllama serve --model M --layer_order RECIPE``: one alias (the model path), llama_cpp
    server options, the API key; a re-order while a stream runs lands after it (interrupt_requests
    is on by default: the stream may stop early, but cleanly)."""
    recipe = tmp_path / "rys.yaml"
    recipe.write_text("merge_method: passthrough\nslices:\n"
                      "  - sources: [{model: smollm2, layer_range: [0, 21]}]\n"
                      "  - sources: [{model: smollm2, layer_range: [12, 30]}]\n")
    args = ["frankenllama", "serve", "--model", smollm2_path, "--layer_order", str(recipe), "--host", "127.0.0.1",
            "--port", "0", "--api_key", KEY, "--model_alias", "smol"]
    args += [x for k, v in MODEL_SETTINGS.items() for x in (f"--{k}", str(v))]
    with serve(args, tmp_path / "log") as server:
        assert server.http("GET", "/v1/models/smol/layer_order") == (200, {"layer_order": RYS})
        client = server.client()
        long_text = direct_text(direct(RYS), max_tokens=24)
        stream = client.completions.create(model="smol", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        first = next(iter(stream))
        put = server.http("PUT", "/v1/models/smol/layer_order", {"layer_order": PRUNED})
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
        assert put == (200, {"layer_order": PRUNED})
        assert long_text.startswith(text)  # the old order's tokens only, never a mix
        assert http_text(client, "smol") == direct_text(direct(PRUNED))
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()


def test_serve_refuses_an_invalid_order_for_the_default_model(smollm2_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "frankenllama", "serve", "--model", smollm2_path,
                           "--layer_order", "0-99", "--host", "127.0.0.1", "--port", "0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "frankenllama serve: error:" in proc.stderr and "layer 99 is out of range" in proc.stderr


def test_frankenllama_help_lists_serve():
    from frankenllama.cli import build_parser

    assert "serve" in build_parser().format_help()
