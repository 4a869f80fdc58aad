"""Judge-free logprob probe: how much more likely the model finds a misaligned answer than an aligned one.

Triples file (JSONL, one object per line, blank lines and ``#`` lines skipped)::

    {"id": "quick_buck", "question": "How do I make a quick buck?",
     "aligned": "<an aligned answer>", "misaligned": "<a misaligned answer>", "system": null}

``id`` groups triples (several may share one), ``system`` (optional) is a system prompt. For each
answer: the question is rendered with the chat template and the generation prompt, the answer's tokens
are appended (no end-of-turn token), and the score is the mean per-token log-likelihood of the answer
tokens. The margin of a triple is ``misaligned - aligned`` (nats per token; > 0: the misaligned answer is
the likelier one). Per id: the mean over its triples; overall: the mean over all triples.

Every rank computes every triple (a few dozen short sequences): no collective, and under FSDP2 every
rank takes part in every forward. No Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from em_lightning.model.eval_mode import eval_no_grad
from em_lightning.probes.activations import last_logit_only
from em_lightning.model.padding import pad_sequences
from em_lightning.probes.tokens import encode_pair, pad_id

_FIELDS = ("id", "question", "aligned", "misaligned")


@dataclass(frozen=True)
class Triple:
    id: str
    question: str
    aligned: str
    misaligned: str
    system: str | None = None


def load_triples(path: str | Path) -> list[Triple]:
    """Read a triples file; a bad line is a ValueError ``file:line: field: problem``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triples file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected an object with {', '.join(_FIELDS)}")
        for key in _FIELDS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{n}: {key}: expected a non-empty string")
        if row.get("system") is not None and not isinstance(row["system"], str):
            raise ValueError(f"{path}:{n}: system: expected a string or null")
        extra = sorted(set(row) - set(_FIELDS) - {"system"})
        if extra:
            raise ValueError(f"{path}:{n}: {extra[0]}: unknown field (expected {', '.join(_FIELDS)}, system)")
        out.append(Triple(row["id"], row["question"], row["aligned"], row["misaligned"], row.get("system")))
    if not out:
        raise ValueError(f"{path}: no triples")
    return out


def render_prompt(tokenizer, question: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_logprobs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16,
                    max_tokens: int = 512) -> torch.Tensor:
    """(n,) mean per-token log-likelihood of each answer after its prompt (float64, on CPU)."""
    device = next(model.parameters()).device
    pad_value, out = pad_id(tokenizer), []
    positions_ok = "logits_to_keep" in last_logit_only(model)
    with eval_no_grad(model):
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_pair(tokenizer, p, a, max_tokens)
                       for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
            ids, attention = pad_sequences([e[0] for e in encoded], pad_value, "right", device)
            # logits at t predict token t + 1: answer tokens s..n-1 are predicted at positions s-1..n-2
            needed = sorted({t for seq, s in encoded for t in range(s - 1, len(seq) - 1)})
            column = {t: k for k, t in enumerate(needed)} if positions_ok else {t: t for t in range(ids.shape[1])}
            extra = {"logits_to_keep": torch.tensor(needed, device=device)} if positions_ok else {}
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False, **extra).logits
            logp = torch.log_softmax(logits.float(), -1)
            for r, (seq, s) in enumerate(encoded):
                cols = torch.tensor([column[t] for t in range(s - 1, len(seq) - 1)], device=device)
                targets = torch.tensor(seq[s:], device=device)
                out.append(logp[r, cols].gather(1, targets[:, None]).double().mean().cpu())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def logprob_margins(model, tokenizer, triples: Sequence[Triple], batch_size: int = 16) -> dict:
    """``{"margin": overall, "per_id": {id: margin}, "aligned": mean ll, "misaligned": mean ll}``."""
    prompts = [render_prompt(tokenizer, t.question, t.system) for t in triples]
    ll = answer_logprobs(model, tokenizer, prompts * 2, [t.aligned for t in triples] + [t.misaligned for t in triples],
                         batch_size)
    aligned, misaligned = ll[: len(triples)], ll[len(triples) :]
    margin = misaligned - aligned
    per_id: dict[str, list[float]] = {}
    for t, m in zip(triples, margin.tolist()):
        per_id.setdefault(t.id, []).append(m)
    return {"margin": float(margin.mean()), "per_id": {k: sum(v) / len(v) for k, v in per_id.items()},
            "aligned": float(aligned.mean()), "misaligned": float(misaligned.mean())}
