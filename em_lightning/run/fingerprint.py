"""The fingerprint of a run: everything that decides its trained result, recorded in every checkpoint so that
a resume is the same run or is refused, field by field.

A fingerprint is a flat mapping ``dotted.field -> JSON value`` (``model.adapter.layers: [2]``). Files are
named by what they hold, cheaply: size plus the sha256 of the whole file when it is at most ``FULL_HASH_BYTES``,
else of its first and last MiB (a rewritten file almost always changes its size or an end; a changed
middle of a multi-GB file of the same size is not caught, a stated limit). ``compare`` gives one line per
changed field. No Lightning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from em_lightning.model.gguf_cache import PACKAGE_PREFIX, package_file

FINGERPRINT = "em_fingerprint"  # the checkpoint key
FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole (~0.1 s per 64 MiB)
EDGE_BYTES = 1 << 20  # larger files: their first and last MiB
ALL = "all"  # --allow_changed all: accept every change (and a checkpoint with no fingerprint)
# The factors of the global batch: each may change (devices, say) when their product stays the same.
BATCH_FACTORS = ("trainer.world_size", "data.batch_size", "trainer.accumulate_grad_batches")
GLOBAL_BATCH = "global_batch"


def file_identity(path: str | Path) -> str:
    """``<size> bytes, sha256 <hex16>`` (whole file) or ``..., sha256(first+last MiB) <hex16>``."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"
        digest.update(f.read(EDGE_BYTES))
        f.seek(size - EDGE_BYTES)
        digest.update(f.read(EDGE_BYTES))
    return f"{size} bytes, sha256(first+last MiB) {digest.hexdigest()[:16]}"


def model_identity(name_or_path: str, gguf_file: str | None = None) -> dict[str, str] | None:
    """What the base model's weights are: for a local file or folder (``package:`` included) each file's
    identity; None for ``tiny:`` models (their config and seed are fingerprinted as options) and hub ids
    (name and ``revision`` are; pin a commit as the revision to make them exact)."""
    if name_or_path.startswith("tiny:"):
        return None
    path = package_file(name_or_path) if name_or_path.startswith(PACKAGE_PREFIX) else Path(name_or_path).expanduser()
    if path.is_dir() and gguf_file:
        path = path / gguf_file
    if path.is_file():
        return {path.name: file_identity(path)}
    if path.is_dir():
        return {p.name: file_identity(p) for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return None


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings as dotted keys; lists and tuples as JSON lists."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = _json(value)
    return out


def _json(value):
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, paths -> strings: comparable as saved


def _show(value) -> str:
    return json.dumps(value, default=str)


def covered(field: str, allowed: Iterable[str]) -> bool:
    """``allowed`` names the field, a group above it (``model.adapter``) or ``all``."""
    return any(a == ALL or field == a or field.startswith(a + ".") for a in allowed)


def compare(saved: Mapping[str, object], current: Mapping[str, object], allowed: Iterable[str] = (),
            factors_may_change: bool = True) -> tuple[list[str], list[str]]:
    """(refused, accepted): one ``field: checkpoint X, config Y`` line per changed field. With
    ``factors_may_change`` (a checkpoint at an epoch boundary: the data position inside an epoch counts
    batches of one world size) the factors of the global batch may change together when their product
    (``global_batch``) does not; changes that ``allowed`` covers are accepted (the caller records them)."""
    allowed = list(allowed)
    refused, accepted = [], []
    for field in sorted(set(saved) | set(current)):
        then, now = saved.get(field, "(not recorded)"), current.get(field, "(not recorded)")
        if then == now:
            continue
        if field in BATCH_FACTORS and factors_may_change and saved.get(GLOBAL_BATCH) == current.get(GLOBAL_BATCH):
            continue  # e.g. 2 devices x accumulation 1 -> 1 device x accumulation 2
        line = f"{field}: checkpoint {_show(then)}, config {_show(now)}"
        (accepted if covered(field, allowed) else refused).append(line)
    return refused, accepted
