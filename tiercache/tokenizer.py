"""Tokenizer and chat template (API/CLI layer only: the engine sees token ids)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import TiercacheError


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TiercacheError(f"{path}: no tokenizer.json (this store has no tokenizer)")
        self.tok = _Tok.from_file(str(path / "tokenizer.json"))
        self.config = _read_json(path / "tokenizer_config.json")
        self.chat_template = self._template(path)
        gen = _read_json(path / "generation_config.json")
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token = _content(self.config.get("eos_token"))
        self.eos_ids = self._eos_ids(gen)

    def _template(self, path: Path) -> str | None:
        f = path / "chat_template.jinja"
        t = f.read_text() if f.is_file() else self.config.get("chat_template")
        if isinstance(t, list):  # named templates: take the default one
            t = next((x["template"] for x in t if x.get("name") == "default"), None)
        return t

    def _eos_ids(self, gen: dict) -> set[int]:
        ids = gen.get("eos_token_id")
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        for t in (self.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>"):
            i = self.tok.token_to_id(t) if t else None
            if i is not None and (t == self.eos_token or t in (self.chat_template or "")):
                ids.add(i)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
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


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def _content(tok):
    return tok.get("content") if isinstance(tok, dict) else tok
