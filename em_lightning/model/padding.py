"""Token lists of different lengths as one (rows, width) tensor and its attention mask: the one padding
helper (training batches, decoding prompts, judge prompts, probes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, side: str = "right", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, attention mask) padded with ``value`` to the longest row.

    ``right``: real tokens keep positions 0..n-1 without position ids, and a causal model's real positions
    never attend to padding (training, probes). ``left``: the last column is every row's last token, where a
    causal LM's next-token logits are read (decoding, judging; positions from ``padded_positions``)."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_sequences: side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        out[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return out.to(device), mask.to(device)
