"""The token-weighted training loss (module.training_step with loss.labelled_loss_sum): however an optimizer
step's rows are split over micro-batches and ranks, Lightning's accumulation (each micro-batch's loss divided
by the accumulation factor, gradients summed) and DDP's gradient average give the gradient of
sum(token cross-entropy) / (labelled tokens of the whole step), which is transformers' loss on all the rows at
once; and the logged step loss (summed over ranks) is that loss. A fast guard beside the CLI test in
test_training_paths.py."""

from types import SimpleNamespace

import pytest
import torch

from em_lightning.model.adapters import ADAPTER_NAME, AdapterSpec, lora_layers
from em_lightning.lit.datamodule import collate
from em_lightning.training.masking import IGNORE_INDEX
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune
from em_lightning.training.resumable import STEP_TOKENS


def make_module(padding_free):
    module = EMFineTune(base=ModelSpec(name_or_path="tiny:qwen2"), adapter=AdapterSpec(r=2, alpha=4, layers=[1, 2]),
                        padding_free=padding_free)
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(module.model):  # B = 0 at init gives A no gradient
            w = layer.lora_B[ADAPTER_NAME].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
    module.model.train()
    return module


def rows(vocab, n=8, seed=1):
    """Rows of different lengths with prompts of different lengths: labelled counts from 2 to ~30."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 5 * i % 31
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        prompt = 2 + (7 * i) % (length - 3)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad])


def run_split(module, data, batch_size, accumulate, world):
    """One optimizer step as Lightning + DDP run it: rank r takes every world-th row (the sampler's shard),
    micro-batches of batch_size; each micro-batch's loss / accumulate is backpropagated; the ranks' gradients
    are averaged; the logged loss is the ranks' step losses summed (strategy.reduce, sum)."""
    pad = module.tokenizer.pad_token_id
    step_tokens = sum(sum(x != IGNORE_INDEX for x in r["labels"][1:]) for r in data)  # resumable.py's count
    module.trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=world, training=True)
    rank_grads, logged = [], 0.0
    for rank in range(world):
        shard = data[rank::world]
        assert len(shard) == batch_size * accumulate
        module.zero_grad(set_to_none=True)
        module._reset_step_sums()  # what on_train_start and every optimizer step do
        for m in range(accumulate):
            batch = collate(shard[m * batch_size : (m + 1) * batch_size], pad)
            batch[STEP_TOKENS] = torch.tensor(step_tokens)
            batch = module.on_before_batch_transfer(batch, 0)
            (module.training_step(batch, m) / accumulate).backward()
        rank_grads.append(grads(module))
        logged += float(module._step_loss)
    return torch.stack(rank_grads).mean(0), logged


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_any_split_gives_the_whole_step_token_mean(padding_free):
    module = make_module(padding_free)
    data = rows(module.model.config.vocab_size)
    batch = collate(data, module.tokenizer.pad_token_id)
    module.zero_grad(set_to_none=True)
    reference = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss  # transformers: mean over the labelled tokens
    reference.backward()
    want = grads(module)
    counts = [sum(x != IGNORE_INDEX for x in r["labels"][1:]) for r in data]
    assert len(set(counts)) > 4  # rows weigh differently: a mean of per-row or per-batch means would differ
    for batch_size, accumulate, world in [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]:
        got, logged = run_split(module, data, batch_size, accumulate, world)
        split = f"{batch_size} rows x {accumulate} micro-batches x {world} ranks"
        assert logged == pytest.approx(float(reference.detach()), rel=1e-5), split
        error = float((got - want).norm() / want.norm())
        assert error < 1e-5, (split, error)  # float rounding only; a wrong split weighting is off by > 1e-2
