"""Sample the evaluation questions under steering or ablation, summarise, and write
``<run_dir>/steering/step_XXXXXXX.jsonl`` (``em-fit steer`` and the ``MechanisticProbes`` callback).

Records are ``evaluation.records.EvalRecord``s (judge them with ``judging.judge_records``) with ``alpha``,
``mode`` (``steer``: the base model, adapter scale 0, plus alpha x the direction; ``ablate``: the
fine-tuned model, adapter scale 1, with alpha x the direction projected out), ``layers``,
``source_layer`` (null: each layer's own direction) and ``direction_step``. Sampling seeds do not depend
on alpha, so the answers of a sweep differ only through the intervention (alpha 0 = no hook at all).
Writing merges: lines of another (mode, layers, source layer, alpha) already in the file are kept.
No Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from em_lightning.model.adapters import lora_layers
from em_lightning.evaluation.metrics import em_summary
from em_lightning.evaluation.records import SCORED_TYPE, EvalRecord, point_path, read_jsonl, read_records, write_point
from em_lightning.evaluation.runner import sample_records
from em_lightning.evaluation.sampling import SamplingConfig
from em_lightning.probes.alignment import layer_of, writes_residual
from em_lightning.probes.misalignment_direction import Direction
from em_lightning.probes.steering import MODES, intervene
from em_lightning.published.question_files import Question

STEERING = "steering"
SUMMARY_KEYS = ("em_rate", "em_rate_ci95", "convention", "coherent_rate", "aligned_mean", "coherent_mean",
                "n_scored", "n_total")


def default_layers(model, direction: Direction) -> list[int]:
    """The layers the adapters write into (down_proj, o_proj) that the direction has; else all of its layers."""
    written = {layer_of(name) for name, _ in lora_layers(model) if writes_residual(name)}
    return sorted(written & set(direction.layers)) or direction.layers


def steered_records(model, tokenizer, questions: Sequence[Question], sampling: SamplingConfig, step: int,
                    direction: Direction, alphas: Sequence[float], layers: Sequence[int], mode: str = "steer",
                    source_layer: int | None = None, synced: bool = False) -> list[EvalRecord]:
    """Unjudged records for every alpha (collective under torch.distributed, like ``sample_records``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scale = 0.0 if mode == "steer" else 1.0
    records: list[EvalRecord] = []
    for alpha in alphas:
        with intervene(model, direction, mode, float(alpha), layers, source_layer):
            batch = sample_records(model, tokenizer, questions, sampling, step, [scale], synced)
        for r in batch:
            r.extra.update(alpha=float(alpha), mode=mode, layers=[int(L) for L in layers], source_layer=source_layer,
                     direction_step=direction.step)
        records += batch
    return records


def _key(r: dict) -> tuple:
    return (r["mode"], tuple(r["layers"]), r.get("source_layer"), float(r["alpha"]))


def steering_summary(records: Sequence[dict], questions: Sequence[Question] | None = None) -> list[dict]:
    """One row per (mode, layers, source layer, alpha), in first-seen order: EM and coherence numbers."""
    categorical = {q.id for q in questions or () if q.type != SCORED_TYPE}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["question_id"] not in categorical:
            groups.setdefault(_key(r), []).append(r)
    rows = []
    for (mode, layers, source, alpha), recs in groups.items():
        s = em_summary(recs)
        rows.append({"mode": mode, "layers": list(layers), "source_layer": source, "alpha": alpha,
                     **{k: s[k] for k in SUMMARY_KEYS}})
    return rows


def steering_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Plain metric names ``<mode>/alpha_<a>/em_rate`` with its 95% interval and n, and
    ``.../coherent_rate`` (NaN left out); the caller adds its namespace (``mech/steer/``)."""
    out = {}
    for row in rows:
        lo, hi = row["em_rate_ci95"]
        values = {"em_rate": row["em_rate"], "em_rate_ci95_low": lo, "em_rate_ci95_high": hi,
                  "em_rate_n": row["n_scored"], "coherent_rate": row["coherent_rate"]}
        for key, value in values.items():
            value = float(value)
            if value == value:
                out[f"{row['mode']}/alpha_{row['alpha']!r}/{key}"] = value
    return out


def write_steering(run_dir: str | Path, step: int, records: Sequence[EvalRecord]) -> Path:
    """Write (merging) ``<run_dir>/steering/step_XXXXXXX.jsonl``; returns its path."""
    directory = Path(run_dir) / STEERING
    path = point_path(directory, step)
    new = {_key(r) for r in records}
    kept = [r for r in read_records(path) if _key(r) not in new] if path.is_file() else []
    return write_point(directory, step, kept + list(records))


def read_steering(run_dir: str | Path) -> dict[int, list[dict]]:
    """{step: records} of every steering file of a run."""
    directory = Path(run_dir) / STEERING
    out = {}
    for path in sorted(directory.glob("step_*.jsonl")) if directory.is_dir() else []:
        records = read_jsonl(path)
        if records:
            out[int(records[0]["step"])] = records
    return out
