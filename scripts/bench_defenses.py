"""Step-time cost of each in-training defense preset (configs/callbacks/defenses/) on the smoke recipe, side by side.

Each configuration is a real ``em-fit fit`` run of configs/smoke.yaml (tiny Qwen2, rank-1 LoRA, batch 4 x 2
accumulated, fp32, one process) with no defense, with one preset, or with all five stacked; the steering and
ablation presets get a random direction file made here (what matters is the hook's cost, not the direction).
Seconds per optimizer step = the median interval between consecutive ``train/loss`` events (TensorBoard wall
times), so start-up, validation and checkpoint saves do not count. Configurations alternate for ``--rounds``
rounds (drifting load hits all alike); each figure is its median over rounds.

    python scripts/bench_defenses.py [--steps 30] [--rounds 2]

Last line: ``ratio: X.XXx`` = seconds per step with all five defenses / without any.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from em_lightning.probes.misalignment_direction import Direction, save_direction

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("kl", "inoculation", "interleave", "preventative_steering", "caft")


def presets(folder: Path) -> dict[str, Path]:
    """Each preset as a file; the steering/ablation ones pointed at a random direction (smoke: hidden 64)."""
    g = torch.Generator().manual_seed(0)
    direction = save_direction(folder / "direction.safetensors",
                               Direction(0, {L: torch.randn(64, generator=g) for L in range(4)}, {L: 1.0 for L in range(4)}, 1, 1))
    out = {}
    for name in PRESETS:
        cfg = yaml.safe_load((REPO / "configs" / "callbacks" / "defenses" / f"{name}.yaml").read_text())
        if name in ("preventative_steering", "caft"):
            cfg["trainer"]["callbacks+"][0]["init_args"].update(direction=str(direction), layers=[2])
        out[name] = folder / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(cfg))
    return out


def seconds_per_step(configs: list[Path], steps: int, root: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "em_lightning.cli", "fit", "--config", str(REPO / "configs" / "smoke.yaml")]
    for c in configs:
        args += ["--config", str(c)]
    args += ["--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root),
             "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    (events,) = {p.parent for p in root.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    times = [e.wall_time for e in acc.Scalars("train/loss")]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = presets(Path(tmp))
        runs = {"none": [], **{name: [files[name]] for name in PRESETS}, "all five": list(files.values())}
        results: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name, configs in runs.items():
                results[name].append(seconds_per_step(configs, args.steps, Path(tmp) / f"{name}-{r}".replace(" ", "_")))
    base = statistics.median(results["none"])
    print(f"smoke recipe, {args.steps} steps, median s/optimizer step over {args.rounds} round(s):")
    for name, values in results.items():
        s = statistics.median(values)
        print(f"  {name:22s} {s * 1000:7.1f} ms/step  ({s / base:.2f}x)")
    print(f"ratio: {statistics.median(results['all five']) / base:.2f}x")


if __name__ == "__main__":
    main()
