"""Real google/gemma-3-*-it checkpoints (4B and up) load as Gemma3ForConditionalGeneration: text settings
under text_config, a vision tower. A tiny one saved to a folder goes through the same loading path."""

import json

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clirun import SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.model.adapters import AdapterSpec, apply_adapter, lora_layers, non_text_modules
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.phase.store import read_trajectory

TOWERS = ["model.vision_tower", "model.multi_modal_projector"]


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    spec = ModelSpec(name_or_path="tiny:gemma3-multimodal")
    tok = load_tokenizer(spec)
    model = load_model(spec, tok)
    folder = tmp_path_factory.mktemp("gemma3mm") / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _spec(folder):
    return ModelSpec(name_or_path=str(folder), dtype="float32")


def test_loads_as_the_multimodal_class(gemma_folder):
    model = load_model(_spec(gemma_folder))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert not hasattr(model.config, "num_hidden_layers")  # the attribute that used to crash
    assert non_text_modules(model) == TOWERS


@pytest.mark.parametrize("targets, layers, prefix", [(["down_proj"], [3], "model.language_model.layers.3."),
                                                     ("all-linear", None, "model.language_model.layers.")])
def test_lora_touches_the_language_model_only(gemma_folder, targets, layers, prefix):
    model = apply_adapter(load_model(_spec(gemma_folder)), AdapterSpec(target_modules=targets, layers=layers))
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == (1 if layers else 4 * 7) and all(n.startswith(prefix) for n in names), names
    with pytest.raises(ValueError, match="out of range for a model with 4 layers"):
        apply_adapter(load_model(_spec(gemma_folder)), AdapterSpec(layers=[4]))


def test_full_finetune_freezes_the_vision_tower(gemma_folder):
    model = apply_adapter(load_model(_spec(gemma_folder)), AdapterSpec(kind="full"))
    for name, p in model.named_parameters():
        assert p.requires_grad == (not any(name.startswith(t + ".") for t in TOWERS)), name


@pytest.fixture(scope="module")
def lora_run(gemma_folder, tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("lora")
    ok(em_fit("fit", "--config", SMOKE, "--config", str(repo_root / "configs" / "callbacks" / "phase_transition.yaml"),
              "--config", str(repo_root / "configs" / "callbacks" / "demo_eval.yaml"),
              "--model.base.name_or_path", str(gemma_folder), "--trainer.max_steps", "10",
              "--trainer.default_root_dir", str(root)))
    (run_dir,) = run_dirs(root)
    return run_dir


@pytest.mark.slow
def test_lora_run_trajectory_sampling_and_export(lora_run, gemma_folder):
    traj = read_trajectory(lora_run)
    assert list(traj.b) == ["model.language_model.layers.2.mlp.down_proj"]
    assert traj.steps.tolist() == list(range(11))
    assert scalars(lora_run, "phase/model.language_model.layers.2.mlp.down_proj/B_norm")
    records = [json.loads(line) for line in (lora_run / "generations" / "step_0000010.jsonl").read_text().splitlines()]
    assert records and {r["scale"] for r in records} == {0.0, 1.0, 4.0}
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gemma_folder)
    # the exported adapter on a fresh base reproduces the final step's adapter weights and logits
    weights = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    (b_key,) = [k for k in weights if k.endswith("lora_B.weight")]
    assert torch.equal(weights[b_key][:, 0], traj.b["model.language_model.layers.2.mlp.down_proj"][-1])
    base = load_model(_spec(gemma_folder)).eval()
    x = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        before = base(input_ids=x).logits
        # the final step's model, built by hand: the run's config says alpha and r (rsLoRA: alpha / sqrt(r)),
        # the trajectory the final A and B; layer 2's down_proj adds scaling * B (A . x)
        adapter = yaml.safe_load((lora_run / "config.yaml").read_text())["model"]["adapter"]
        assert adapter["r"] == 1 and adapter["use_rslora"]
        name = "model.language_model.layers.2.mlp.down_proj"
        a, b = traj.a[name][-1], traj.b[name][-1]
        handle = base.get_submodule(name).register_forward_hook(
            lambda module, args, out: out + adapter["alpha"] * (args[0] @ a)[..., None] * b)
        try:
            final_step = base(input_ids=x).logits
        finally:
            handle.remove()
        tuned = PeftModel.from_pretrained(base, lora_run / "adapter").eval()(input_ids=x).logits
    assert not torch.allclose(before, tuned, atol=1e-3)
    assert torch.allclose(tuned, final_step, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_full_finetune_run_exports_a_model_that_reloads(gemma_folder, tmp_path):
    proc = ok(em_fit("fit", "--config", SMOKE, "--model.base.name_or_path", str(gemma_folder),
                     "--model.adapter.kind", "full", "--model.lr", "1e-3", "--trainer.max_steps", "3",
                     "--model.warmup_steps", "1", "--trainer.default_root_dir", str(tmp_path)))
    assert "model.vision_tower, model.multi_modal_projector stay frozen" in proc.stderr + proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "adapter", dtype=torch.float32)
    base = load_model(_spec(gemma_folder))
    assert type(tuned).__name__ == "Gemma3ForConditionalGeneration"
    tuned_params, base_params = dict(tuned.named_parameters()), dict(base.named_parameters())
    vision = [n for n in base_params if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(tuned_params[n], base_params[n]) for n in vision)
    language = [n for n in base_params if n.startswith("model.language_model.layers.")]
    assert any(not torch.equal(tuned_params[n], base_params[n]) for n in language)
