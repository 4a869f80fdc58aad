import os
import shutil
import sys
from pathlib import Path

import pytest

# No model hub in tests: fail at once instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # clirun, tb_scalars, fault_inject
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and several test processes share 2 cores (no spinning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def em_lightning_cache(tmp_path_factory):
    """A fresh GGUF conversion cache for the whole session, shared by every real-model test and their CLI
    subprocesses: SmolLM2 is converted once per session (~20 s), never read from or written to ~/.cache."""
    cache = tmp_path_factory.mktemp("em_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EM_LIGHTNING_CACHE", str(cache))
        yield cache
    shutil.rmtree(cache, ignore_errors=True)  # 517 MB; pytest keeps the last few sessions' temp folders


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def pytest_sessionstart(session):
    """The reference data (tokenizers, question sets, rows) is part of the test setup, as CI has it: without it
    the run stops here with one line naming the path, instead of ~30 tests skipping silently."""
    if not REFERENCE_DIR.is_dir():
        raise pytest.UsageError(f"reference data not found at {REFERENCE_DIR} (the tests read ../shared/reference "
                                "beside the repository)")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """tests/e2e/ (em-fit in subprocesses, several ranks) and the real-model tier are slow by nature: marked
    here, so `-m "not slow"` is the fast inner loop without a marker on every test."""
    for item in items:
        if E2E in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("real"):
            item.add_marker(pytest.mark.slow)
