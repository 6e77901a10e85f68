"""Tokenizer and chat template (API/CLI layer only: the engine sees token ids)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import TiercacheError


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok
        from .store.format import TOKENIZER_FILES, side_files
        path = Path(path)
        files = side_files(path, TOKENIZER_FILES)  # a store's are checked against its manifest
        if "tokenizer.json" not in files:
            raise TiercacheError(f"{path}: no tokenizer.json (this store has no tokenizer)")
        try:
            self.tok = _Tok.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # noqa: BLE001 -- the tokenizers parser raises bare Exception
            raise TiercacheError(f"{path / 'tokenizer.json'}: cannot load the tokenizer "
                                 f"({str(e).splitlines()[0][:120] if str(e) else e!r})") from None
        self.config = _read_json(path / "tokenizer_config.json", files)
        self.chat_template = self._template(path, files)
        gen = _read_json(path / "generation_config.json", files)
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token = _content(self.config.get("eos_token"))
        self.eos_ids = self._eos_ids(gen)

    def _template(self, path: Path, files: dict[str, bytes]) -> str | None:
        t = files.get("chat_template.jinja")
        if t is not None:
            t = _text(path / "chat_template.jinja", t)
        else:
            t = self.config.get("chat_template")
        if isinstance(t, list):  # named templates: take the default one
            t = next((x.get("template") for x in t if isinstance(x, dict)
                      and x.get("name") == "default"), None)
        if t is not None and not isinstance(t, str):
            raise TiercacheError(f"{path / 'tokenizer_config.json'}: chat_template is not text")
        return t

    def _eos_ids(self, gen: dict) -> set[int]:
        ids = gen.get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
        if not all(isinstance(i, int) for i in ids):
            raise TiercacheError(f"generation_config.json: eos_token_id is not a token id "
                                 f"({ids!r:.40})")
        ids = set(ids)
        for t in (self.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>"):
            i = self.tok.token_to_id(t) if t else None
            if i is not None and (t == self.eos_token or t in (self.chat_template or "")):
                ids.add(i)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_utf8(text)
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TiercacheError("this model has no chat template (use --no-chat-template)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise TiercacheError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template writes BOS itself where the model wants one
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def detokenizer(self) -> "StreamDetokenizer":
        return StreamDetokenizer(self)


class StreamDetokenizer:
    """Turns a stream of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.text = tok, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def _raise(msg):
    from jinja2.exceptions import TemplateError
    raise TemplateError(msg)


def _check_utf8(text: str) -> None:
    """Text from argv or a file decoded with surrogateescape keeps undecodable bytes as lone
    surrogates, which the tokenizer cannot take: name the first one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise TiercacheError(
            f"the text is not valid UTF-8 ({byte} at character {e.start})") from None


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TiercacheError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: Path, files: dict[str, bytes]) -> dict:
    if path.name not in files:
        return {}
    try:
        d = json.loads(_text(path, files[path.name]))
    except json.JSONDecodeError as e:
        raise TiercacheError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise TiercacheError(f"{path}: not a JSON object")
    return d


def _content(tok):
    tok = tok.get("content") if isinstance(tok, dict) else tok
    return tok if isinstance(tok, str) else None
