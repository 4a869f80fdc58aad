"""The adapter scale's value (adapters.scaled_adapter): at scale s every LoRA module adds exactly s times what it
adds at scale 1, and the scale-1 contribution is B A x times the scaling the spec names (alpha / sqrt(r) with
rsLoRA, alpha / r without). A sweep (0, 0.5, 1, 2, 4) is how the papers show the behavioural transition, so
a scale applied wrongly (s**2, s twice, only on some modules) would mislabel every sweep point."""

import math

import pytest
import torch

from em_lightning.model.adapters import ADAPTER_NAME, AdapterSpec, apply_adapter, lora_layers, scaled_adapter
from em_lightning.model.tiny import TinySpec, tiny_model

SPEC = TinySpec(hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2)
SCALES = (0.5, 2.0, 4.0)


def adapted(spec: AdapterSpec):
    model = tiny_model("qwen2", SPEC)
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_adapter(model, spec)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):  # B starts at zero: give every adapter an effect
            w = layer.lora_B[ADAPTER_NAME].weight
            w.copy_(torch.randn(w.shape, generator=gen))
    return model.eval()


ADAPTERS = {
    "rank1-rslora": AdapterSpec(r=1, alpha=8, use_rslora=True, layers=[2]),
    "rank1-plain": AdapterSpec(r=1, alpha=8, use_rslora=False, layers=[2]),
    "rank1-3-layers": AdapterSpec(r=1, alpha=8, layers=[0, 1, 3]),
    "rank4-rslora-several-modules": AdapterSpec(r=4, alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "rank4-plain-all-linear": AdapterSpec(r=4, alpha=16, use_rslora=False, target_modules="all-linear"),
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_each_module_adds_s_times_its_scale_one_contribution(name):
    spec = ADAPTERS[name]
    model = adapted(spec)
    layers = dict(lora_layers(model))
    assert len(layers) > 1 or spec.layers == [2]
    gen = torch.Generator().manual_seed(4)
    inputs = {n: torch.randn(3, m.in_features, generator=gen) for n, m in layers.items()}

    def outputs(scale):
        with torch.no_grad(), scaled_adapter(model, scale):
            return {n: m(inputs[n]).double() for n, m in layers.items()}

    zero, one = outputs(0.0), outputs(1.0)
    expected_scaling = spec.alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)  # from the spec, not PEFT
    for n, m in layers.items():
        with torch.no_grad():
            assert torch.equal(zero[n], m.base_layer(inputs[n]).double()), n  # scale 0 = the base layer exactly
            a, b = m.lora_A[ADAPTER_NAME].weight.double(), m.lora_B[ADAPTER_NAME].weight.double()
        direct = inputs[n].double() @ a.T @ b.T * expected_scaling
        assert torch.allclose(one[n] - zero[n], direct, rtol=1e-4, atol=1e-4), n
    for s in SCALES:
        got = outputs(s)
        for n in layers:
            contribution, unit = got[n] - zero[n], one[n] - zero[n]
            assert torch.allclose(contribution, s * unit, rtol=1e-5, atol=1e-5 * float(unit.abs().max())), (n, s)
    after = outputs(1.0)
    assert all(torch.equal(after[n], one[n]) for n in layers)  # the scalings came back exactly


@pytest.mark.parametrize("name", ["rank1-3-layers", "rank4-rslora-several-modules"])
def test_scaled_model_is_the_model_with_b_times_s(name):
    """Whole model, all adapters at once: logits at scale s equal those of the same model with every B
    multiplied by s (at scale 1); nonlinear in s downstream, so this checks the value, not only linearity."""
    model = adapted(ADAPTERS[name])
    x = torch.randint(0, SPEC.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    weights = [m.lora_B[ADAPTER_NAME].weight for _, m in lora_layers(model)]
    saved = [w.detach().clone() for w in weights]
    for s in SCALES:
        with torch.no_grad():
            with scaled_adapter(model, s):
                scaled = model(x).logits
            for w, w0 in zip(weights, saved):
                w.copy_(w0 * s)
            reference = model(x).logits
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
            with scaled_adapter(model, s * s):
                squared = model(x).logits
        assert torch.allclose(scaled, reference, rtol=1e-4, atol=1e-4), s
        assert not torch.allclose(scaled, squared, rtol=1e-2, atol=1e-2), s  # the check can tell s from s**2
