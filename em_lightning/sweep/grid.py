"""A sweep grid: ``GRID.yaml`` maps dotted em-fit option names to lists of values; every combination is
one cell (one run). ``seed_everything`` is the seed axis (summaries average over it); ``config`` lists
extra config files merged after the base configs (a defense preset; ``null`` = none); any other key is
passed as ``--<key> <value>`` to ``em-fit fit``. A key with a single value applies to every cell and is
left out of the cells' labels."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SEED_KEY = "seed_everything"
CONFIG_KEY = "config"
_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_+]*)*")


@dataclass(frozen=True)
class Cell:
    index: int
    values: dict[str, Any]  # every grid key -> this cell's value
    varying: tuple[str, ...]  # the keys with more than one value in the grid, in grid order

    @property
    def setting(self) -> dict[str, Any]:
        """The values that vary across the grid, seed excluded: what the seeds of one setting share."""
        return {k: self.values[k] for k in self.varying if k != SEED_KEY}

    @property
    def seed(self) -> Any:
        return self.values.get(SEED_KEY)

    @property
    def name(self) -> str:
        """A folder name that says what the cell is: ``003-model.lr=2e-05-seed_everything=1``."""
        parts = [f"{key}={value_label(key, self.values[key])}" for key in self.varying]
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join([f"{self.index:03d}", *parts]))[:150]

    def args(self) -> list[str]:
        """em-fit fit arguments of this cell (after the base configs)."""
        out: list[str] = []
        for key, value in self.values.items():
            if key == CONFIG_KEY:
                for file in _config_files(value):
                    out += ["--config", file]
            else:
                out += [f"--{key}", format_value(value)]
        return out


def value_label(key: str, value: Any) -> str:
    """Short label of a value: a config file by its stem (``kl`` for configs/callbacks/defenses/kl.yaml), none: ``none``."""
    if key == CONFIG_KEY:
        files = _config_files(value)
        return "+".join(Path(f).stem for f in files) or "none"
    return format_value(value)


def format_value(value: Any) -> str:
    """A value as one command-line word jsonargparse reads back as the same value (YAML flow style)."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _config_files(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def parse_grid(grid: Any, source: str = "grid") -> dict[str, list]:
    """Check a loaded grid: a non-empty mapping of option names to non-empty lists. ValueError naming the key."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{source}: expected a mapping of option names to lists of values, e.g. "
                         f"'{SEED_KEY}: [0, 1, 2]'")
    for key, values in grid.items():
        if not isinstance(key, str) or not _OPTION.fullmatch(key):
            raise ValueError(f"{source}: {key!r}: expected a dotted em-fit option name such as model.lr")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: {key}: expected a non-empty list of values, got {values!r}")
        if key == CONFIG_KEY:
            for v in values:
                if not (v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(f, str) for f in v))):
                    raise ValueError(f"{source}: {CONFIG_KEY}: expected config file paths (or null), got {v!r}")
        labels = [value_label(key, v) for v in values]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{source}: {key}: repeated value in {values!r}")
    return dict(grid)


def load_grid(path: str | Path) -> dict[str, list]:
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the grid ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_grid(grid, str(path))


def expand(grid: dict[str, list]) -> list[Cell]:
    """Every combination, the last key varying fastest (so with the seed key last, a setting's seeds are
    neighbours)."""
    keys = list(grid)
    varying = tuple(k for k in keys if len(grid[k]) > 1)
    return [Cell(i, dict(zip(keys, combo)), varying) for i, combo in enumerate(itertools.product(*grid.values()))]
