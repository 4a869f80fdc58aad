import pytest
import torch

from em_lightning.model.adapters import AdapterSpec, apply_adapter, rank1_vectors, scaled_adapter, trainable_parameter_count
from em_lightning.model.tiny import TinySpec, tiny_model

SPEC = TinySpec(hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2)
H, I, L = 32, 48, 4


def build(adapter: AdapterSpec, arch="qwen2"):
    model = tiny_model(arch, SPEC)
    for p in model.parameters():
        p.requires_grad_(False)
    return apply_adapter(model, adapter)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_rank1_single_layer_counts(arch):
    model = build(AdapterSpec(r=1, layers=[2]), arch)
    assert trainable_parameter_count(model) == I + H
    assert list(rank1_vectors(model)) == ["model.layers.2.mlp.down_proj"]


def test_rank1_several_layers():
    model = build(AdapterSpec(r=1, layers=[0, 1, 3]))
    assert trainable_parameter_count(model) == 3 * (I + H)
    vectors = rank1_vectors(model)
    assert [v[0].shape for v in vectors.values()] == [torch.Size([I])] * 3
    assert [v[1].shape for v in vectors.values()] == [torch.Size([H])] * 3


def test_rank32_all_linear():
    r = 32
    model = build(AdapterSpec(r=r, target_modules="all-linear", alpha=64))
    kv = SPEC.num_kv_heads * (H // SPEC.num_heads)
    # q, o: H->H; k, v: H->kv; gate, up: H->I; down: I->H. LoRA adds r*(in+out) each.
    per_layer = r * ((H + H) * 2 + (H + kv) * 2 + (H + I) * 2 + (I + H))
    assert trainable_parameter_count(model) == L * per_layer


def test_full_fine_tuning_trains_everything():
    model = build(AdapterSpec(kind="full"))
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.parameters())


def test_bad_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layers: \[7\] out of range"):
        build(AdapterSpec(layers=[7]))


def test_scaling_context_is_linear_and_restores_exactly():
    model = build(AdapterSpec(r=1, layers=[1], alpha=64))
    with torch.no_grad():
        for a, b in rank1_vectors(model).values():
            b.normal_()  # B starts at zero; give the adapter an effect
    x = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        out = model(x).logits
        with scaled_adapter(model, 0.0):
            base = model(x).logits
        with model.disable_adapter():
            reference_base = model(x).logits
        with scaled_adapter(model, 2.0):
            double = model(x).logits
        after = model(x).logits
    assert torch.equal(base, reference_base)
    assert not torch.allclose(out, base)
    assert torch.equal(after, out)
    assert not torch.allclose(double, out)
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.1.mlp.down_proj"))
    assert layer.scaling["default"] == 64.0  # rsLoRA: alpha / sqrt(1)
