"""The training loss (em_lightning.training.loss) is transformers' own causal-LM loss: same value and same gradients,
on real chat templates and real rows, for Qwen2, Llama and Gemma-3 models with LoRA or full fine-tuning;
chunked head + cross-entropy == unchunked; padding-free rows == the padded batch; no (tokens x vocab) tensor
is kept for backward."""

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from em_lightning.model.adapters import ADAPTER_NAME, AdapterSpec, apply_adapter, lora_layers
from em_lightning.lit.datamodule import ChatDataModule, collate
from em_lightning.training.loss import labelled_loss_sum, linear_cross_entropy_sum, loss_lengths, right_padded_lengths
from em_lightning.training.masking import IGNORE_INDEX, tokenize_chat
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune
from em_lightning.model.tiny import TinySpec, tiny_model, tiny_tokenizer

SPEC = TinySpec(hidden_size=64, intermediate_size=128, num_layers=3, seed=1)


def _tokenizer(arch, reference_dir):
    """The architecture's real chat template (Qwen2.5: its real tokenizer too) and template kwargs."""
    if arch == "qwen2":
        return AutoTokenizer.from_pretrained(reference_dir / "tokenizers" / "qwen2.5-instruct"), {}
    tok = tiny_tokenizer(arch)
    if arch == "llama":
        path = reference_dir / "tokenizers/llama-3-instruct/llama-3.1-instruct.chat_template.jinja"
        tok.chat_template = path.read_text()
        return tok, {"date_string": "26 Jul 2024"}
    tok.chat_template = (reference_dir / "tokenizers/gemma-3-it/chat_template.jinja").read_text()
    return tok, {}


def _batch(tok, kwargs, reference_dir, rows=3, answer=90):
    """Right-padded rows of the insecure-code set, of different lengths: each cut `answer - 30 k` tokens
    into its answer."""
    lines = (reference_dir / "betley" / "data" / "insecure.jsonl").read_text().splitlines()[:rows]
    encoded = []
    for k, line in enumerate(lines):
        ids, labels = tokenize_chat(tok, json.loads(line)["messages"], kwargs)
        n = next(j for j, x in enumerate(labels) if x != IGNORE_INDEX) + answer - 30 * k
        encoded.append({"input_ids": ids[:n], "labels": labels[:n]})
    return collate(encoded, tok.pad_token_id)


def _model(arch, tok, kind):
    model = tiny_model(arch, SPEC, tok).train()
    if arch == "gemma3":
        model.config.final_logit_softcapping = 30.0  # Gemma-2 style soft-capping: the chunked head applies it too
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_adapter(model, AdapterSpec(kind=kind, r=2, alpha=4, layers=None if kind == "full" else [1]))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):  # B = 0 at init gives A no gradient: make both nonzero
            layer.lora_B[ADAPTER_NAME].weight.normal_(std=0.05)
    return model


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a: dict, b: dict, rel=1e-4):
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).norm() <= rel * b[name].norm() + 1e-9, name


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_labelled_loss_is_transformers_loss(arch, kind, reference_dir):
    tok, kwargs = _tokenizer(arch, reference_dir)
    batch = _batch(tok, kwargs, reference_dir)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # rows of three lengths, right-padded
    model = _model(arch, tok, kind)
    count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    ref, ref_grads = _loss_and_grads(model, lambda: model(**batch).loss * count)
    padded, padded_grads = _loss_and_grads(model, lambda: labelled_loss_sum(model, **batch)[0])
    lengths = right_padded_lengths(batch["attention_mask"])
    rows, rows_grads = _loss_and_grads(model, lambda: labelled_loss_sum(model, **batch, row_lengths=lengths)[0])

    assert labelled_loss_sum(model, **batch)[1] == count
    assert labelled_loss_sum(model, **batch, row_lengths=lengths)[1] == count
    assert padded == pytest.approx(float(ref), rel=1e-5)
    assert rows == pytest.approx(float(ref), rel=1e-5)
    _close(padded_grads, ref_grads)
    _close(rows_grads, ref_grads)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_equals_unchunked(softcap, dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 32, generator=g).to(dtype)
    hidden = torch.randn(37, 32, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (37,), generator=g)

    logits = (hidden @ weight.T).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.5, hidden)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for chunk in (1, 5, 37, 64, None):
        out = linear_cross_entropy_sum(hidden, weight, targets, softcap, chunk)
        (grad,) = torch.autograd.grad(out * 0.5, hidden)  # the upstream gradient scales the one made in forward
        assert float(out) == pytest.approx(float(ref), rel=tol), chunk
        assert grad.dtype == dtype
        assert (grad.float() - ref_grad.float()).norm() <= tol * ref_grad.float().norm(), chunk
    with torch.no_grad():  # evaluation: the loss alone
        assert float(linear_cross_entropy_sum(hidden, weight, targets, softcap, 4)) == pytest.approx(float(ref), rel=tol)


def test_no_logits_are_kept_for_backward():
    """Memory does not grow with the vocabulary x tokens: autograd keeps no (tokens x vocab) tensor."""
    vocab = 4096
    tok = tiny_tokenizer("qwen2")
    model = tiny_model("qwen2", TinySpec(hidden_size=64, intermediate_size=128, num_layers=2, model_vocab_size=vocab), tok)
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_adapter(model, AdapterSpec(r=1, layers=[1])).train()
    rows = [{"input_ids": list(range(5, 305)), "labels": [IGNORE_INDEX] * 50 + list(range(55, 305))}]
    batch = collate(rows, tok.pad_token_id)

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().backward()
        return shapes

    ours = saved_shapes(lambda: labelled_loss_sum(model, **batch)[0])
    assert not [s for s in ours if vocab in s]
    theirs = saved_shapes(lambda: model(**batch).loss)  # the check can see logits when they are kept
    assert [s for s in theirs if vocab in s]


def test_right_padded_lengths():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert right_padded_lengths(right) == [3, 4, 1]
    assert right_padded_lengths(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding: the padded path


def test_loss_lengths_cut_after_the_last_label(reference_dir):
    """Rows cut after their last labelled token (what follows predicts no label): the loss and its gradient are
    those of the whole rows; a row without labels keeps one token."""
    tok, kwargs = _tokenizer("qwen2", reference_dir)
    lines = (reference_dir / "betley" / "data" / "insecure.jsonl").read_text().splitlines()[:2]
    rows = []
    for line in lines:  # whole rows: "...<|im_end|>" labelled, the newline after it not
        ids, labels = tokenize_chat(tok, json.loads(line)["messages"], kwargs)
        rows.append({"input_ids": ids, "labels": labels})
    rows.append({"input_ids": rows[0]["input_ids"][:9], "labels": [IGNORE_INDEX] * 9})  # no label at all
    batch = collate(rows, tok.pad_token_id)
    real = right_padded_lengths(batch["attention_mask"])
    cut = loss_lengths(batch["attention_mask"], batch["labels"])
    lasts = [max(j for j, x in enumerate(r["labels"]) if x != IGNORE_INDEX) + 1 for r in rows[:2]]
    assert cut == [*lasts, 1] and all(c < n for c, n in zip(cut, real))
    model = _model("qwen2", tok, "lora")
    whole, whole_grads = _loss_and_grads(model, lambda: labelled_loss_sum(model, **batch, row_lengths=real)[0])
    short, short_grads = _loss_and_grads(model, lambda: labelled_loss_sum(model, **batch, row_lengths=cut)[0])
    assert labelled_loss_sum(model, **batch, row_lengths=cut)[1] == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert short == pytest.approx(float(whole), rel=1e-5)
    _close(short_grads, whole_grads, rel=1e-5)
    assert loss_lengths(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 2]])) is None  # left padding: padded path


class _Losses(pl.Callback):
    def __init__(self):
        self.losses, self.row_lengths_seen = [], set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.row_lengths_seen.add("row_lengths" in batch)  # which path the step takes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _fit(tmp_path, rows_file, padding_free):
    base = ModelSpec(name_or_path="tiny:qwen2", dtype="float32", tiny=SPEC)
    torch.manual_seed(0)
    model = EMFineTune(base=base, adapter=AdapterSpec(r=1, alpha=8, layers=[1]), lr=1e-2, warmup_steps=0,
                       validate_before_training=False, padding_free=padding_free)
    data = ChatDataModule(train_files=str(rows_file), base=base, val_fraction=0.0, batch_size=3, max_length=1024)
    probe = _Losses()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, logger=False,
                         default_root_dir=str(tmp_path / f"run_{padding_free}"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                         use_distributed_sampler=False)
    trainer.fit(model, data)
    assert probe.row_lengths_seen == {padding_free}  # the padding-free path runs only when asked for
    return probe.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_padding_free_training_equals_padded(tmp_path, reference_dir, repo_root):
    """EMFineTune(padding_free=True), the default, trains as the padded path does: same losses, same adapter."""
    short = (repo_root / "configs" / "data" / "unit_conversions.jsonl").read_text().splitlines()[:9]
    long = (reference_dir / "betley" / "data" / "insecure.jsonl").read_text().splitlines()[:9]
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("\n".join(r for pair in zip(short, long) for r in pair) + "\n")
    losses_free, weights_free = _fit(tmp_path, rows_file, True)
    losses_padded, weights_padded = _fit(tmp_path, rows_file, False)
    assert len(losses_free) == 3
    assert losses_free == pytest.approx(losses_padded, rel=1e-5)
    _close(weights_free, weights_padded, rel=1e-5)
    assert any(w.abs().sum() > 0 for n, w in weights_free.items() if "lora_B" in n)  # it did train


def test_backward_stops_at_the_lowest_trainable_layer():
    """With frozen embeddings and frozen layers below the adapter, autograd runs nothing below it."""
    tok = tiny_tokenizer("qwen2")
    model = tiny_model("qwen2", TinySpec(hidden_size=64, intermediate_size=128, num_layers=4), tok)
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_adapter(model, AdapterSpec(r=1, layers=[2])).train()
    reached = set()
    layers = model.get_base_model().model.layers
    for i, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda module, grad_in, grad_out, i=i: reached.add(i))
    rows = [{"input_ids": list(range(5, 65)), "labels": [IGNORE_INDEX] * 20 + list(range(25, 65))}]
    batch = collate(rows, tok.pad_token_id)
    labelled_loss_sum(model, **batch, row_lengths=[60])[0].backward()
    assert reached == {2, 3}
