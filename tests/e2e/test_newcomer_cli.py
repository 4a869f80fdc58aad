"""em-fit's command line as a newcomer meets it: one registry listed by --help without importing Lightning,
LightningCLI's test/predict refused in one line, unknown names answered with the listing's hint."""

import subprocess
import sys

import pytest

from em_lightning.cli import REFUSED, SUBCOMMANDS
from clirun import REPO, em_fit

CONTRACT = ("fit", "eval", "report", "steer", "export-step", "data")  # DESIGN.md's subcommands that exist today


def test_help_lists_every_subcommand_once_without_lightning():
    code = ("import sys; from em_lightning.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch', 'transformers')]\n"
            "assert not heavy, heavy[:5]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS)
    assert set(CONTRACT) <= set(listed)
    assert "test" not in listed and "predict" not in listed


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_test_and_predict_are_refused_in_one_line(name):
    proc = em_fit(name, "--config", "configs/smoke.yaml", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(f"em-fit: error: `em-fit {name}`")


def test_unknown_subcommand_suggests_the_close_one():
    proc = em_fit("reprot", timeout=60)
    assert proc.returncode == 2 and "did you mean report?" in proc.stderr and "em-fit --help" in proc.stderr


def test_every_registered_module_has_an_entry_point():
    import importlib.util

    for name, (module, about) in SUBCOMMANDS.items():
        assert importlib.util.find_spec(module) is not None, name
        assert about and "\n" not in about and len(about) <= 100, name
