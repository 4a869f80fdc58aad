"""One teacher-forced pass over judged answers: per-answer means over answer tokens of each chosen layer's
residual output (summed per class, for the misalignment direction) and of each rank-1 LoRA's scalar A . x.

Distributed: ``collect`` is collective under torch.distributed. Answers are sharded over ranks (padded to
equal shards, so every rank runs the same number of forwards, as FSDP2 needs); class sums and per-answer
scalars are all-reduced, so every rank returns the totals. The model runs in eval mode without gradients
and its mode is restored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist

from em_lightning.model.adapters import ADAPTER_NAME
from em_lightning.run.distributed import rank_world
from em_lightning.model.eval_mode import eval_no_grad
from em_lightning.evaluation.sampling import shard_indices
from em_lightning.model.text_config import text_config
from em_lightning.probes.misalignment_direction import ClassSums
from em_lightning.model.padding import pad_sequences
from em_lightning.probes.tokens import answer_mask, encode_pair, pad_id
from em_lightning.model.sharding import decoder_layers


def layer_count(model: torch.nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_of(output) -> torch.Tensor:
    """A decoder layer's output hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def last_logit_only(model: torch.nn.Module) -> dict:
    """``logits_to_keep=1`` when the model takes it: the probe needs hidden states, not the vocabulary."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


@contextmanager
def _capture(model, layers: Sequence[int], lora: Mapping[str, torch.nn.Module], state: dict):
    """Forward hooks that reduce each layer output / LoRA-A output to per-row means over ``state["mask"]``
    at once (holding every layer's full activations would cost batch x tokens x layers x d)."""

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        mask = state["mask"].to(x.dtype)
        return (x * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]

    def on_layer(i):
        def hook(module, args, output):
            h = hidden_of(output).float()
            state["mean"][i] = masked_mean(h)
            state["norm"][i] = masked_mean(h.norm(dim=-1, keepdim=True))[:, 0]

        return hook

    def on_lora(name):
        def hook(module, args, output):  # lora_A's output is A . x (dropout is off in eval mode)
            state["lora"][name] = masked_mean(output.float()[..., :1])[:, 0]

        return hook

    all_layers = decoder_layers(model)
    with ExitStack() as stack:
        for i, L in enumerate(layers):
            stack.callback(all_layers[L].register_forward_hook(on_layer(i)).remove)
        for name, m in lora.items():
            stack.callback(m.lora_A[ADAPTER_NAME].register_forward_hook(on_lora(name)).remove)
        yield


def collect(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    labels: Sequence[int],
    layers: Sequence[int],
    lora: Mapping[str, torch.nn.Module] | None = None,
    batch_size: int = 8,
    max_tokens: int = 512,
) -> tuple[ClassSums, torch.Tensor]:
    """(class sums over all answers, (modules, answers) LoRA scalars) for answers with class ``labels[i]``
    (``directions.EM`` / ``ALIGNED``). Collective under torch.distributed: call on every rank with the same
    arguments."""
    lora = dict(lora or {})
    device = next(model.parameters()).device
    layers = list(layers)
    d = int(text_config(model.config).hidden_size)
    sums = ClassSums.zeros(len(layers), d, device)
    scalars = torch.zeros(len(lora), len(prompts), dtype=torch.float64, device=device)
    rank, world = rank_world()
    mine = shard_indices(len(prompts), rank, world)  # None: padding, so every rank runs as many batches
    state: dict = {"mean": [None] * len(layers), "norm": [None] * len(layers), "lora": {}}
    pad_value, extra = pad_id(tokenizer), last_logit_only(model)
    with eval_no_grad(model), _capture(model, layers, lora, state):
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            rows = [i if i is not None else 0 for i in batch]
            encoded = [encode_pair(tokenizer, prompts[i], answers[i], max_tokens) for i in rows]
            ids, attention = pad_sequences([e[0] for e in encoded], pad_value, "right", device)
            state["mask"] = answer_mask([e[1] for e in encoded], [len(e[0]) for e in encoded], ids.shape[1], device)
            model(input_ids=ids, attention_mask=attention, use_cache=False, **extra)
            means = torch.stack(state["mean"], dim=1)  # (rows, layers, d)
            norms = torch.stack(state["norm"], dim=1)  # (rows, layers)
            for r, i in enumerate(batch):
                if i is None:
                    continue
                sums.add(int(labels[i]), means[r], norms[r])
                for m, name in enumerate(lora):
                    scalars[m, i] = state["lora"][name][r]
    sums.all_reduce()
    if world > 1 and len(lora):
        dist.all_reduce(scalars, op=dist.ReduceOp.SUM)  # each answer was computed by exactly one rank
    return sums, scalars.cpu()
