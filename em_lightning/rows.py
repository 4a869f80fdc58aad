"""Read and validate chat rows (``{"messages": [{"role", "content"}, ...]}``) with file:line errors."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad input row or file; the message is one line naming file:line, field and problem."""


def validate_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages: expected a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}: expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {field}.role: expected one of {'/'.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}.content: expected a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{where}: {field}.content: empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: messages: no assistant turn (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """All rows of a JSONL file as validated message lists; the first bad line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise DataError(f"{where}: messages: missing (expected {{\"messages\": [...]}})")
            rows.append(validate_messages(obj["messages"], where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_dataset(name_or_path: str, split: str) -> list[list[dict]]:
    """Rows of a ``datasets`` dataset (hub id, local script/data folder or ``save_to_disk`` folder)."""
    import datasets

    if Path(name_or_path, "dataset_info.json").is_file() or Path(name_or_path, "state.json").is_file():
        ds = datasets.load_from_disk(name_or_path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name_or_path, split=split)
    if "messages" not in ds.column_names:
        raise DataError(f"{name_or_path}[{split}]: messages: column missing (columns: {ds.column_names})")
    return [validate_messages(m, f"{name_or_path}[{split}] row {i}") for i, m in enumerate(ds["messages"])]


def read_rows(files: Iterable[str | Path], dataset: str | None, split: str) -> list[list[dict]]:
    rows = [r for f in files for r in read_jsonl(f)]
    if dataset is not None:
        rows += read_dataset(dataset, split)
    if not rows:
        raise DataError("data: no training rows: set data.train_files or data.dataset")
    return rows
