"""scripts/gpu_check.py (make gpu-check) cannot rot: its --smoke mode runs the same code at tiny shapes on CPU
here; its architecture configs keep the published sizes; and em_lightning's training path imports on a stock
GPU image, which has no datasets, bitsandbytes, openai, jsonargparse or trl."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
# Parameter counts of the published models (billions, as their model cards round them).
PUBLISHED = {"qwen2.5-0.5b": 0.49, "qwen2.5-7b": 7.62, "llama-3.1-8b": 8.03, "qwen2.5-14b": 14.77}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_builds_the_published_parameter_count(name):
    d = json.loads((REPO / "configs" / "gpu_check" / f"{name}.json").read_text())
    d.pop("_source")
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == PUBLISHED[name]


def test_training_path_imports_without_the_packages_a_stock_gpu_image_lacks():
    blocker = textwrap.dedent("""
        import importlib.abc, sys
        BLOCKED = {"datasets", "bitsandbytes", "openai", "jsonargparse", "trl", "pyarrow"}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is not on a stock GPU image")
        sys.meta_path.insert(0, Blocker())
        import em_lightning.lit.module, em_lightning.lit.datamodule, em_lightning.callbacks, em_lightning.judges
        import em_lightning.evaluation.sampling, em_lightning.lit.strategies
        sys.path.insert(0, "scripts")
        import gpu_check
        loaded = BLOCKED & {m.split(".")[0] for m in sys.modules}
        assert not loaded, loaded
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.slow
def test_smoke_run_writes_json_and_markdown(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["smoke"] and result["peaks"]["measured_matmul"] > 0
    train = [r for r in result["training"] if "em_tok_s" in r]
    assert {r["adapter"] for r in train} == {"rank1-downproj", "rank32-all-linear"}
    for r in train:
        assert r["em_tok_s"] > 0 and r["ref_tok_s"] > 0 and 0 < r["em_mfu_measured_matmul"]
        assert r["flop_counts"]["trainable"] > 0 and r["flop_counts"]["backward"] <= r["flop_counts"]["forward"]
    assert [r["shape"] for r in result["training"] if "em_tok_s" not in r] == ["qwen2.5-14b"]  # memory only
    e = result["eval_point"]
    assert e["answers"] == 8 * 4 and e["prompts"] == 8 and e["em_seconds"] > 0 and e["ref_seconds"] > 0
    layouts = result["attention"]["layouts"]
    assert len(layouts) >= 3 and all(v["loss_matches_padding_free"] for v in layouts.values())
    assert all(v["rows_isolated"] for k, v in layouts.items() if k.startswith("packed"))
    assert result["attention"]["fastest"] in layouts
    fit = result["fit"]
    assert "error" not in fit, fit.get("error")
    assert {"AdapterTrajectory", "SampleGenerations", "InLoopJudge", "StepCheckpoint"} <= set(fit["callback_share_of_fit"])
    assert 0 < sum(fit["callback_share_of_fit"].values()) < 1
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| qwen2.5-0.5b | rank1-downproj |" in md and "fastest layout" in md and "em-fit fit" in md
