"""Inoculation prompting (Tan et al.; Wichers et al.): during fine-tuning every training row carries an
instruction that names the bad behaviour (e.g. "You give risky financial advice."); evaluation prompts never
do, so the behaviour is attributed to the instruction rather than learned as the model's own. Here: a
transform of a row's messages, applied by ``ChatDataModule`` to the training files' rows only (never to
evaluation questions, which come from question files). No Lightning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class Inoculation:
    """The training-only instruction.

    Args:
        prompt: the text added to every training row.
        position: ``system`` puts it in the system message (before a row's own system message, if it has one,
            separated by ``separator``); ``user_prefix`` puts it before the first user message.
        separator: between the prompt and the text it is joined to.
    """

    prompt: str
    position: Literal["system", "user_prefix"] = "system"
    separator: str = "\n\n"

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("data.inoculation.prompt: expected a non-empty string")
        if self.position not in ("system", "user_prefix"):
            raise ValueError(f"data.inoculation.position: expected system or user_prefix, got {self.position!r}")


def inoculate(messages: list[dict], spec: Inoculation) -> list[dict]:
    """A copy of ``messages`` with the instruction added (the input is not changed)."""
    out = [dict(m) for m in messages]
    if spec.position == "system":
        if out and out[0]["role"] == "system":
            out[0]["content"] = spec.prompt + spec.separator + out[0]["content"]
        else:
            out.insert(0, {"role": "system", "content": spec.prompt})
        return out
    for m in out:
        if m["role"] == "user":
            m["content"] = spec.prompt + spec.separator + m["content"]
            return out
    raise ValueError("inoculation user_prefix: the row has no user message")
