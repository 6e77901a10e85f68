"""Request bodies of the OpenAI endpoints tiercache serves (unknown fields are ignored, as
OpenAI-compatible servers do, so that clients sending newer fields still work)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def as_template_message(self) -> dict:
        """{"role", "content": str}: text parts joined; `developer` is OpenAI's new `system`."""
        c = self.content
        text = "".join(p.text for p in c) if isinstance(c, list) else (c or "")
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not OpenAI's; llama-server and vLLM take it too
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[dict] = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampled):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (batches are not served)")
        if isinstance(v, list) and not v:
            raise ValueError("empty prompt")
        return v
