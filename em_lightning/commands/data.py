"""``em-fit data list`` / ``em-fit data fetch NAME... [--dir DIR]``: the published EM data, pinned and verified.

Files come from ``https://raw.githubusercontent.com/<repo>/<commit>/<path>`` (``--base-url`` or
``EM_DATA_BASE_URL`` replace the host part, e.g. a mirror or a test server). Errors are one line and exit 1.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from em_lightning.commands import help_parser
from em_lightning.published.fetch import FetchError, fetch_archive, fetch_file
from em_lightning.published.registry import BY_NAME, DEFAULT_DIR, ENTRIES, KINDS, DataFile


def _parser() -> argparse.ArgumentParser:
    p = help_parser("em-fit data", __doc__)
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="the registered question files and datasets")
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--verbose", "-v", action="store_true", help="also source, checksums and provenance")
    ls.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help=f"data folder to look in (default: {DEFAULT_DIR}/)")
    fetch = sub.add_parser("fetch", help="download, verify and validate files into the data folder")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="entries of `em-fit data list`")
    fetch.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help=f"data folder (default: {DEFAULT_DIR}/)")
    fetch.add_argument("--base-url", default=None,
                       help="replaces https://raw.githubusercontent.com (also: env EM_DATA_BASE_URL)")
    return p


def _checks(e: DataFile) -> str:
    blob = f"git blob {e.git_blob}" if e.git_blob else "git blob not recorded"
    sha = f"sha256 {e.sha256}" if e.sha256 else "sha256 unverified (not recorded)"
    return f"{blob}; {sha}" + (f"; {e.size} bytes" if e.size else "")


def _list(kind: str | None, verbose: bool, data_dir: Path) -> None:
    """One line per entry: name, kind, where fetch puts it, whether it is there already, its count."""
    for e in ENTRIES:
        if kind and e.kind != kind:
            continue
        count = f"{e.count} {'questions' if e.kind == 'questions' else 'rows'}" if e.count else ""
        dest = e.dest + ("/" if e.kind == "protected-archive" else "")
        there = "fetched" if (data_dir / e.dest).exists() else "-"  # `fetch` verifies its checksum again
        print(f"{e.name:28s} {e.kind:18s} {data_dir}/{dest:44s} {there:8s} {count}".rstrip())
        if verbose:
            for line in (e.about, f"{e.repo}@{e.commit}:{e.path}", _checks(e), f"verified: {e.note}"):
                print(f"{'':4s}{line}")


def _fetch(names: list[str], data_dir: Path, url_base: str | None) -> None:
    for name in names:  # all names first: a typo fails before any download
        if name not in BY_NAME:
            close = difflib.get_close_matches(name, BY_NAME, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see `em-fit data list`)"
            raise FetchError(f"data fetch: unknown name {name!r}{hint}")
    for name in dict.fromkeys(names):
        e = BY_NAME[name]
        if e.kind == "protected-archive":
            folder, members, fresh = fetch_archive(e, data_dir, url_base)
            print(f"{name}: {folder}/ ({'fetched' if fresh else 'already there, verified'})")
            for path, rows in members:
                print(f"  --data.train_files {path}   ({rows} rows)")
        else:
            path, n, fresh = fetch_file(e, data_dir, url_base)
            status = "fetched" if fresh else "already there, verified"
            use = {"rows": f"--data.train_files {path}", "questions": f"questions: {path}",
                   "judged-answers": f"em-fit judge calibrate --against {name} --data-dir {data_dir}"}[e.kind]
            print(f"{name}: {path} ({n} {'questions' if e.kind == 'questions' else 'rows'}, {status}); use: {use}")


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if args.action == "list":
        _list(args.kind, args.verbose, args.dir)
        return
    try:
        _fetch(args.names, args.dir, args.base_url)
    except OSError as e:  # e.g. the data folder cannot be created or written
        raise FetchError(f"data fetch: {type(e).__name__}: {e}") from None
