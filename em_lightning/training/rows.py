"""Read and validate chat rows (``{"messages": [{"role", "content"}, ...]}``) with file:line errors.

Files are read line by line as bytes: a byte that is not UTF-8 is named by file, line and column, and a
line longer than ``max_row_bytes`` is skipped unread (counted, first location reported) instead of being
parsed and tokenised whole (one 50 MB row used to take 13.6 GB). Accepted role order, as in the public EM
datasets: ``[system] (user assistant)+`` (an optional system message first, then user/assistant turns
alternating, starting with user and ending with assistant); anything else is refused here, before a
chat template can fail on it or silently train on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ROLES = ("system", "user", "assistant")
ROLE_ORDER = "[system] (user assistant)+"
DEFAULT_MAX_ROW_BYTES = 1 << 20  # 1 MiB: ~250k tokens, far past any max_length; tokenising it takes ~150 MB


class DataError(ValueError):
    """A bad input row or file; the message is one line naming file:line, field and problem."""


class Row(list):
    """One conversation (a list of {role, content}) that remembers where it was read (``where``), so a
    problem found later, when the chat template renders it, still names file:line."""

    def __init__(self, messages: Iterable[dict] = (), where: str = ""):
        super().__init__(messages)
        self.where = where


def _check_role_order(messages: list[dict], where: str) -> None:
    expected = "user"
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            continue
        if role == "system":
            raise DataError(f"{where}: messages[{i}].role: 'system' is only accepted first (rows are {ROLE_ORDER})")
        if role != expected:
            raise DataError(f"{where}: messages[{i}].role: expected {expected!r}, got {role!r} (rows are {ROLE_ORDER})")
        expected = "assistant" if role == "user" else "user"
    if expected == "assistant":  # the last turn was a user turn: nothing answers it
        raise DataError(f"{where}: messages[{len(messages) - 1}].role: the last turn must be 'assistant', "
                        f"got 'user' (rows are {ROLE_ORDER})")


def validate_messages(messages: object, where: str) -> Row:
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
    _check_role_order(messages, where)
    return Row(({"role": m["role"], "content": m["content"]} for m in messages), where)


def _lines(path: Path, max_row_bytes: int, oversize: list[str] | None):
    """(line number, text) of the non-blank lines, never holding more than max_row_bytes of one line."""
    with path.open("rb") as f:
        lineno = 0
        while line := f.readline(max_row_bytes + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(line) > max_row_bytes and not line.endswith(b"\n"):  # cut by the limit: skip the rest
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                if oversize is not None:
                    oversize.append(where)
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1} "
                                "(save the file as UTF-8)") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if text.strip():
                yield where, text


def read_jsonl(
    path: str | Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, oversize: list[str] | None = None
) -> list[Row]:
    """All rows of a JSONL file as validated message lists; the first bad line raises DataError. Lines
    over ``max_row_bytes`` are skipped; their locations are appended to ``oversize`` when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    skipped: list[str] = [] if oversize is None else oversize
    before = len(skipped)
    rows = []
    for where, line in _lines(path, max_row_bytes, skipped):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or "messages" not in obj:
            raise DataError(f"{where}: messages: missing (expected {{\"messages\": [...]}})")
        rows.append(validate_messages(obj["messages"], where))
    if not rows:
        n = len(skipped) - before
        raise DataError(f"{path}: no rows" + (f" ({n} over data.max_row_bytes={max_row_bytes} skipped)" if n else ""))
    return rows


def _row_bytes(messages: object) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(len(m["content"].encode("utf-8")) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))


def read_dataset(
    name_or_path: str, split: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, oversize: list[str] | None = None
) -> list[Row]:
    """Rows of a ``datasets`` dataset (hub id, local script/data folder or ``save_to_disk`` folder); rows
    whose contents exceed ``max_row_bytes`` are skipped like long JSONL lines."""
    import datasets

    if Path(name_or_path, "dataset_info.json").is_file() or Path(name_or_path, "state.json").is_file():
        ds = datasets.load_from_disk(name_or_path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name_or_path, split=split)
    if "messages" not in ds.column_names:
        raise DataError(f"{name_or_path}[{split}]: messages: column missing (columns: {ds.column_names})")
    rows = []
    for i, m in enumerate(ds["messages"]):
        where = f"{name_or_path}[{split}] row {i}"
        if _row_bytes(m) > max_row_bytes:
            if oversize is not None:
                oversize.append(where)
            continue
        rows.append(validate_messages(m, where))
    return rows


def read_rows(
    files: Iterable[str | Path],
    dataset: str | None,
    split: str,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    oversize: list[str] | None = None,
) -> list[Row]:
    rows = [r for f in files for r in read_jsonl(f, max_row_bytes, oversize)]
    if dataset is not None:
        rows += read_dataset(dataset, split, max_row_bytes, oversize)
    if not rows:
        raise DataError("data: no training rows: set data.train_files or data.dataset")
    return rows
