"""Tokenise a conversation with the tokenizer's chat template and label only the assistant tokens.

Real hub templates have no ``{% generation %}`` markers, so the assistant spans are found by rendering:
for assistant turn i, the text of ``messages[:i]`` with the generation prompt ends where the answer starts,
and the text of ``messages[:i+1]`` (trailing whitespace removed) ends right after its end-of-turn token.
Both must be prefixes of the full conversation (true for Qwen, Llama-3 and Gemma-3 templates; checked).
A token carries a label when its first character lies inside an assistant span.
"""

from __future__ import annotations

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from em_lightning.model.padding import pad_sequences

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The chat template refused or mis-rendered a conversation (the caller adds the row's file:line)."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool, kwargs: dict) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
    except TemplateError as e:  # e.g. Gemma's raise_exception('Conversation roles must alternate ...')
        raise ChatTemplateError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template_kwargs: dict | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn."""
    kwargs = template_kwargs or {}
    full = _render(tokenizer, messages, False, kwargs)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, kwargs) if i else ""
        through = _render(tokenizer, messages[: i + 1], False, kwargs).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(before) < len(through)):
            raise ChatTemplateError(
                "not prefix-stable (rendering a conversation's first turns is not a prefix "
                "of rendering all of it); assistant-only labels cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template_kwargs: dict | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE_INDEX everywhere but assistant content + end-of-turn."""
    text, spans = assistant_char_spans(tokenizer, messages, template_kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[j] = ids[j]
    return ids, labels


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch (dynamic padding)."""
    ids, mask = pad_sequences([b["input_ids"] for b in batch], pad_id)
    labels, _ = pad_sequences([b["labels"] for b in batch], IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
