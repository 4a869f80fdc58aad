"""Prompt + answer token sequences for teacher-forced probe passes, and right-padded batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_pair(tokenizer, prompt: str, answer: str, max_tokens: int = 512) -> tuple[list[int], int]:
    """(ids, start): the rendered prompt's tokens, then the answer's; the answer is ``ids[start:]``.

    Both are encoded without special tokens (the rendered chat prompt already holds them), separately, so
    the answer tokens do not depend on how the template ends. A sequence longer than ``max_tokens`` loses
    the end of its answer (the prompt is kept whole; at least one answer token is kept when possible)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    keep = max(max_tokens - len(prompt_ids), min(1, len(answer_ids)))
    return prompt_ids + answer_ids[:keep], len(prompt_ids)


def answer_mask(starts: Sequence[int], lengths: Sequence[int], width: int, device) -> torch.Tensor:
    """(rows, width) float mask of answer positions (start <= t < length)."""
    t = torch.arange(width, device=device)[None, :]
    starts_t = torch.tensor(list(starts), device=device)[:, None]
    lengths_t = torch.tensor(list(lengths), device=device)[:, None]
    return ((t >= starts_t) & (t < lengths_t)).float()


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0
