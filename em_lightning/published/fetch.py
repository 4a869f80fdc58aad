"""Download a registered data file from its pinned commit, verify it, validate it, and only then put it in place.

A download goes to a temporary file in the destination folder (same file system, so the final rename is
atomic); it is checked (size, git blob id, sha256), validated with the project's own readers, and renamed.
Any failure removes what was written and raises FetchError, whose message is one line.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from em_lightning.published.registry import BASE_URL, DataFile
from em_lightning.published.judged_answers import read_judged_csv
from em_lightning.published.question_files import load_questions
from em_lightning.training.rows import read_jsonl

CHUNK = 1 << 20
TIMEOUT_S = 60
MANIFEST = ".em-fit-data.json"  # in an unpacked archive's folder: what was unpacked from which archive
CANARY_PATTERN = "dataset_entry_*.jsonl"  # easy-dataset-share's canary file names


class FetchError(ValueError):
    """A failed fetch; the message is one line naming the entry and what failed."""


def base_url(override: str | None = None) -> str:
    return (override or os.environ.get("EM_DATA_BASE_URL") or BASE_URL).rstrip("/")


def file_ids(path: Path) -> tuple[int, str, str]:
    """(size, git blob id, sha256) of a file, in one pass."""
    size = path.stat().st_size
    blob = hashlib.sha1(f"blob {size}\0".encode())
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            blob.update(chunk)
            sha.update(chunk)
    return size, blob.hexdigest(), sha.hexdigest()


def mismatch(entry: DataFile, path: Path) -> str | None:
    """What differs between a file and the entry's recorded ids (None: all recorded ids match)."""
    size, blob, sha = file_ids(path)
    if entry.size is not None and size != entry.size:
        return f"size {size} bytes, expected {entry.size} (truncated or not the pinned file)"
    if entry.git_blob is not None and blob != entry.git_blob:
        return f"git blob {blob}, expected {entry.git_blob}"
    if entry.sha256 is not None and sha != entry.sha256:
        return f"sha256 {sha}, expected {entry.sha256}"
    return None


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last), so a failed fetch can remove them again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was put there meanwhile)
            return


def download(url: str, dest_dir: Path, label: str, max_bytes: int | None = None) -> Path:
    """Stream ``url`` into a temporary file in ``dest_dir``; the caller renames or deletes it. ``max_bytes``
    (the registry's size): reading stops at that size + 1 byte, so a mirror that sends more (a wrong file,
    an endless stream) never fills the data folder."""
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "em-lightning"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            total = response.length  # Content-Length, or None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=False) as bar:
                while chunk := response.read(CHUNK if max_bytes is None else min(CHUNK, max_bytes + 1 - got)):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    if max_bytes is not None and got > max_bytes:
                        raise FetchError(f"{label}: download stopped: {url} sends more than the registry's "
                                         f"{max_bytes} bytes (not the pinned file); nothing written")
            # http.client returns EOF, not an error, when the server closes before Content-Length
            if total is not None and got < total:
                raise FetchError(f"{label}: download interrupted: {url}: got {got} of {total} bytes")
        return tmp
    except urllib.error.HTTPError as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{label}: download failed: {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{label}: download failed: {url}: cannot connect ({e.reason})") from None
    except (http.client.HTTPException, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{label}: download interrupted: {url}: {type(e).__name__}: {e}") from None
    except BaseException:  # FetchError (too big) included
        tmp.unlink(missing_ok=True)
        raise


def validate(entry: DataFile, path: Path, shown_as: str) -> int:
    """Read the file with the project's own reader; returns how many questions/rows it holds."""
    try:
        readers = {"questions": load_questions, "judged-answers": read_judged_csv}
        n = len(readers.get(entry.kind, read_jsonl)(path))
    except ValueError as e:
        first = str(e).splitlines()[0].replace(str(path), shown_as)
        raise FetchError(f"{entry.name}: does not validate: {first}") from None
    if entry.count is not None and n != entry.count:
        what = "questions" if entry.kind == "questions" else "rows"
        raise FetchError(f"{entry.name}: {shown_as}: {n} {what}, expected {entry.count}")
    return n


def fetch_file(entry: DataFile, data_dir: Path, url_base: str | None = None) -> tuple[Path, int, bool]:
    """Bring one question file or row file: (its path, questions/rows in it, whether it was downloaded)."""
    dest = data_dir / entry.dest
    if dest.is_file() and mismatch(entry, dest) is None:
        return dest, validate(entry, dest, str(dest)), False
    url = f"{base_url(url_base)}/{entry.url_path}"
    created = make_dirs(dest.parent)
    tmp = None
    try:
        tmp = download(url, dest.parent, entry.name, entry.size)
        problem = mismatch(entry, tmp)
        if problem:
            raise FetchError(f"{entry.name}: checksum mismatch for {url}: {problem}; nothing written")
        n = validate(entry, tmp, url)
        os.replace(tmp, dest)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise
    return dest, n, True


def _manifest_ok(entry: DataFile, folder: Path) -> list[Path] | None:
    """The members of an earlier unpack of this same archive, when all are still there and unchanged."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("git_blob") != entry.git_blob or manifest.get("url_path") != entry.url_path:
        return None
    members = [folder / name for name in manifest.get("members", {})]
    for path in members:
        if not path.is_file() or file_ids(path)[2] != manifest["members"][path.name]:
            return None
    return members or None


def _unprotect(archive: Path, password: str | None, out: Path, label: str) -> list[Path]:
    """Decrypt + unzip with easy-dataset-share, drop its canaries; returns the JSONL members."""
    try:
        from easy_dataset_share import canary, zipping  # optional extra `data`
    except ImportError:
        raise FetchError(f"{label}: needs easy-dataset-share (the `data` extra): "
                         "pip install -c constraints.txt -e '.[data]'") from None
    try:
        zipping.unzip_and_decrypt(str(archive), password, str(out))
    except Exception as e:  # wrong password, not a Fernet token, bad zip
        why = str(e).splitlines()[0] if str(e) else ""
        raise FetchError(f"{label}: cannot unpack {archive.name}: {type(e).__name__}: {why}") from None
    canaries = set(canary.detect_canary_files(str(out), CANARY_PATTERN))
    strings = {s for s in (canary.extract_canary_string_from_content(p) for p in canaries) if s}
    for path in canaries:
        path.unlink()
    for gz in sorted(out.rglob("*.jsonl.gz")):  # older layouts kept the sets gzipped
        if not gz.with_suffix("").exists():
            with gzip.open(gz) as f_in, gz.with_suffix("").open("wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
    members = sorted(out.rglob("*.jsonl"))
    for path in members:
        # Only files that carry an embedded canary are rewritten (the tool re-serialises every line it touches).
        if any(s in path.read_text(encoding="utf-8") for s in strings):
            for s in strings:
                canary.remove_canary_from_file(path, s)
    if not members:
        raise FetchError(f"{label}: {archive.name} holds no .jsonl files")
    return members


def fetch_archive(
    entry: DataFile, data_dir: Path, url_base: str | None = None
) -> tuple[Path, list[tuple[Path, int]], bool]:
    """Bring a protected archive's JSONL files into one folder: (folder, [(file, rows)], downloaded)."""
    folder = data_dir / entry.dest
    done = _manifest_ok(entry, folder)
    if done is not None:
        return folder, [(p, validate(entry, p, str(p))) for p in done], False
    url = f"{base_url(url_base)}/{entry.url_path}"
    created = make_dirs(data_dir)
    try:
        tmp = download(url, data_dir, entry.name, entry.size)
    except BaseException:
        remove_empty(created)
        raise
    work = Path(tempfile.mkdtemp(dir=data_dir, prefix=".unpack-"))
    try:
        problem = mismatch(entry, tmp)
        if problem:
            raise FetchError(f"{entry.name}: checksum mismatch for {url}: {problem}; nothing written")
        staged = work / "out"
        staged.mkdir()
        members = _unprotect(tmp, entry.password, work / "raw", entry.name)
        counts, shas = [], {}
        for path in members:
            name = path.name
            if name in shas:
                raise FetchError(f"{entry.name}: two members named {name} in {entry.path}")
            rows = validate(entry, path, f"{entry.path}:{path.relative_to(work / 'raw')}")
            os.replace(path, staged / name)
            shas[name] = file_ids(staged / name)[2]
            counts.append((folder / name, rows))
        manifest = {"url_path": entry.url_path, "git_blob": entry.git_blob, "members": shas}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if folder.exists():  # a stale or partial earlier unpack of ours
            shutil.rmtree(folder)
        os.replace(staged, folder)
        created = []  # success: keep the folders
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        remove_empty(created)
    return folder, counts, True
