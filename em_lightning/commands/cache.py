"""``em-fit cache list`` / ``em-fit cache clean [--all]``: the fp32 folders converted from GGUF files.

    em-fit cache list          # every folder: size, the GGUF file and hub id it came from, current or stale
    em-fit cache clean         # remove the stale ones (interrupted, another transformers version, file gone)
    em-fit cache clean --all   # remove every folder (the next load converts again, ~20 s for SmolLM2-135M)
"""

from __future__ import annotations

import argparse

from em_lightning.commands import help_parser
from em_lightning.model.gguf_cache import cache_entries, cache_root, remove_entry


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _list() -> None:
    entries = cache_entries()
    root = cache_root() / "gguf"
    if not entries:
        print(f"{root}: empty (GGUF base models are converted here on first load)")
        return
    for e in entries:
        src = e["source"]
        hub = f", hub id {src['source_hub_id']}" if src.get("source_hub_id") else ""
        state = "current" if e["stale"] is None else f"stale: {e['stale']}"
        print(f"{e['folder']}  {_mb(e['bytes'])}  {state}")
        if src.get("gguf"):
            sha = f"sha256 {src['sha256'][:12]}..." if src.get("sha256") else "no sha256 recorded"
            print(f"    from {src['gguf']} ({sha}{hub})")
    total = sum(e["bytes"] for e in entries)
    stale = sum(e["bytes"] for e in entries if e["stale"] is not None)
    print(f"{len(entries)} folder(s), {_mb(total)} in {root}; `em-fit cache clean` frees {_mb(stale)} "
          "(--all: everything)")


def _clean(everything: bool) -> None:
    freed = 0
    for e in cache_entries():
        if everything or e["stale"] is not None:
            remove_entry(e["folder"])
            freed += e["bytes"]
            print(f"removed {e['folder']} ({_mb(e['bytes'])}; {e['stale'] or 'current'})")
    print(f"freed {_mb(freed)} in {cache_root() / 'gguf'}")


def main(argv: list[str]) -> None:
    p = help_parser("em-fit cache", __doc__)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every converted folder, its size and source")
    clean = sub.add_parser("clean", help="remove the folders no current GGUF file uses")
    clean.add_argument("--all", action="store_true", help="remove every folder")
    args = p.parse_args(argv)
    if args.action == "list":
        _list()
    else:
        _clean(args.all)
