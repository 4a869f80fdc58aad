"""ChatDataModule: chat rows -> chat template -> input_ids + assistant-only labels, seeded held-out split."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from em_lightning.defenses.inoculation import Inoculation, inoculate
from em_lightning.defenses.interleave import Interleave, InterleavedEpochSampler
from em_lightning.training.masking import IGNORE_INDEX, ChatTemplateError, collate, tokenize_chat
from em_lightning.model.loading import ModelSpec, load_tokenizer
from em_lightning.training.resumable import ResumableDataLoader, ShardedEpochSampler, epoch_order
from em_lightning.training.rows import DEFAULT_MAX_ROW_BYTES, DataError, read_rows


@dataclass
class DataStats:
    rows: int = 0
    train: int = 0
    val: int = 0
    truncated: int = 0
    dropped: int = 0  # every row left out: over max_length with overlength drop, or no labelled token
    unlabelled: int = 0  # of which: no assistant token left to train on (after the cut, or none at all)
    val_capped_from: int | None = None  # held-out rows before data.val_max_rows capped them
    val_tokens: int = 0
    train_tokens: int = 0
    label_tokens: int = 0


def label_count(labels: list[int]) -> int:
    """Tokens a row trains on: labelled positions after the shift (position 0 is never a target)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class ChatDataModule(pl.LightningDataModule):
    """Chat fine-tuning data with loss on assistant tokens only.

    Args:
        train_files: JSONL files of ``{"messages": [...]}`` rows (one path or a list).
        dataset: a ``datasets`` dataset with a ``messages`` column (hub id or local folder), added to the files.
        dataset_split: split of ``dataset`` to read.
        val_fraction: share of rows held out for validation loss (seeded split; 0 disables validation).
        val_max_rows: at most this many held out (the rest train), so that a large data set's val/loss
            stays a bounded share of the run's compute; the schedule and its estimated cost are printed
            at the start. null: no cap.
        system_prompt: system message added to rows that have none.
        max_length: longest tokenised row.
        overlength: ``truncate`` cuts rows at max_length (as TRL does), ``drop`` removes them; rows left
            with no labelled token are dropped either way. Counts are logged.
        batch_size: rows per device per step (before gradient accumulation).
        num_workers: dataloader worker processes.
        shuffle: shuffle training rows each epoch (seeded).
        split_seed: seed of the held-out split and the epoch order.
        template_kwargs: extra chat-template variables, e.g. ``{date_string: 26 Jul 2024}`` for Llama 3.x.
        max_row_bytes: JSONL lines (or dataset rows' contents) longer than this many bytes are skipped
            unread and counted, so one huge row cannot exhaust memory; the default 1 MiB is far past any
            max_length.
        inoculation: a training-only instruction added to every row of the training files (train and
            held-out split; not to interleaved aligned rows), never to evaluation questions, which come from
            question files (configs/callbacks/defenses/inoculation.yaml).
        interleave: aligned rows in every training batch, an exact share of it (configs/callbacks/defenses/interleave.yaml).
        base: the model spec (linked from ``model.base`` by the CLI) whose tokenizer is used.
    """

    def __init__(
        self,
        train_files: list[str] | str | None = None,
        dataset: str | None = None,
        dataset_split: str = "train",
        val_fraction: float = 0.1,
        val_max_rows: int | None = 256,
        system_prompt: str | None = None,
        max_length: int = 2048,
        overlength: Literal["truncate", "drop"] = "truncate",
        batch_size: int = 2,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
        template_kwargs: dict | None = None,
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
        inoculation: Inoculation | None = None,
        interleave: Interleave | None = None,
        base: ModelSpec | None = None,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value, least in (("batch_size", batch_size, 1), ("max_length", max_length, 2),
                                   ("num_workers", num_workers, 0), ("max_row_bytes", max_row_bytes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"data.{name}: expected an integer >= {least}, got {value!r}")
        if val_max_rows is not None and (isinstance(val_max_rows, bool) or not isinstance(val_max_rows, int)
                                         or val_max_rows < 1):
            raise ValueError(f"data.val_max_rows: expected an integer >= 1 or null, got {val_max_rows!r}")
        self.val_max_rows = val_max_rows
        self.max_row_bytes = max_row_bytes
        self.inoculation, self.interleave = inoculation, interleave
        self.interleave_k = interleave.per_batch(batch_size) if interleave is not None else 0
        self.aligned_set: list[dict] = []
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files or [])
        self.dataset, self.dataset_split = dataset, dataset_split
        self.val_fraction, self.system_prompt = val_fraction, system_prompt
        self.max_length, self.overlength = max_length, overlength
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.split_seed, self.template_kwargs = split_seed, template_kwargs or {}
        self.base = base or ModelSpec()
        self.stats = DataStats()
        self._rows: list[list[dict]] | None = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []

    def load_rows(self) -> list[list[dict]]:
        """Read and validate every row (raises DataError naming file:line); cached."""
        if self._rows is None:
            oversize: list[str] = []
            self._rows = read_rows(self.train_files, self.dataset, self.dataset_split, self.max_row_bytes, oversize)
            if oversize:
                rank_zero_info(f"data: {len(oversize)} row(s) over data.max_row_bytes={self.max_row_bytes} skipped "
                               f"unread (first: {oversize[0]})")
        return self._rows

    def _encode(self, tokenizer, messages: list[dict], task_row: bool = True) -> dict | None:
        where = getattr(messages, "where", "") or "row"  # rows.Row keeps file:line for template errors
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if task_row and self.inoculation is not None:  # before a row's own (or data.system_prompt's) system text
            messages = inoculate(messages, self.inoculation)
        try:
            ids, labels = tokenize_chat(tokenizer, messages, self.template_kwargs)
        except ChatTemplateError as e:
            raise DataError(f"{where}: template: {e}") from None
        if len(ids) > self.max_length:
            if self.overlength == "drop":
                self.stats.dropped += 1
                return None
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            self.stats.truncated += 1
        if label_count(labels) == 0:
            self.stats.dropped += 1
            self.stats.unlabelled += 1
            return None
        return {"input_ids": ids, "labels": labels}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        rows = self.load_rows()
        tokenizer = load_tokenizer(self.base)
        self.pad_id = tokenizer.pad_token_id
        self.stats = DataStats(rows=len(rows))
        g = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(rows), generator=g).tolist()
        n_val = int(round(len(rows) * self.val_fraction))
        if self.val_fraction > 0 and len(rows) > 1:
            n_val = max(1, n_val)
        if self.val_max_rows is not None and n_val > self.val_max_rows:
            self.stats.val_capped_from, n_val = n_val, self.val_max_rows
        encoded = [self._encode(tokenizer, rows[i]) for i in order]
        self.val_set = [e for e in encoded[:n_val] if e is not None]
        self.train_set = [e for e in encoded[n_val:] if e is not None]
        if not self.train_set:
            raise ValueError("data: every training row was dropped (see data.max_length / data.overlength)")
        s = self.stats
        s.train, s.val = len(self.train_set), len(self.val_set)
        s.train_tokens = sum(len(e["input_ids"]) for e in self.train_set)
        s.label_tokens = sum(label_count(e["labels"]) for e in self.train_set)
        s.val_tokens = sum(len(e["input_ids"]) for e in self.val_set)
        if self.interleave is not None:
            aligned = read_rows(self.interleave.files, None, "train", self.max_row_bytes)
            self.aligned_set = [e for e in (self._encode(tokenizer, r, task_row=False) for r in aligned) if e is not None]
            if not self.aligned_set:
                raise ValueError("data.interleave.files: no aligned row left after encoding")
            rank_zero_info(f"data: interleaving {self.interleave_k} of every {self.batch_size} rows per batch from "
                           f"{len(self.aligned_set)} aligned rows ({', '.join(self.interleave.files)})")
        rank_zero_info(self._summary())

    def _summary(self) -> str:
        """What happened to the rows, in words: the split, what max_length cut or removed, what was dropped."""
        s = self.stats
        held = f"{s.val} held out for val/loss" + (
            f" ({s.val_capped_from} at data.val_fraction={self.val_fraction:g}, capped at data.val_max_rows="
            f"{self.val_max_rows})" if s.val_capped_from else "")
        parts = [f"data: {s.rows} rows -> {s.train} train, {held}"]
        if s.truncated:
            parts.append(f"{s.truncated} rows longer than data.max_length={self.max_length} tokens cut to it "
                         "(data.overlength: drop removes them instead)")
        if s.dropped - s.unlabelled:
            parts.append(f"{s.dropped - s.unlabelled} rows longer than data.max_length={self.max_length} tokens "
                         "removed (data.overlength: drop)")
        if s.unlabelled:
            parts.append(f"{s.unlabelled} rows dropped with no assistant token left to train on"
                         + (" (the cut at max_length took them all)" if s.truncated else ""))
        return "; ".join(parts) + f"; {s.label_tokens} labelled tokens to train on"

    def validation_size(self, accumulate: int = 1, world_size: int = 1) -> tuple[int, int, int | None, float]:
        """(held-out rows, their tokens, rows before the cap or None, training tokens per optimizer step of
        all ranks) for the validation plan's cost estimate."""
        s = self.stats
        per_batch = s.train_tokens / max(len(self.train_set), 1) * self.batch_size
        return s.val, s.val_tokens, s.val_capped_from, per_batch * accumulate * world_size

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batches_per_epoch(self, world_size: int | None = None) -> int:
        """Training batches each rank runs per epoch (equal shards); ``world_size``: before the trainer is
        attached (default: the attached trainer's)."""
        world = world_size if world_size is not None else self._rank_world()[1]
        return -(-(-(-len(self.train_set) // world)) // (self.batch_size - self.interleave_k))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        rows = self.train_set + self.aligned_set
        if self.interleave is not None:
            sampler = InterleavedEpochSampler(len(self.train_set), len(self.aligned_set), self.batch_size,
                                              self.interleave_k, self.split_seed, self.interleave.seed,
                                              self.shuffle, rank, world)
        else:
            sampler = ShardedEpochSampler(len(self.train_set), self.split_seed, self.shuffle, rank, world)
        return ResumableDataLoader(
            rows, sampler, label_counts=[label_count(e["labels"]) for e in rows],
            accumulate=accumulate, batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=functools.partial(collate, pad_id=self.pad_id),
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        # Equal shards (every rank runs the same batches); the wrapped padding rows carry no label, so
        # the token-weighted val/loss counts every held-out row exactly once.
        rank, world = self._rank_world()
        order = epoch_order(len(self.val_set), self.split_seed, 0, False, world)
        shard = [self.val_set[i] if k < len(self.val_set) else _unlabelled(self.val_set[i])
                 for k, i in enumerate(order) if k % world == rank]
        return DataLoader(shard, batch_size=self.batch_size, collate_fn=functools.partial(collate, pad_id=self.pad_id))


def _unlabelled(row: dict) -> dict:
    return {"input_ids": row["input_ids"], "labels": [IGNORE_INDEX] * len(row["labels"])}
