"""em-fit report: figures and report.md from a synthetic run directory (trajectory + TensorBoard scalars)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from em_lightning import cli, report  # noqa: E402
from em_lightning.commands import report as report_command  # noqa: E402
from em_lightning.phase.store import TrajectoryWriter  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODULE = "model.layers.2.mlp.down_proj"
TURN = 30  # the B (and A) path turns by 120 degrees at this step: straight up to it, then away
EM = {0: 0.0, 20: 0.05, 40: 0.45, 59: 0.625}
COHERENT = {0: 0.9, 20: 0.85, 40: 0.8, 59: 0.75}
TRAJECTORY_FIGURES = ["norms.png", "local_cosine.png", "pca_b.png", "rotation.png"]


def _path(n: int, d: int, turn: int | None, seed: int) -> torch.Tensor:
    """Unit steps along e0, then (after ``turn``) along a direction 120 degrees away, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(d)
    first[0] = 1.0
    second = torch.zeros(d)
    second[0], second[1] = -0.5, 3**0.5 / 2
    steps = torch.stack([first if turn is None or i <= turn else second for i in range(n)])
    steps = steps + 0.1 * torch.randn(n, d, generator=g)
    return torch.cat([torch.zeros(1, d), steps[1:].cumsum(0)])


def _write_trajectory(run_dir: Path, n: int = 60, turn: int | None = TURN) -> None:
    writer = TrajectoryWriter(run_dir / "trajectory", meta={"kind": "vectors", "rank": 1})
    a, b = _path(n, 16, turn, seed=1) + 0.5, _path(n, 32, turn, seed=2)
    for step in range(n):
        writer.append(step, {MODULE: (a[step], b[step])})
    writer.close()


def _write_scalars(run_dir: Path, n: int = 60, evals: bool = True) -> None:
    writer = SummaryWriter(str(run_dir))
    for step in range(n):
        writer.add_scalar("train/loss", 2.0 - step / n, step)
    if evals:
        for step, value in EM.items():
            writer.add_scalar("eval/em_rate", value, step)
            writer.add_scalar("eval/coherent_rate", COHERENT[step], step)
    writer.close()


def _check_png(path: Path) -> None:
    assert path.is_file(), f"{path.name} missing"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    image = mpimg.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 500, image.shape
    assert image[..., :3].std() > 0.01, f"{path.name} is blank"


def _detected_steps(md: str) -> list[int]:
    return [int(s) for s in re.findall(r"^\| `[^`]+` \| (\d+) \| ", md, flags=re.M)]


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "version_0"
    run_dir.mkdir()
    _write_trajectory(run_dir)
    _write_scalars(run_dir)
    return run_dir


def test_full_run(full_run: Path) -> None:
    report_command.main([str(full_run)])
    out = full_run / "report"
    for name in TRAJECTORY_FIGURES + ["metrics.png"]:
        _check_png(out / name)
    md = (out / "report.md").read_text()
    steps = _detected_steps(md)
    assert len(steps) == 1 and abs(steps[0] - TURN) <= 2, md
    assert "Recorded steps: 60" in md and MODULE in md
    for step, value in EM.items():
        assert f"| {step} | {value:.3f} | n/a | n/a | {COHERENT[step]:.3f} |" in md  # no interval logged here
    # metrics around the transition: the eval before (step 20) and after (step 40) it
    assert "0.050 (step 20)" in md and "0.450 (step 40)" in md
    assert "No transition detected" not in md


def test_analysis_values(full_run: Path) -> None:
    rep = report.analyse_run(full_run, ks=[5, 10])
    (m,) = rep.modules
    assert rep.steps == list(range(60))
    assert set(m.local_cosine) == {5, 10}
    # straight arms give -1, the 120-degree corner about -cos(120) = +0.5
    assert float(m.local_cosine[5][15]) < -0.9
    assert float(m.local_cosine[5][TURN]) > 0.2
    assert float(m.pca.explained_variance_ratio.sum()) > 0.9
    assert rep.scalars["eval/em_rate"][0] == sorted(EM)


def test_straight_run_without_eval(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_trajectory(run_dir, turn=None)  # no scalars at all
    out = tmp_path / "elsewhere"
    cli.main(["report", str(run_dir), "--out", str(out), "--k", "4", "8"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(TRAJECTORY_FIGURES)
    for name in TRAJECTORY_FIGURES:
        _check_png(out / name)
    assert not (run_dir / "report").exists()
    md = (out / "report.md").read_text()
    assert "No transition detected" in md and _detected_steps(md) == []
    assert "## Evaluation" not in md
    assert str(out) in capsys.readouterr().out


def test_several_modules(tmp_path: Path) -> None:
    """Modules are ordered by layer number; only the module whose B turns reports a transition; panels are
    capped; the run's detector settings (config.yaml) are used."""
    run_dir = tmp_path / "run"
    writer = TrajectoryWriter(run_dir / "trajectory", meta={"kind": "vectors"})
    (run_dir / "config.yaml").write_text(
        "trainer:\n  callbacks:\n  - class_path: em_lightning.callbacks.adapter_trajectory.AdapterTrajectory\n"
        "    init_args:\n      detector_k: 6\n      detector_threshold: -0.6\n"
    )
    names = [f"model.layers.{i}.mlp.down_proj" for i in (24, 3, 10)]
    paths = {n: (_path(60, 8, None, seed=i), _path(60, 12, TURN if n == names[1] else None, seed=9 + i))
             for i, n in enumerate(names)}
    for step in range(60):
        writer.append(step, {n: (a[step], b[step]) for n, (a, b) in paths.items()})
    writer.close()
    report_command.main([str(run_dir), "--max-modules", "2"])
    md = (run_dir / "report" / "report.md").read_text()
    assert "Modules (3): `model.layers.3.mlp.down_proj`, `model.layers.10.mlp.down_proj`, `model.layers.24" in md
    assert "k=6, threshold=-0.6" in md and "at k=6" in md
    assert re.findall(r"^\| `([^`]+)` \| (\d+) \| ", md, flags=re.M) == [(names[1], str(TURN))]
    _check_png(run_dir / "report" / "local_cosine.png")


def test_logs_without_trajectory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_scalars(run_dir)
    with SummaryWriter(str(run_dir)) as w:  # a transition the live callback logged
        w.add_scalar(f"phase/{MODULE}/transition_step", 31, 31)
    cli.main(["report", str(run_dir)])
    out = run_dir / "report"
    _check_png(out / "metrics.png")
    for name in TRAJECTORY_FIGURES:
        assert not (out / name).exists()
    md = (out / "report.md").read_text()
    assert "| 40 | 0.450 | n/a | n/a | 0.800 |" in md
    assert f"phase/{MODULE}/transition_step" in md and "step(s) 31" in md


def test_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="run directory not found"):
        report_command.main([str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to report"):
        report_command.main([str(empty)])
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(empty)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("em-fit: error: nothing to report") and "\n" not in err
    assert not (empty / "report").exists()
