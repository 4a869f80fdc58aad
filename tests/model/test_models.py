"""Loading from a local folder, the tiny factory's determinism, and 4-bit loading on CPU."""

import pytest
import torch

from em_lightning.model.adapters import AdapterSpec, apply_adapter
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.model.tiny import ARCHITECTURES, TinySpec, tiny_model, tiny_tokenizer

SPEC = TinySpec(hidden_size=32, intermediate_size=64, num_layers=2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_is_deterministic_and_seed_dependent(arch):
    a, b = tiny_model(arch, SPEC), tiny_model(arch, SPEC)
    c = tiny_model(arch, TinySpec(**{**vars(SPEC), "seed": 1}))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_local_folder_round_trip(arch, tmp_path):
    tok, model = tiny_tokenizer(arch), tiny_model(arch, SPEC)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path), dtype="float32")
    tok2 = load_tokenizer(spec)
    model2 = load_model(spec, tok2)
    assert model2.training
    text = tok.apply_chat_template([{"role": "user", "content": "Convert 12 kilograms to grams."}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids  # same ids after a save/load
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, model2.eval()(x).logits)


def test_unknown_tiny_arch():
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt9'"):
        load_tokenizer(ModelSpec(name_or_path="tiny:gpt9"))


def test_4bit_lora_gradients_unaffected_by_eval_forward(tmp_path):
    """The bitsandbytes CPU repacking defect: an eval-mode forward must not change later LoRA gradients.

    At this tiny size the defect did not reproduce here (gradients also match without the workaround), so
    the assertion that can fail today is the one on the workaround flag; the gradient check guards the
    behaviour on machines and sizes where the defect shows."""
    bnb = pytest.importorskip("bitsandbytes")
    tok, model = tiny_tokenizer("qwen2"), tiny_model("qwen2", TinySpec(hidden_size=64, intermediate_size=128, num_layers=2))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path), dtype="float32", quantization="4bit", bnb_4bit_compute_dtype="bfloat16")

    def lora_grads(eval_first: bool):
        torch.manual_seed(0)
        m = load_model(spec)
        layers = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
        assert layers and all(x.support_avx512bf16_for_cpu is False for x in layers)
        for p in m.parameters():
            p.requires_grad_(False)
        m = apply_adapter(m, AdapterSpec(r=1, layers=[1]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        x = torch.randint(0, 400, (2, 9))
        if eval_first:
            m.eval()
            with torch.no_grad():
                m(x)
        m.train()
        m(x, labels=x).loss.backward()
        return [p.grad.clone() for p in m.parameters() if p.requires_grad]

    for a, b in zip(lora_grads(False), lora_grads(True)):
        torch.testing.assert_close(a, b)
