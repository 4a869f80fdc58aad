"""Every shipped config parses; bad inputs exit non-zero with one clear line and leave nothing behind."""

import json
from pathlib import Path

import pytest

from clirun import SMOKE, em_fit
from em_lightning.cli import main
from em_lightning.sweep.grid import expand, load_grid

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# configs/studies/<name>/: a study fragment merged after a recipe, and an em-fit sweep grid (not a fit config).
CONFIGS = sorted(
    str(p) for p in CONFIG_DIR.rglob("*.yaml")
    if p.parent.name != "questions" and "studies" not in p.parts and "callbacks" not in p.parts
)
PRESETS = sorted(str(p) for p in (CONFIG_DIR / "callbacks").rglob("*.yaml"))  # merged after a recipe
STUDIES = sorted(p.parent for p in CONFIG_DIR.glob("studies/*/grid.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).relative_to(Path(p).parents[1]).as_posix())
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, "--print_config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "model:" in out
    if "/strategies/" not in config:  # a strategy is a fragment merged with a recipe
        assert "name_or_path:" in out


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: Path(p).relative_to(CONFIG_DIR).as_posix())
def test_every_callback_preset_parses_after_a_recipe(preset, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIG_DIR / "smoke.yaml"), "--config", preset, "--print_config"])
    assert info.value.code == 0
    assert "name_or_path:" in capsys.readouterr().out  # the recipe and the preset merged into one config


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_cell_parses(study, capsys):
    """Each cell of a shipped study grid, with the recipe its study.yaml header names, parses as em-fit fit."""
    header = (study / "study.yaml").read_text()
    recipe = next(w for w in header.split() if w.startswith("configs/") and w.endswith(".yaml") and "/studies/" not in w)
    cells = expand(load_grid(study / "grid.yaml"))
    assert len(cells) > 1
    for cell in cells:
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", recipe, "--config", str(study / "study.yaml"), *cell.args(), "--print_config"])
        assert info.value.code == 0, cell.name
        assert "name_or_path:" in capsys.readouterr().out


def test_print_config_comments_documents_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", SMOKE, "--print_config=comments"])
    out = capsys.readouterr().out
    assert "rows per device per step" in out  # ChatDataModule docstring reaches the config
    assert "rank-1 LoRA on chosen layers" in out


def _fails_cleanly(proc, *expected):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in expected:
        assert any(text in line for line in lines), proc.stderr[-2000:]


def test_wrong_config_key_exit_2(tmp_path):
    proc = em_fit("fit", "--config", SMOKE, "--model.adaptr.r", "2", "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode == 2
    _fails_cleanly(proc, "adaptr")


@pytest.mark.parametrize(
    "row, message",
    [
        ("{oops", "bad.jsonl:2: invalid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "bad.jsonl:2: messages: no assistant turn"),
    ],
)
def test_bad_row_fails_before_training(tmp_path, row, message):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + row + "\n")
    root = tmp_path / "runs"
    proc = em_fit("fit", "--config", SMOKE, "--data.train_files", str(bad), "--trainer.default_root_dir", str(root))
    _fails_cleanly(proc, message)
    assert not root.exists()  # nothing half-written that a later run would trip over


def test_missing_data_file(tmp_path):
    proc = em_fit("fit", "--config", SMOKE, "--data.train_files", str(tmp_path / "missing.jsonl"),
                  "--trainer.default_root_dir", str(tmp_path / "runs"))
    _fails_cleanly(proc, "missing.jsonl: file not found")
    assert not (tmp_path / "runs").exists()


def test_ckpt_last_without_checkpoint_is_an_error(tmp_path):
    proc = em_fit("fit", "--config", SMOKE, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path))
    _fails_cleanly(proc, "--ckpt_path last: no checkpoint at")
