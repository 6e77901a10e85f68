"""`tiercache chat` as a user drives it: slash commands, Ctrl-C, one-shot mode; each through a
subprocess with piped stdin, on a tiny model, its answers checked against the engine's."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

FLAGS = ["--temp", "0", "--context", "2048", "--threads", "1"]


def chat_cmd(store, *args) -> list[str]:
    return [sys.executable, "-m", "tiercache", "chat", str(store), *FLAGS, *args]


@pytest.fixture(scope="module")
def store(stores):
    return stores("llama")


@pytest.fixture(scope="module")
def loaded(store):
    from tiercache import api
    return api.load(str(store), threads=1, context=2048)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "TIERCACHE_HOME": str(tmp_path / "home")}


def reference(loaded, messages, max_tokens) -> str:
    from tiercache import api
    return api.generate(*loaded, messages, max_tokens=max_tokens)


def user(text):
    return {"role": "user", "content": text}


def test_slash_commands_and_multiline_input(store, loaded, env, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([
        "/help", "/nonsense", "/stats", "/system be brief", "abc", "/stats",
        '"""', "line one", "line two", '"""', "x\\", "y",
        f"/save {saved}", "/reset", "/save", f"/load {tmp_path / 'missing.json'}",
        f"/load {tmp_path}", f"/save {tmp_path / 'no' / 'dir.json'}",
        f"/load {saved}", "/exit", "never sent"]) + "\n"
    r = subprocess.run(chat_cmd(store, "-i", "-n", "6"), input=script, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    for said in ("/system TEXT", "unknown command /nonsense", "no answer yet",
                 "system prompt set", "saved 7 messages", "conversation cleared",
                 "/save needs a file name", "missing.json: no such saved conversation",
                 f"{tmp_path}: cannot read", "dir.json: cannot write",
                 "loaded 7 messages"):
        assert said in err
    assert "Traceback" not in err
    assert len(re.findall(r"\[6 tokens, decode [\d.]+ tok/s, prefill", err)) == 3 + 1  # + /stats
    msgs = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3
    assert msgs[0]["content"] == "be brief"
    assert [m["content"] for m in msgs[1::2]] == ["abc", "line one\nline two", "x\ny"]
    for i in (1, 3, 5):  # each answer is the engine's for the conversation so far (KV reuse)
        assert msgs[i + 1]["content"] == reference(loaded, msgs[:i + 1], 6)
    assert "never sent" not in r.stdout


class Reader:
    """Collects a pipe's text on a thread, so a test can wait for what it expects."""

    def __init__(self, pipe):
        self.text, self.pipe = "", pipe
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for chunk in iter(lambda: self.pipe.read(1), ""):
            self.text += chunk

    def wait(self, cond, what, limit=300.0):
        """A deadline against a hang, not a speed assertion."""
        end = time.monotonic() + limit
        while not cond(self.text):
            assert time.monotonic() < end, f"gave up waiting for {what}: {self.text[-500:]!r}"
            time.sleep(0.02)


def test_ctrl_c_stops_the_answer_keeps_the_session_and_twice_exits(store, loaded, env,
                                                                   tmp_path):
    saved = tmp_path / "after.json"
    p = subprocess.Popen(chat_cmd(store, "-i", "-n", "1900"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = Reader(p.stdout), Reader(p.stderr)

    def send(line):
        p.stdin.write(line + "\n")
        p.stdin.flush()
    try:
        err.wait(lambda t: "/help for commands" in t, "the banner")
        send("Tell me a story")
        out.wait(lambda t: len(t) >= 3, "the answer to start")
        p.send_signal(signal.SIGINT)
        err.wait(lambda t: "stopped]" in t, "the answer to stop")
        n = int(re.search(r"\[(\d+) tokens, .*stopped\]", err.text).group(1))
        assert n < 1900
        send("abc")
        err.wait(lambda t: t.count("tokens,") == 2, "the second answer")
        send(f"/save {saved}")
        err.wait(lambda t: "saved 4 messages" in t, "the save")
        p.send_signal(signal.SIGINT)
        err.wait(lambda t: "Ctrl-C again" in t, "the first Ctrl-C at the prompt")
        p.send_signal(signal.SIGINT)
        assert p.wait(120) == 0
    finally:
        if p.poll() is None:
            p.kill()
    msgs = json.loads(saved.read_text())["messages"]
    assert msgs[0] == user("Tell me a story") and msgs[1]["content"]
    assert msgs[3]["content"] == reference(loaded, msgs[:3], 1900)
    assert "Traceback" not in err.text


def test_one_shot_from_arguments_and_stdin(store, loaded, env):
    want = reference(loaded, [user("Tell me a story")], 8)
    r = subprocess.run(chat_cmd(store, "-n", "8", "Tell", "me", "a", "story"), env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and "[8 tokens" in r.stderr
    r = subprocess.run(chat_cmd(store, "-n", "8", "--quiet"), input="Tell me a story\n", env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and r.stderr == ""
    r = subprocess.run(chat_cmd(store, "-q"), input="  \n", env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == "error: empty prompt on stdin"


def test_version_list_rm_and_help_on_every_option(store, tmp_path, monkeypatch):
    import shutil
    import typer
    from typer.testing import CliRunner
    import tiercache
    from tiercache.cli import app
    from tiercache.errors import TiercacheError
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))
    run = CliRunner().invoke
    assert run(app, ["--version"]).output.strip() == f"tiercache {tiercache.__version__}"
    shutil.copytree(store, tmp_path / "stores" / "mine-f32")
    listed = [json.loads(line) for line in run(app, ["list", "--json"]).output.splitlines()]
    mine = next(e for e in listed if e["name"] == "mine-f32")
    assert mine["kind"] == "store" and mine["dtype"] == "f32" and mine["bytes"] > 0
    assert {"smollm2-135m-instruct"} <= {e["name"] for e in listed if e["kind"] == "known"}
    assert "mine-f32" in run(app, ["list"]).output
    assert isinstance(run(app, ["rm", "nothing-here"]).exception, TiercacheError)
    assert run(app, ["rm", "mine-f32"]).exit_code == 0
    assert not (tmp_path / "stores" / "mine-f32").exists()
    bare = []

    def walk(cmd, path):
        bare.extend(f"{' '.join(path)} {p.name}" for p in cmd.params if not p.help)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [name])
    walk(typer.main.get_command(app), ["tiercache"])
    assert bare == []


def test_generate_json_names_the_all_clusters_mode(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from tiercache.cli import app
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))
    r = CliRunner().invoke(app, ["generate", str(store), "-p", "abc", "-n", "2", "--threads", "1",
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[-1])["mode"] == "all-clusters"


def test_a_turn_past_the_context_is_refused_and_the_chat_goes_on(loaded):
    import io
    from tiercache.chat import Chat, Settings
    from tiercache.errors import TiercacheError
    chat = Chat(*loaded, Settings(max_tokens=4, temp=0))
    with pytest.raises(TiercacheError, match="/reset starts over"):
        chat.ask("x" * 2100, out=io.StringIO())
    assert chat.messages == []
    assert chat.ask("abc", out=io.StringIO()) == reference(loaded, [user("abc")], 4)


def test_a_full_context_drops_the_oldest_exchanges(store):
    """--context bounds the conversation: the oldest turns go (and the chat says so), the
    system prompt stays, and the answer is still given."""
    import io
    from tiercache import api
    from tiercache.chat import Chat, Settings
    engine, tok = api.load(str(store), threads=1, context=96)
    chat = Chat(engine, tok, Settings(max_tokens=8, temp=0.0), system="sys")
    note = io.StringIO()
    for i in range(6):
        chat.ask(f"question number {i} " * 2, out=io.StringIO(), note=note)
    assert "the oldest exchange was dropped" in note.getvalue()
    assert chat.messages[0] == {"role": "system", "content": "sys"}
    assert chat.messages[1]["content"].startswith("question number") and \
        "question number 0" not in chat.messages[1]["content"]
    assert chat.messages[-2]["content"].startswith("question number 5")
