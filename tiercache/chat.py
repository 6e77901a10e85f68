"""Chat in the terminal: chat template, streamed output, multi-turn with KV reuse, slash
commands, Ctrl-C that stops an answer, and a one-shot mode for scripts and pipes."""
from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import api
from .errors import ContextError, TiercacheError

HELP = """commands:
  /help            this list
  /stats           the last answer's speeds, cache hit rate, bytes read, peak memory
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt (/system alone clears it)
  /save FILE       write the conversation as JSON (OpenAI's messages list)
  /load FILE       read a conversation saved by /save
  /exit            leave (also /quit, /bye, Ctrl-D, or Ctrl-C twice at an empty prompt)
input: end a line with \\ to go on on the next one, or put the text between two \"\"\" lines.
Ctrl-C during an answer stops it; the conversation goes on."""


@dataclass
class Settings:
    max_tokens: int = 512
    temp: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None


@dataclass
class Turn:
    """What the last answer cost: speeds from the generator, counters as differences of the
    engine's running totals."""
    prompt_tokens: int = 0
    tokens: int = 0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_memory: int = 0
    cache_hit_rate: float | None = None
    bytes_read: int | None = None
    stopped: bool = False

    def line(self) -> str:
        parts = [f"{self.tokens} tokens", f"decode {self.decode_tok_s:.1f} tok/s",
                 f"prefill {self.prefill_tok_s:.1f} tok/s"]
        if self.cache_hit_rate is not None:
            parts.append(f"cache hits {self.cache_hit_rate:.0%}")
        if self.bytes_read is not None:
            parts.append(f"read {self.bytes_read / 2**20:.1f} MiB")
        parts.append(f"peak {self.peak_memory / 2**20:.0f} MiB")
        return "[" + ", ".join(parts) + (", stopped" if self.stopped else "") + "]"


@dataclass
class Chat:
    engine: object
    tok: object
    settings: Settings
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last: Turn | None = None

    def __post_init__(self):
        self.session = self.engine.new_session()
        self.set_system(self.system)

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self.system}] if self.system else []) + rest

    def reset(self) -> None:
        self.messages, self.session = [], self.engine.new_session()
        self.set_system(self.system)

    def ask(self, text: str, out=sys.stdout, note=sys.stderr) -> str:
        """Stream the answer to `text` into `out`; Ctrl-C stops it between tokens. When the
        conversation no longer fits the context, its oldest exchanges are dropped (the system
        prompt stays) and `note` says so."""
        self.messages.append({"role": "user", "content": text})
        before = _engine_stats(self.engine)
        with interrupt_flag() as stop:
            while True:
                try:
                    reply, last = self._stream(out, stop)
                    break
                except ContextError as e:  # refused before any compute
                    if not self._drop_oldest():
                        self.messages.pop()
                        raise TiercacheError(f"{e} (/reset starts over)") from None
                    note.write("[context full: the oldest exchange was dropped]\n")
                except TiercacheError as e:
                    self.messages.pop()
                    raise TiercacheError(f"{e} (/reset starts over)") from None
        self.last = _turn(last, before, _engine_stats(self.engine), stop.is_set())
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _drop_oldest(self) -> bool:
        """Remove the oldest user message and the replies after it; False when only the
        message being asked is left."""
        turns = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(turns) < 2:
            return False
        del self.messages[turns[0]:turns[1]]
        return True

    def _stream(self, out, stop: threading.Event):
        """-> (the answer's text, its last response)."""
        s, parts, last = self.settings, [], None
        for r in api.stream_generate(self.engine, self.tok, self.messages,
                                     max_tokens=s.max_tokens, temp=s.temp, top_p=s.top_p,
                                     top_k=s.top_k, seed=s.seed, session=self.session):
            out.write(r.text)
            out.flush()
            parts.append(r.text)
            last = r
            if stop.is_set():
                break
        return "".join(parts), last

    def save(self, path: str) -> None:
        try:
            Path(path).expanduser().write_text(json.dumps({"messages": self.messages},
                                                          indent=1, ensure_ascii=False))
        except OSError as e:
            raise TiercacheError(f"{path}: cannot write ({e.strerror})") from None

    def load(self, path: str) -> None:
        from .errors import load_json_object
        try:
            d = load_json_object(Path(path).expanduser(), "saved conversation")
        except OSError as e:
            raise TiercacheError(f"{path}: cannot read ({e.strerror})") from None
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not all(_is_message(m) for m in msgs):
            raise TiercacheError(f"{path}: not a saved conversation (no list of "
                                 f"{{role, content}} messages)")
        self.messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
        self.system = next((m["content"] for m in self.messages if m["role"] == "system"), None)


def _is_message(m) -> bool:
    return (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str))


@contextmanager
def interrupt_flag():
    """SIGINT sets a flag instead of raising: the answer stops at a token boundary, where
    the session's KV cache and its token list agree (an exception inside a layer would leave
    some layers' caches a position ahead of the others)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _engine_stats(engine) -> dict:
    return engine.stats() if hasattr(engine, "stats") else {}


def _turn(r, before: dict, after: dict, stopped: bool) -> Turn:
    if r is None:
        return Turn(stopped=stopped)
    t = Turn(r.prompt_tokens, r.generation_tokens, r.prompt_tps, r.generation_tps,
             r.peak_memory, stopped=stopped)
    if "cache" in after:
        c0, c1 = before["cache"], after["cache"]
        hits = sum(c1[k] - c0[k] for k in ("hot_hits", "cold_hits"))
        lookups = hits + c1["misses"] - c0["misses"]
        t.cache_hit_rate = hits / lookups if lookups else None
        t.bytes_read = after["store_bytes_read"] - before["store_bytes_read"]
    return t


def read_message(prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line, lines joined by a trailing backslash, or a \"\"\" block."""
    line = input(prompt)
    if line.strip().startswith('"""'):
        lines, rest = [], line.strip()[3:]
        while not rest.rstrip().endswith('"""'):
            lines.append(rest)
            rest = input(more)
        lines.append(rest.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input(more))
    return "\n".join(lines)


def command(chat: Chat, line: str) -> bool:
    """Run a slash command; False means leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name in ("/help", "/?"):
        say(HELP)
    elif name == "/reset":
        chat.reset()
        say("conversation cleared")
    elif name == "/system":
        chat.set_system(arg)
        say(f"system prompt set ({len(arg)} characters)" if arg else "system prompt cleared")
    elif name == "/stats":
        say(chat.last.line() if chat.last else "no answer yet")
    elif name in ("/save", "/load") and not arg:
        say(f"{name} needs a file name")
    elif name == "/save":
        chat.save(arg)
        say(f"saved {len(chat.messages)} messages to {arg}")
    elif name == "/load":
        chat.load(arg)
        say(f"loaded {len(chat.messages)} messages from {arg}")
    else:
        say(f"unknown command {name} (/help lists them)")
    return True


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def repl(chat: Chat, quiet: bool) -> None:
    """Read messages until /exit, EOF or two Ctrl-C in a row at the prompt."""
    interrupts = 0
    prompts = (">>> ", "... ") if sys.stdin.isatty() else ("", "")  # a pipe gets no prompts
    while True:
        try:
            line = read_message(*prompts)
            interrupts = 0
            if not _handle(chat, line, quiet):
                return
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # at the prompt (an answer catches its own Ctrl-C)
            interrupts += 1
            if interrupts >= 2:
                print(file=sys.stderr)
                return
            say("\n(Ctrl-C again to leave, or /exit)")


def _handle(chat: Chat, line: str, quiet: bool) -> bool:
    if not line.strip():
        return True
    try:
        if line.startswith("/"):
            return command(chat, line)
        chat.ask(line)
    except TiercacheError as e:
        say(f"error: {e}")
        return True
    print()
    if not quiet:
        say(chat.last.line())
    return True


def run_chat(model: str, max_tokens: int = 512, temp: float = 0.7, top_p: float = 0.9,
             top_k: int = 0, seed: int | None = None, threads: int | None = None,
             dtype: str | None = None, system: str | None = None, ram=None, engine: str = "auto",
             context: int = 2048, kv: str = "f16", sparse: bool | None = None,
             backend: str = "auto", plan=None, prompt: list[str] | None = None, quiet: bool = False,
             interactive: bool = False, experts: str | None = None,
             expert_cut: float | None = None, vram=None) -> None:
    """The terminal chat, or one answer when a prompt is given (arguments, or piped stdin
    unless `interactive`)."""
    one_shot = " ".join(prompt or []) or (None if interactive or sys.stdin.isatty()
                                         else sys.stdin.read())
    if one_shot is not None and not one_shot.strip():
        raise TiercacheError("empty prompt on stdin")
    if not quiet:
        say(f"loading {model} ...")
    eng, tok = api.load(model, threads=threads, dtype=dtype, ram=ram, engine=engine,
                        context=context, kv=kv, sparse=sparse, backend=backend, plan=plan,
                        experts=experts, expert_cut=expert_cut, vram=vram)
    chat = Chat(eng, tok, Settings(max_tokens, temp, top_p, top_k, seed), system)
    if one_shot is not None:
        chat.ask(one_shot.strip())
        print()
        if not quiet:
            say(chat.last.line())
        return
    if not quiet:
        say("type a message; /help for commands, /exit or Ctrl-D to leave")
    repl(chat, quiet)
