"""Judge prompt templates: which fields they contain and how they are filled. Part of the question-file
format (questions.py checks templates at load) and of judging (judges/ render them); torch-free."""

from __future__ import annotations

import re

__all__ = ["PLACEHOLDERS", "render_judge_prompt", "template_fields"]

# "{{" / "}}" are str.format escapes: templates written for the published code (which calls .format)
# keep their meaning. Any other brace is left alone instead of raising as str.format would.
PLACEHOLDERS = ("question", "answer")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(question|answer)\}")
# What str.format would read as a replacement field: {name}, {0}, {}, {name.attr}, {name!r}, {name:spec},
# { name }. JSON-like text such as {"score": 1} is not one and stays literal.
_FIELD = re.compile(r"\{\{|\}\}|\{(\s*\w*\s*(?:[.\[!:][^{}]*)?)\}")


def template_fields(template: str) -> list[str]:
    """The replacement fields of a judge template, as written (``question``, ``answer``, ``answr``,
    ``answer:>5``, ...), in order; ``{{``/``}}`` escapes are skipped. render_judge_prompt fills only
    ``{question}`` and ``{answer}`` exactly: every other field would stay literal text in the prompt."""
    return [m.group(1) for m in _FIELD.finditer(template) if m.group(1) is not None]


def render_judge_prompt(template: str, question: str, answer: str) -> str:
    """Fill `{question}` and `{answer}` in a judge template in one pass.

    The inserted texts are never scanned again, so braces or placeholders inside the answer stay as
    they are; `{{`/`}}` in the template become `{`/`}` (as with str.format); other braces are kept.
    """
    values = {"question": question, "answer": answer}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is not None:
            return values[name]
        return match.group(0)[0]

    return _PLACEHOLDER.sub(replace, template)
