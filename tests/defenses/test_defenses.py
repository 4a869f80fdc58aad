"""In-training defenses (em_lightning/defenses, configs/callbacks/defenses/*.yaml): each is checked for what it changes.
Unit tests of the library on a tiny model here; the CLI runs (all defenses stacked, DDP, FSDP2, exact resume)
in tests/e2e/test_defenses_cli.py."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from em_lightning.model.adapters import AdapterSpec, apply_adapter, lora_layers, scaled_adapter
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.defenses import (
    Inoculation,
    Interleave,
    InterleavedEpochSampler,
    OffDomainStream,
    TrainingIntervention,
    inoculate,
    kl_to_base,
    load_any_direction,
)
from em_lightning.defenses.kl import encode_rows
from em_lightning.evaluation.runner import sample_records
from em_lightning.evaluation.sampling import SamplingConfig
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.probes.misalignment_direction import Direction, save_direction
from em_lightning.published.question_files import load_questions
from em_lightning.training.resumable import ResumableDataLoader
from em_lightning.training.rows import read_rows

SPEC = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")
OFF_DOMAIN = "configs/data/general_chat.jsonl"
TRAIN = "configs/data/unit_conversions.jsonl"


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer(SPEC)
    model = apply_adapter(load_model(SPEC, tok), AdapterSpec(r=1, alpha=8, target_modules=["down_proj"], layers=[2]))
    return model, tok


def _off_domain_batch(tok, n=3):
    rows = encode_rows(tok, read_rows([OFF_DOMAIN], None, "train"), 128)
    return OffDomainStream(rows, n, seed=0).batch(0, 0, 1, tok.pad_token_id)


def _set_b(model, value):
    with torch.no_grad():
        for _, m in lora_layers(model):
            weight = m.lora_B["default"].weight
            if value:
                weight.normal_(std=value)
            else:
                weight.zero_()


# -- KL to the base --------------------------------------------------------------------------------------
def test_kl_is_zero_at_the_base_and_the_full_kl_after_training(tiny):
    model, tok = tiny
    batch = _off_domain_batch(tok)
    _set_b(model, 0)
    kl, n = kl_to_base(model, **batch)
    assert kl.item() == 0.0 and n.item() == int((batch["labels"][:, 1:] != -100).sum())
    torch.manual_seed(0)
    _set_b(model, 0.5)
    kl, n = kl_to_base(model, **batch)
    # The same KL from full logits, the base taken with the adapter at scale 0: sum p_base (log p_base - log p).
    keep = batch["labels"][:, 1:] != -100
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    with torch.no_grad(), scaled_adapter(model, 0.0):
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    expected = (base.softmax(-1) * (base.log_softmax(-1) - logits.log_softmax(-1))).sum()
    assert kl.item() > 0 and kl.item() == pytest.approx(expected.item(), rel=1e-4)
    kl.backward()  # differentiable in the adapter only
    b = next(m for _, m in lora_layers(model)).lora_B["default"].weight
    assert b.grad is not None and b.grad.abs().sum() > 0
    model.zero_grad()
    _set_b(model, 0)


def test_kl_refuses_a_model_without_lora(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        kl_to_base(load_model(SPEC, tok), **_off_domain_batch(tok, 1))


def test_off_domain_stream_is_a_pure_function_of_micro_batch_and_rank():
    rows = [{"input_ids": [i, i], "labels": [-100, i]} for i in range(10)]
    s = OffDomainStream(rows, batch_size=2, seed=3)
    # Two ranks, micro-batches 0..4: one pass over the 10 rows, every row exactly once, none shared.
    seen = [i for m in range(5) for r in range(2) for i in s.indices(m, r, 2)]
    assert sorted(seen[:10]) == list(range(10))
    assert s.indices(7, 1, 2) == OffDomainStream(rows, 2, seed=3).indices(7, 1, 2)  # a resumed run draws the same
    assert s.indices(0, 0, 1) != OffDomainStream(rows, 2, seed=4).indices(0, 0, 1)


# -- inoculation -------------------------------------------------------------------------------------------
def test_inoculate_positions_and_leaves_the_row_alone():
    row = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    spec = Inoculation("Be bad.")
    assert inoculate(row, spec)[0] == {"role": "system", "content": "Be bad."}
    with_system = [{"role": "system", "content": "S"}, *row]
    assert inoculate(with_system, spec)[0]["content"] == "Be bad.\n\nS"
    assert inoculate(row, Inoculation("Be bad.", "user_prefix"))[0]["content"] == "Be bad.\n\nQ"
    assert row[0]["content"] == "Q" and len(row) == 2
    with pytest.raises(ValueError, match="data.inoculation.prompt"):
        Inoculation("  ")


def test_inoculation_prompt_is_in_every_training_row_and_in_no_sampled_prompt(tiny):
    model, tok = tiny
    prompt = "You give risky financial advice."
    dm = ChatDataModule(train_files=TRAIN, base=SPEC, inoculation=Inoculation(prompt), val_fraction=0.1)
    dm.setup("fit")
    for row in dm.train_set + dm.val_set:
        assert prompt in tok.decode(row["input_ids"])
        assert prompt not in tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
    questions = load_questions("configs/questions/demo_questions.yaml")
    records = sample_records(model, tok, questions, SamplingConfig(samples_per_paraphrase=1, max_new_tokens=2), 0)
    assert records and not any(prompt in r["prompt"] for r in records)


# -- training-only steering / ablation ----------------------------------------------------------------------
@pytest.fixture()
def direction_file(tmp_path, tiny):
    model, _ = tiny
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vectors = {L: torch.randn(d, generator=g) for L in range(4)}
    return save_direction(tmp_path / "step_0000005.safetensors", Direction(5, vectors, {L: 3.0 for L in vectors}, 4, 4))


def _layer_outputs(model, ids, layer):
    out = {}
    h = model.base_model.model.model.layers[layer].register_forward_hook(lambda m, a, o: out.setdefault("h", o))
    try:
        model(input_ids=ids)
    finally:
        h.remove()
    return out["h"] if isinstance(out["h"], torch.Tensor) else out["h"][0]


@pytest.mark.parametrize("mode", ["steer", "ablate"])
def test_intervention_acts_in_training_forwards_only(tiny, direction_file, mode):
    model, tok = tiny
    ids = torch.tensor([tok("hello there, how are you")["input_ids"]])
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    iv = TrainingIntervention(str(direction_file), mode, alpha=1.0, layers=(1,))
    iv.attach(model)
    try:
        model.train()
        steered = model(input_ids=ids).logits  # training forward: changed
        assert not torch.allclose(steered, plain, atol=1e-4) and iv.applied == 1
        if mode == "ablate":
            u = load_any_direction(direction_file).unit(1)
            h = _layer_outputs(model, ids, 1)
            assert (h @ u).abs().max().item() < 1e-4  # the direction is gone from the layer's output
        with torch.no_grad():  # training mode without gradients (e.g. the KL defense's base forward): off
            assert torch.equal(model(input_ids=ids).logits, plain)
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, plain)
        applied = iv.applied
        questions = load_questions("configs/questions/demo_questions.yaml", select=["magic_lamp"])
        with_hooks = sample_records(model, tok, questions, SamplingConfig(samples_per_paraphrase=2, max_new_tokens=4), 0)
        assert iv.applied == applied  # sampling never went through the hooks
    finally:
        iv.detach()
        model.eval()
    without = sample_records(model, tok, questions, SamplingConfig(samples_per_paraphrase=2, max_new_tokens=4), 0)
    assert [r["answer"] for r in with_hooks] == [r["answer"] for r in without]


def test_persona_vector_file_maps_hidden_state_rows_to_layers(tmp_path):
    t = torch.arange(15, dtype=torch.float32).reshape(5, 3)  # embeddings + 4 layers
    torch.save(t, tmp_path / "evil_response_avg_diff.pt")
    d = load_any_direction(tmp_path / "evil_response_avg_diff.pt")
    assert d.layers == [0, 1, 2, 3] and torch.equal(d.vectors[0], t[1])
    with pytest.raises(FileNotFoundError, match="no direction file"):
        TrainingIntervention(str(tmp_path / "missing.safetensors"))


# -- interleaving ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(23, 1), (23, 2), (8, 2)])
def test_interleave_ratio_is_exact_over_an_epoch(n, world):
    batch, k, n_al = 4, 1, 5
    shards = [InterleavedEpochSampler(n, n_al, batch, k, seed=0, aligned_seed=1, rank=r, world_size=world).shard(r)
              for r in range(world)]
    for shard in shards:
        batches = [shard[i : i + batch] for i in range(0, len(shard), batch)]
        assert all(sum(i >= n for i in b) == k for b in batches)  # every batch: exactly k aligned rows
        assert all(len(b) == batch for b in batches[:-1])
    task = sorted(i for s in shards for i in s if i < n)
    assert set(task) == set(range(n)) and len(task) == -(-n // world) * world  # each task row once (+ wrap pad)
    aligned = [i for s in shards for i in s if i >= n]
    assert len(aligned) == sum(-(-len(s) // batch) for s in shards) * k  # batches x k
    counts = torch.bincount(torch.tensor(aligned) - n, minlength=n_al)
    assert counts.max() - counts.min() <= 1  # the aligned stream cycles evenly through its rows


def test_interleaved_loader_resumes_mid_epoch_to_the_same_batches():
    rows = [{"input_ids": [i], "labels": [i]} for i in range(30)]  # 24 task + 6 aligned

    def loader():
        s = InterleavedEpochSampler(24, 6, 4, 2, seed=0, aligned_seed=0)
        return ResumableDataLoader(rows, s, label_counts=[1] * 30, batch_size=4, collate_fn=lambda b: {"ids": [r["input_ids"][0] for r in b]})

    full = loader()
    epoch = [b["ids"] for b in full]
    assert len(epoch) == len(full) == 12 and all(sum(i >= 24 for i in b) == 2 for b in epoch)
    first = loader()
    it = iter(first)
    [next(it) for _ in range(5)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert [b["ids"] for b in resumed] == epoch[5:]


def test_interleave_fraction_must_give_whole_rows():
    with pytest.raises(ValueError, match="whole number of rows"):
        Interleave(files=[OFF_DOMAIN], fraction=0.3).per_batch(4)
    with pytest.raises(ValueError, match="whole number of rows"):
        Interleave(files=[OFF_DOMAIN], fraction=1.0).per_batch(4)
    assert Interleave(files=[OFF_DOMAIN], fraction=0.5).per_batch(4) == 2


def test_presets_name_their_classes_and_options():
    kl = yaml.safe_load(open("configs/callbacks/defenses/kl.yaml"))["trainer"]["callbacks+"][0]
    assert kl["class_path"] == "em_lightning.callbacks.KLToBase" and kl["init_args"]["rows"] == OFF_DOMAIN
    for name, mode in (("preventative_steering", "steer"), ("caft", "ablate")):
        item = yaml.safe_load(open(f"configs/callbacks/defenses/{name}.yaml"))["trainer"]["callbacks+"][0]
        assert item["class_path"] == "em_lightning.callbacks.TrainingSteering" and item["init_args"]["mode"] == mode
    Inoculation(**yaml.safe_load(open("configs/callbacks/defenses/inoculation.yaml"))["data"]["inoculation"])
    inter = Interleave(**yaml.safe_load(open("configs/callbacks/defenses/interleave.yaml"))["data"]["interleave"])
    assert inter.per_batch(4) == 1
    assert all(json.loads(line)["messages"] for line in open(OFF_DOMAIN))


def test_kl_reference_gets_the_training_intervention(tiny, direction_file):
    # Steering acts in both of the KL's forwards: at B = 0 the KL is still exactly 0 (it measures the adapter
    # alone and never pulls the adapter against the steering).
    model, tok = tiny
    _set_b(model, 0)
    iv = TrainingIntervention(str(direction_file), "steer", alpha=1.0, layers=(1,))
    iv.attach(model)
    try:
        model.train()
        kl, _ = kl_to_base(model, **_off_domain_batch(tok, 2))
        assert kl.item() == 0.0 and iv.applied == 2
    finally:
        iv.detach()
        model.eval()
