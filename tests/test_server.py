"""`tiercache serve` through the official openai client, on a tiny model, on 127.0.0.1 only."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx  # the server's stack and these clients come with the `test` extra
import openai
import pytest

CONTEXT = 2048
MODEL = "tiny"
PROMPTS = ["Tell me a story", "abc", "Hello there", "hi", "question 4", "question 5",
           "Why is the sky blue?", "What is 2+2?"]


def wait_for(cond, what: str, limit: float = 120.0) -> None:
    """Wait for a condition (a deadline against a hang, not a speed assertion)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn
    from tiercache.server import bind
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def loaded(stores):
    from tiercache import api
    return api.load(str(stores("llama")), threads=1, context=CONTEXT)


def make_app(loaded, **kw):
    from tiercache.server.app import create_app
    from tiercache.server.worker import Worker
    engine, tok = loaded
    worker = Worker(engine, tok, max_queue=kw.pop("max_queue", 16), start=kw.pop("start", True))
    return worker, create_app(worker, MODEL, CONTEXT, **kw)


@pytest.fixture(scope="module")
def server(loaded):
    worker, app = make_app(loaded)
    with running(app) as url:
        yield url, worker
    worker.close()


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(c, prompt: str, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                     **kw)


def reference(loaded, prompt, max_tokens=12) -> str:
    """What the engine says without the server (a fresh session, greedy)."""
    from tiercache import api
    engine, tok = loaded
    return api.generate(engine, tok, [{"role": "user", "content": prompt}],
                        max_tokens=max_tokens)


def test_completion_stream_usage_and_models(server, loaded):
    url, _ = server
    c = client(url)
    r = chat(c, "Tell me a story")
    text = r.choices[0].message.content
    assert text and text == reference(loaded, "Tell me a story")
    assert r.choices[0].finish_reason == "length"
    ids = loaded[1].encode_chat([{"role": "user", "content": "Tell me a story"}])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(ids), 12, len(ids) + 12)
    chunks = list(chat(c, "Tell me a story", stream=True, stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(ids)
    assert [m.id for m in c.models.list()] == [MODEL]


def test_stop_strings_and_raw_completions(server, loaded):
    c = client(server[0])
    full = reference(loaded, "Tell me a story", 24)
    assert "4" in full and not full.startswith("4")
    r = chat(c, "Tell me a story", max_tokens=24, stop=["4", "zz"])
    assert r.choices[0].message.content == full[:full.index("4")]
    assert r.choices[0].finish_reason == "stop"
    streamed = chat(c, "Tell me a story", max_tokens=24, stop="4", stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == full[:full.index("4")]
    from tiercache import api
    raw = api.generate(*loaded, "hello there", max_tokens=10, chat_template=False)
    t = c.completions.create(model=MODEL, prompt="hello there", max_tokens=10, temperature=0)
    assert t.choices[0].text == raw and t.usage.completion_tokens == 10


def test_conversation_prefix_is_reused(server, loaded):
    c, tok = client(server[0]), loaded[1]
    first = [{"role": "user", "content": "abc"}]
    a1 = c.chat.completions.create(model=MODEL, messages=first, max_tokens=8, temperature=0)
    turn2 = first + [{"role": "assistant", "content": a1.choices[0].message.content},
                     {"role": "user", "content": "and then?"}]
    a2 = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0)
    assert a2.usage.prompt_tokens_details.cached_tokens >= len(tok.encode_chat(first))
    chat(c, "something else entirely")  # the one kept session now holds another prompt
    again = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens < len(tok.encode_chat(first))
    assert again.choices[0].message.content == a2.choices[0].message.content


def test_eight_clients_at_once(server, loaded):
    want = {p: reference(loaded, p) for p in PROMPTS}
    c = client(server[0])

    def ask(i):
        p = PROMPTS[i]
        if i % 2:
            return p, "".join(ch.choices[0].delta.content or "" for ch in chat(c, p, stream=True))
        return p, chat(c, p).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(ask, range(8)))
    assert got == want


def test_disconnect_mid_stream_cancels_and_others_finish(server, loaded):
    url, worker = server
    before = dict(worker.counters)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": CONTEXT - 40, "temperature": 0, "stream": True}
    with ThreadPoolExecutor(3) as pool:
        with httpx.Client(timeout=120) as h, h.stream("POST", url + "/v1/chat/completions",
                                                     json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            wait_for(lambda: worker.counters["requests"] > before["requests"], "the request")
            others = [pool.submit(lambda p=p: chat(client(url), p).choices[0].message.content)
                      for p in PROMPTS[:2]]
            wait_for(lambda: worker.queue_depth() == 2, "the others to queue")
        # the stream is closed here, long before its CONTEXT - 40 tokens could be made
        assert [f.result() for f in others] == [reference(loaded, p) for p in PROMPTS[:2]]
    after = worker.counters
    assert (after["cancelled"], after["completed"]) == \
        (before["cancelled"] + 1, before["completed"] + 2), (before, after)


def test_full_queue_gets_429_with_retry_after(loaded):
    worker, app = make_app(loaded, max_queue=1, start=False)  # nothing runs until start()
    with running(app) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "abc"}],
                "max_tokens": 4, "temperature": 0}
        # a queued client that leaves gives up its place and is never run
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        wait_for(lambda: worker.queue_depth() == 0, "the server to see it leave")
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=120)
            wait_for(lambda: worker.queue_depth() == 1, "the first request to queue")
            try:
                with pytest.raises(openai.RateLimitError) as e:
                    chat(client(url), "abc")
            finally:
                worker.start()
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["code"] == "queue_full"
            assert first.result().json()["choices"][0]["message"]["content"] == \
                reference(loaded, "abc", 4)
        assert worker.counters["cancelled"] == 1 and worker.counters["rejected"] == 1
        assert worker.counters["completed"] == 1
    worker.close()


def _post(url, data: bytes | str, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(url + "/v1/chat/completions", content=data, headers=h, timeout=60)


BAD = {
    "malformed JSON": ('{"messages": [', 400, "invalid_json"),
    "missing messages": ('{"model": "tiny", "max_tokens": 4}', 400, "invalid_value"),
    "wrong type": ('{"messages": "hi"}', 400, "invalid_value"),
    "negative max_tokens": ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}',
                            400, "invalid_value"),
    "prompt past the context": (json.dumps({"messages": [{"role": "user",
                                                          "content": "x" * (CONTEXT + 10)}]}),
                                400, "context_length_exceeded"),
    "unknown model": ('{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}',
                      404, "model_not_found"),
    "unknown role": ('{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "invalid_value"),
}


@pytest.mark.parametrize("case", sorted(BAD) + ["token id past the vocabulary"])
def test_bad_input_gets_openai_error_and_server_lives(server, loaded, case):
    url, _ = server
    if case in BAD:
        data, status, code = BAD[case]
        r = _post(url, data)
    else:
        status, code = 400, "invalid_value"
        r = httpx.post(url + "/v1/completions", json={"prompt": [5, 10**6]}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] and "Traceback" not in r.text
    assert chat(client(url), "abc", max_tokens=3).choices[0].message.content == \
        reference(loaded, "abc", 3)


def test_api_key_and_body_limit(loaded):
    worker, app = make_app(loaded, api_key="s3cret", max_body=4096)
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError):
            chat(client(url, "wrong"), "abc")
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # for load balancers, no key
        r = _post(url, json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}),
                  {"authorization": "Bearer s3cret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = httpx.post(url + "/v1/chat/completions", content=iter([b"{" + b" " * 3000] * 3),
                             headers={"authorization": "Bearer s3cret"})  # no Content-Length
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert chat(client(url, "s3cret"), "abc", max_tokens=3).choices[0].message.content == \
            reference(loaded, "abc", 3)
    worker.close()


def test_health_stats_metrics(server):
    url, _ = server
    chat(client(url), "abc", max_tokens=2)
    assert httpx.get(url + "/health").json()["status"] == "ok"
    s = httpx.get(url + "/stats").json()
    assert s["requests"]["completed"] >= 1 and s["peak_memory_bytes"] > 0
    assert {"cache_hit_rate", "store_bytes_per_token"} <= set(s["last_request"]["engine"])
    m = httpx.get(url + "/metrics").text
    assert "tiercache_last_request_engine_cache_hit_rate " in m
    r = httpx.get(url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"]


def test_serve_command_on_a_free_port(stores, tmp_path):
    """The CLI end to end: ready line with the port, a request, Ctrl-C; web stack imported
    only by serve."""
    env = {**os.environ, "TIERCACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "tiercache", "serve", str(stores("llama")), "--port", "0",
           "--context", "256", "--threads", "1"]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = p.stderr.readline()
            assert line, "serve exited before it was ready"
        url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/health").json()["status"] == "ok"
        r = client(url).chat.completions.create(
            model="llama-f32-32", messages=[{"role": "user", "content": "abc"}], max_tokens=3,
            temperature=0)
        assert r.choices[0].finish_reason == "length"
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
    lazy = subprocess.run([sys.executable, "-c", "import sys, tiercache.cli, tiercache.api; "
                           "print(sorted({'starlette', 'uvicorn', 'sse_starlette'} & "
                           "set(sys.modules)))"], env=env, capture_output=True, text=True)
    assert lazy.stdout.strip() == "[]", lazy.stderr


def test_session_pool_keeps_conversations_apart():
    from tiercache.server.worker import SessionPool

    class Fake:
        def new_session(self):
            return type("S", (), {"tokens": []})()
    pool = SessionPool(Fake(), 2)
    a, n = pool.take([1, 2, 3])
    a.tokens[:] = [1, 2, 3, 9]  # what a session holds after answering: prompt + answer
    b, n = pool.take([1, 5, 6])  # another conversation while there is room: its own session
    assert b is not a and n == 0
    b.tokens[:] = [1, 5, 6, 7]
    assert pool.take([1, 2, 3, 9, 4, 4]) == (a, 4)  # a extended: a's cache, 4 positions reused
    assert pool.take([1, 5, 6, 7, 8]) == (b, 4)
    c, n = pool.take([1, 8])  # full: the longest shared prefix, least recently used among equals
    assert c is a and n == 1 and len(pool.sessions) == 2


def test_messages_the_template_refuses_get_422(loaded, stores, tmp_path):
    """A chat template that raises (here: on a 'tool' message) is the client's problem, 422."""
    import shutil
    from tiercache.tokenizer import Tokenizer
    from tiercache.server.app import create_app
    from tiercache.server.worker import Worker
    src = stores("llama")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                            "{{ raise_exception('no tools here') }}{% endif %}{% endfor %}"
                            + cfg["chat_template"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    worker = Worker(loaded[0], Tokenizer(tmp_path))
    with running(create_app(worker, MODEL, CONTEXT)) as url:
        r = _post(url, json.dumps({"messages": [{"role": "tool", "content": "x"}]}))
        assert r.status_code == 422 and "no tools here" in r.json()["error"]["message"]
        assert chat(client(url), "abc", max_tokens=3).choices[0].message.content == \
            reference(loaded, "abc", 3)
    worker.close()


def test_the_lean_runtime_serves_what_it_generates(tmp_path):
    """`tiercache serve` on a q4 store runs the lean runtime (no torch in its process): the
    server's answer is the text the engine gives alone, and a second turn reuses the prefix."""
    from conftest import save_random
    from test_lean import _config
    from tiercache import api, lean
    from tiercache.store.convert import convert
    from tiercache.store.format import Store
    save_random(_config("tied"), tmp_path / "m", seed=3)
    store = convert(tmp_path / "m", tmp_path / "q4", dtype="q4", cluster_size=64, progress=False)
    if lean.why_not(Store(store)) is not None:
        pytest.skip(f"the lean runtime does not run here: {lean.why_not(Store(store))}")
    loaded = api.load(str(store), threads=1, context=CONTEXT)
    assert isinstance(loaded[0], lean.LeanEngine)
    worker, app = make_app(loaded)
    try:
        with running(app) as url:
            c = client(url)
            got = chat(c, "hello").choices[0].message.content
            again = chat(c, "hello").choices[0].message.content
    finally:
        worker.close()
    assert got == again == reference(loaded, "hello")
