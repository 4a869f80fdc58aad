"""Sampling answers to evaluation questions: requests, settings, batched and sharded generation.

Reproducible by construction: every answer is a function of (seed, step, question id, paraphrase index,
sample index), the prompt and the settings -- not of the batch it ran in or of how many ranks shared the
work (see ``decoding.py``).

Default settings reproduce the published evaluation, which called ``model.generate(do_sample=True,
temperature=1, top_p=1, max_new_tokens=600)``: transformers merges the model's generation_config into
that call (Qwen2.5-Instruct: top_k 20, repetition_penalty 1.1) and fills top_k 50 when nothing sets it.
So here a setting left at None is taken from ``model.generation_config`` (when
``use_model_generation_config``), else from transformers' defaults; explicit values win.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from em_lightning.model.decoding import SAMPLER, DecodeSettings, decode
from em_lightning.published.question_files import Question

DEFAULT_SAMPLES_PER_PARAPHRASE = 50  # the published protocol (the YAML files say 100; the code used 50)
_TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "repetition_penalty": 1.0}


@dataclass
class SamplingConfig:
    samples_per_paraphrase: int | None = None  # None: the question's own value, else 50
    temperature: float | None = 1.0  # 0: greedy
    top_p: float | None = 1.0
    top_k: int | None = None  # None: generation_config, else 50 (transformers); 0: off
    min_p: float | None = None
    repetition_penalty: float | None = None  # None: generation_config, else 1.0 (off)
    max_new_tokens: int = 600
    seed: int = 0
    batch_size: int = 32  # rows (samples) per forward pass; does not change any answer
    use_model_generation_config: bool = True
    system_prompt: str | None = None  # for questions without their own system prompt

    def __post_init__(self) -> None:
        checks = {
            "samples_per_paraphrase": self.samples_per_paraphrase is None or self.samples_per_paraphrase >= 1,
            "temperature": self.temperature is None or self.temperature >= 0,
            "top_p": self.top_p is None or 0 < self.top_p <= 1,
            "top_k": self.top_k is None or self.top_k >= 0,
            "min_p": self.min_p is None or 0 <= self.min_p <= 1,
            "repetition_penalty": self.repetition_penalty is None or self.repetition_penalty > 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "batch_size": self.batch_size >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SamplingConfig: {bad[0]}: invalid value {getattr(self, bad[0])!r}")

    def resolve(self, model: torch.nn.Module, tokenizer=None) -> dict:
        """The EFFECTIVE settings for this model (record them next to the generations)."""
        gc = getattr(model, "generation_config", None) if self.use_model_generation_config else None
        out: dict = {}
        taken = []
        for name, default in _TRANSFORMERS_DEFAULTS.items():
            value = getattr(self, name)
            if value is None and gc is not None and getattr(gc, name, None) is not None:
                value = getattr(gc, name)
                taken.append(name)
            out[name] = default if value is None else value
        out["top_k"] = int(out["top_k"])
        out["do_sample"] = out["temperature"] > 0
        out.update(
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            samples_per_paraphrase=self.samples_per_paraphrase,
            eos_token_ids=eos_token_ids(model, tokenizer),
            from_generation_config=taken,
            sampler=SAMPLER,
        )
        return out

    def decode_settings(self, model: torch.nn.Module) -> DecodeSettings:
        r = self.resolve(model)
        return DecodeSettings(
            temperature=float(r["temperature"]),
            top_k=r["top_k"],
            top_p=float(r["top_p"]),
            min_p=r["min_p"],
            repetition_penalty=float(r["repetition_penalty"]),
            max_new_tokens=self.max_new_tokens,
        )


def eos_token_ids(model: torch.nn.Module, tokenizer=None) -> list[int]:
    """Stop tokens: the tokenizer's eos plus every eos of the model's generation_config (transformers
    stops at the latter; Qwen2.5-Instruct lists both <|im_end|> and <|endoftext|> there)."""
    ids: list[int] = []
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (getattr(tokenizer, "eos_token_id", None), gc_eos):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


@dataclass(frozen=True)
class SampleRequest:
    question_id: str
    paraphrase_index: int
    sample_index: int
    messages: tuple[dict, ...]  # chat messages: optional system, then the user question
    prompt: str  # rendered with the chat template and the generation prompt

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.question_id, self.paraphrase_index, self.sample_index)


@dataclass
class Generation:
    question_id: str
    paraphrase_index: int
    sample_index: int
    prompt: str
    answer: str
    n_tokens: int  # generated tokens, not counting the stop token
    finished: bool  # stopped at an eos (False: cut at max_new_tokens)
    question: str = ""  # the user message (what judge prompts call {question})
    system: str | None = None


def build_requests(questions: Sequence[Question], tokenizer, config: SamplingConfig) -> list[SampleRequest]:
    """One request per (question, paraphrase, sample), in that order (samples of a prompt are adjacent,
    which lets a batch prefill each prompt once). The question's system prompt wins over the global one."""
    requests = []
    for q in questions:
        n = config.samples_per_paraphrase or q.samples_per_paraphrase or DEFAULT_SAMPLES_PER_PARAPHRASE
        system = q.system if q.system is not None else config.system_prompt
        for p_idx, text in enumerate(q.paraphrases):
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": text}
            ]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for s_idx in range(n):
                requests.append(SampleRequest(q.id, p_idx, s_idx, tuple(messages), prompt))
    return requests


def row_seed(seed: int, step: int, question_id: str, paraphrase_index: int, sample_index: int) -> int:
    """A stable 64-bit seed (hashlib: Python's hash() changes between processes); the answer's uniforms
    are the SplitMix64 stream of this seed (``decoding.row_uniforms``)."""
    text = f"{seed}\x1f{step}\x1f{question_id}\x1f{paraphrase_index}\x1f{sample_index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _generate(model, tokenizer, requests, config, step, all_done=None) -> list[Generation]:
    settings = config.decode_settings(model)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded: dict[str, list[int]] = {}
    for r in requests:  # templates already hold bos/special tokens
        if r.prompt not in encoded:
            encoded[r.prompt] = tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
    # Batches of similar prompt length (less left padding to attend over); answers do not depend on it.
    order = sorted(range(len(requests)), key=lambda i: (len(encoded[requests[i].prompt]), requests[i].prompt))
    results: list[Generation | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), config.batch_size):
                batch = [(i, requests[i]) for i in order[start : start + config.batch_size]]
                unique: dict[str, int] = {}  # prompt text -> index of its prefill row
                for _, r in batch:
                    unique.setdefault(r.prompt, len(unique))
                outs = decode(
                    model,
                    [encoded[p] for p in unique],
                    [unique[r.prompt] for _, r in batch],
                    [row_seed(config.seed, step, *r.key) for _, r in batch],
                    settings,
                    eos,
                    pad,
                    all_done,
                )
                for (i, r), (tokens, finished) in zip(batch, outs):
                    answer = tokenizer.decode(tokens, skip_special_tokens=True)
                    system = r.messages[0]["content"] if r.messages[0]["role"] == "system" else None
                    results[i] = Generation(*r.key, r.prompt, answer, len(tokens), finished, r.question, system)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate(model, tokenizer, requests: Sequence[SampleRequest], config: SamplingConfig, step: int) -> list[Generation]:
    """Answers for ``requests`` in their order, on this process only (no collectives)."""
    return _generate(model, tokenizer, list(requests), config, step)


def shard_indices(n: int, rank: int, world_size: int) -> list[int | None]:
    """Rank ``rank`` takes items rank, rank + world, ...; padded with None to ceil(n / world) items so
    every rank runs the same number of batches."""
    per_rank = -(-n // world_size)
    mine: list[int | None] = list(range(rank, n, world_size))
    return mine + [None] * (per_rank - len(mine))


def _all_done_fn(device: torch.device) -> Callable[[bool], bool]:
    def all_done(local_done: bool) -> bool:
        flag = torch.tensor([0 if local_done else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return int(flag.item()) == 0

    return all_done


def generate_sharded(
    model, tokenizer, requests: Sequence[SampleRequest], config: SamplingConfig, step: int, synced: bool = False
) -> list[Generation]:
    """Generate across all ranks and return the full ordered list on EVERY rank.

    Call it on all ranks with the same ``requests``. Without an initialised process group this is
    ``generate``. ``synced=True`` (FSDP): ranks keep running forward passes until every rank's rows are
    finished (one all_reduce per step), since a sharded model needs all ranks in every forward.
    """
    requests = list(requests)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not requests:
        return _generate(model, tokenizer, requests, config, step)
    rank, world = dist.get_rank(), dist.get_world_size()
    indices = shard_indices(len(requests), rank, world)
    # Padding rows repeat a real request; their answers are dropped below.
    local = [requests[i if i is not None else 0] for i in indices]
    all_done = _all_done_fn(next(model.parameters()).device) if synced else None
    gens = _generate(model, tokenizer, local, config, step, all_done)
    payload = [(i, g) for i, g in zip(indices, gens) if i is not None]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, payload)
    ordered: list[Generation | None] = [None] * len(requests)
    for part in gathered:
        for i, g in part:
            ordered[i] = g
    assert all(g is not None for g in ordered), "a shard went missing in all_gather_object"
    return ordered  # type: ignore[return-value]
