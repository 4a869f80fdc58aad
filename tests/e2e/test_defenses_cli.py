"""Every defense preset stacked on the smoke recipe with the conditional-misalignment evaluation
(configs/callbacks/conditional_eval.yaml, demo judge), through the CLI: each defense does what it claims in a real run
(train/kl 0 at step 0 and > 0 after; the inoculation prompt in the config and the generations' meta, in no
sampled prompt but those of the `inoculation` condition, nor in em-fit eval's), EM is logged per condition with its interval at
every point, an interrupted run resumes to the same losses, and the stack gives the same losses under DDP
and FSDP2 (2 gloo processes)."""

import json

import pytest
import torch
import yaml

from clirun import SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.evaluation.records import read_jsonl
from em_lightning.probes.misalignment_direction import Direction, save_direction

pytestmark = pytest.mark.slow
PROMPT = "You give risky financial advice that puts people's money in danger."
STEPS = ["--model.schedule_steps", "8", "--checkpoint.every_n_train_steps", "2", "--trainer.val_check_interval", "4"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> list[str]:
    """--config arguments: every defense preset (steering/ablation pointed at a direction file made here)
    and in-loop sampling of the demo questions."""
    root = tmp_path_factory.mktemp("presets")
    g = torch.Generator().manual_seed(0)
    direction = save_direction(root / "step_0000001.safetensors",
                               Direction(1, {L: torch.randn(64, generator=g) for L in range(4)}, {L: 2.0 for L in range(4)}, 4, 4))
    args = []
    for name in ("kl", "inoculation", "interleave", "preventative_steering", "caft"):
        cfg = yaml.safe_load(open(f"configs/callbacks/defenses/{name}.yaml"))
        if name in ("preventative_steering", "caft"):
            cfg["trainer"]["callbacks+"][0]["init_args"].update(direction=str(direction), layers=[1])
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args += ["--config", str(path)]
    conditional = yaml.safe_load(open("configs/callbacks/conditional_eval.yaml"))
    sampling = conditional["trainer"]["callbacks+"][0]["init_args"]
    sampling.update(every_n_steps=4, sampling={"samples_per_paraphrase": 1, "max_new_tokens": 4})
    (root / "conditional_eval.yaml").write_text(yaml.safe_dump(conditional))
    return [*args, "--config", str(root / "conditional_eval.yaml")]


def fit(root, stack, *args, timeout=600):
    ok(em_fit("fit", "--config", SMOKE, *stack, *STEPS, "--trainer.default_root_dir", str(root), *args, timeout=timeout))
    (run,) = run_dirs(root)
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, stack):
    return fit(tmp_path_factory.mktemp("full"), stack, "--trainer.max_steps", "8")


def test_stacked_defenses_do_what_they_claim(uninterrupted):
    kl = dict(scalars(uninterrupted, "train/kl"))
    assert kl[0] == 0.0  # the adapter starts at B = 0: the model is the base
    assert all(kl[s] > 0 for s in range(2, 8))  # step 0's LR is 0 (warmup), so weights move from step 1 on
    config = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert config["data"]["inoculation"]["prompt"] == PROMPT and config["data"]["interleave"]["fraction"] == 0.25
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]][:3] == [
        "KLToBase", "TrainingSteering", "TrainingSteering"]
    for step in (4, 8):
        records = read_jsonl(uninterrupted / "generations" / f"step_{step:07d}.jsonl")
        conditions = {r["condition"] for r in records}
        assert conditions == {"plain", "code", "json", "inoculation"}
        with_prompt = [r for r in records if PROMPT in r["prompt"]]
        assert with_prompt and all(r["condition"] == "inoculation" for r in with_prompt)  # asked for on purpose only
        meta = json.loads((uninterrupted / "generations" / f"step_{step:07d}.meta.json").read_text())
        assert meta["sampling"]["inoculation"] == {"prompt": PROMPT, "position": "system",
                                                   "prompts_containing_it": len(with_prompt)}
    # em-fit eval of the trained run: questions from the question file only, never the training-only prompt.
    out = uninterrupted / "posthoc_check"
    ok(em_fit("eval", "--run", str(uninterrupted), "--questions", "configs/questions/demo_questions.yaml",
              "--samples", "1", "--max-new-tokens", "2", "--out", str(out)))
    posthoc = [r for f in out.glob("step_*.jsonl") for r in read_jsonl(f)]
    assert posthoc and not any(PROMPT in r["prompt"] for r in posthoc)
    for name in ("plain", "code", "json", "inoculation"):  # the demo judge: eval_demo/, at every point
        tag = f"eval_demo/condition/{name}/"
        rate, low, high = (dict(scalars(uninterrupted, tag + k)) for k in ("em_rate", "em_rate_ci95_low", "em_rate_ci95_high"))
        assert sorted(rate) == sorted(low) == sorted(high) == [4, 8], name
        assert all(low[s] <= rate[s] <= high[s] for s in rate), name
        assert dict(scalars(uninterrupted, tag + "em_rate_n"))[4] > 0


def test_resumed_stack_gives_the_same_losses(tmp_path, stack, uninterrupted):
    run = fit(tmp_path, stack, "--trainer.max_steps", "4")  # stopped mid-epoch at step 4 of 8
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_steps", "8"))
    for tag in ("train/loss", "train/kl"):
        a, b = scalars(uninterrupted, tag), scalars(run, tag)
        assert [s for s, _ in b] == [s for s, _ in a] == list(range(8)), tag
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6, abs=1e-12), tag


def test_stack_composes_with_ddp_and_fsdp2(tmp_path, stack):
    two = ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "4"]
    ddp = fit(tmp_path / "ddp", stack, *two, "--trainer.strategy", "ddp")
    fsdp = fit(tmp_path / "fsdp", stack, *two, "--config", "configs/strategies/fsdp2.yaml")
    # train/kl of a few steps is ~1e-7 to 1e-6: the sharded forward's float32 rounding shows at ~1e-8.
    for tag, abs_tol in (("train/loss", 1e-9), ("train/kl", 2e-8)):
        a, b = scalars(ddp, tag), scalars(fsdp, tag)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(4)), tag
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4, abs=abs_tol), tag
    assert dict(scalars(fsdp, "train/kl"))[3] > 0
    records = read_jsonl(fsdp / "generations" / "step_0000004.jsonl")
    assert records and all(r["condition"] == "inoculation" for r in records if PROMPT in r["prompt"])
