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


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded: real tokens keep positions 0..n-1 without position ids,
    and a causal model's real positions never attend to padding."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


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
