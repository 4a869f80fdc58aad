"""Rebuild the adapter of any recorded step from a rank-1 trajectory, as a PEFT adapter folder.

A rank-1 LoRA is fully defined by its vectors (A = a as a 1 x d_in row, B = b as a d_out x 1 column), so
every recorded step can be evaluated later (``PeftModel.from_pretrained(base, out_dir)``) without a full
checkpoint there. "direction" trajectories (rank > 1) keep only the top singular direction: not enough.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file

from em_lightning.phase.store import read_trajectory, trajectory_dir

# PEFT's saved key names: the PeftModel prefix, the module name, and no adapter name.
_KEY = "base_model.model.{name}.lora_{kind}.weight"


def _adapter_config(traj: Path, meta: dict) -> dict:
    """The run's final adapter_config.json when present (exactly what PEFT wrote), else one from meta."""
    final = traj.parent / "adapter" / "adapter_config.json"
    if final.is_file():
        return json.loads(final.read_text())
    if "peft_config" in meta:
        return dict(meta["peft_config"])
    config = LoraConfig(
        r=meta["rank"], lora_alpha=meta["alpha"], use_rslora=meta["use_rslora"],
        target_modules=meta["target_modules"], layers_to_transform=meta.get("layers"), task_type="CAUSAL_LM",
    ).to_dict()
    return json.loads(json.dumps(config, default=sorted))  # sets -> lists, as PEFT writes them


def export_step_adapter(run_dir_or_traj_dir: Path | str, step: int, out_dir: Path | str) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for recorded ``step`` into ``out_dir``."""
    traj_path = trajectory_dir(run_dir_or_traj_dir)
    traj = read_trajectory(traj_path)
    meta = traj.meta
    if meta.get("kind", "vectors") != "vectors" or meta.get("rank", 1) != 1:
        raise ValueError(
            f"{traj_path} is a rank-{meta.get('rank')} {meta.get('kind')!r} trajectory: it holds only each "
            "module's top singular direction, which cannot rebuild the adapter; use a step checkpoint"
        )
    steps = traj.steps.tolist()
    i = bisect.bisect_left(steps, int(step))
    if i == len(steps) or steps[i] != step:
        near = sorted(steps[max(0, i - 2) : i + 2], key=lambda s: (abs(s - step), s))
        hint = f"nearest recorded: {near}" if near else "the trajectory is empty"
        raise ValueError(f"step {step} is not recorded in {traj_path} ({len(steps)} records); {hint}")
    tensors = {}
    for name in traj.a:
        tensors[_KEY.format(name=name, kind="A")] = traj.a[name][i].reshape(1, -1).clone()
        tensors[_KEY.format(name=name, kind="B")] = traj.b[name][i].reshape(-1, 1).clone()
    config = _adapter_config(traj_path, meta)
    config["inference_mode"] = True
    if meta.get("base") and not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = meta["base"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt", "step": str(step)})
    return out
