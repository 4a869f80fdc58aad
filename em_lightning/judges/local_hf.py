"""Judge with a local transformers causal LM: the exact expected score over the numbers 0..100.

Definition. For a rendered judge prompt x (as the user turn, followed by the assistant generation
prompt) and a number n in 0..100 with canonical token sequence t_1..t_k (the tokenizer's encoding of
str(n), no special tokens):

    P(n) = prod_j p(t_j | x, t_<j)  *  p(next token does not start with an ASCII digit | x, t_1..t_k)

The second factor says the number ends there: "1" is a prefix of "10" and "100", and without it the
mass of "1" would include theirs. A token "starts with a digit" when its raw vocabulary string does
(Qwen/Gemma single digits, Llama-3 "0".."999"). The events are disjoint, so sum_n P(n) <= 1; the
rest (refusals, words, non-canonical spellings such as "05") is lost mass. score = aggregate_score
over {"0": P(0), ..., "100": P(100)} (None when that mass is below 0.25).

Efficiency: the 101 token sequences form a trie (at most ~102 nodes, 3 deep for digit-split
tokenizers). Each batch is ONE forward: every row is the left-padded prompt followed by all trie
nodes, with a 4D attention mask that lets a node see the prompt and its own ancestors only, and
position ids that place a node at prompt_length + depth - 1. Logits are kept only for the last prompt
position and the nodes. Needs eager or sdpa attention (flash attention ignores custom masks).
Models that alternate sliding-window layers (config.layer_types, e.g. Gemma 3) get a second mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from em_lightning.model.decoding import DecodeSettings, decode, padded_positions
from em_lightning.model.padding import pad_sequences
from em_lightning.model.eval_mode import eval_no_grad
from em_lightning.model.loading import resolve_dtype

from em_lightning.judges.base import JudgeResult, aggregate_score

__all__ = ["LocalHFJudge"]

NUMBERS = [str(n) for n in range(101)]
_DIGITS = frozenset("0123456789")


class _NumberTrie:
    """Trie of the token sequences of "0".."100"; parents come before children."""

    def __init__(self, sequences: list[list[int]]) -> None:
        if any(not s for s in sequences) or len({tuple(s) for s in sequences}) != len(sequences):
            raise ValueError("the tokenizer does not give the numbers 0..100 distinct non-empty token sequences")
        index: dict[tuple[int, ...], int] = {}
        parent, token, depth = [], [], []
        for seq in sequences:
            for d in range(1, len(seq) + 1):
                prefix = tuple(seq[:d])
                if prefix not in index:
                    index[prefix] = len(token)
                    parent.append(index[prefix[:-1]] if d > 1 else -1)
                    token.append(seq[d - 1])
                    depth.append(d)
        n = len(token)
        ancestor_or_self = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                ancestor_or_self[i, j] = True
                j = parent[j]
        self.size = n
        self.parent = torch.tensor(parent)
        self.token = torch.tensor(token)
        self.depth = torch.tensor(depth)
        self.parent_row = torch.tensor(parent) + 1  # row in the kept logits; 0 = last prompt position
        self.ancestor_or_self = ancestor_or_self
        self.number_node = torch.tensor([index[tuple(s)] for s in sequences])


class LocalHFJudge:
    """Judge with an already loaded (model, tokenizer). `name` is the cache key part."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str | None = None,
        batch_size: int = 8,
        use_chat_template: bool = True,
        classify_max_new_tokens: int = 8,
        classify_top_k: int = 20,
    ) -> None:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa"):
            raise ValueError(f"LocalHFJudge needs eager or sdpa attention (custom masks), got {impl!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or f"local_hf:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.classify_max_new_tokens = classify_max_new_tokens
        self.classify_top_k = classify_top_k
        self._trie = _NumberTrie([tokenizer(s, add_special_tokens=False)["input_ids"] for s in NUMBERS])
        self._digit_cache: torch.Tensor | None = None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = pad if pad is not None else 0
        self._eos_ids = self._collect_eos_ids()

    def __repr__(self) -> str:
        return f"LocalHFJudge(name={self.name!r}, batch_size={self.batch_size})"

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype="auto", device: str | torch.device | None = None, **kwargs):
        """Load model + tokenizer (hub id or local folder) with sdpa attention, in eval mode. ``dtype`` as
        ``model.base.dtype`` reads it (models.resolve_dtype): ``auto`` is bf16 where the hardware has it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), attn_implementation="sdpa")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        kwargs.setdefault("name", f"local_hf:{name_or_path}")
        return cls(model, tokenizer, **kwargs)

    # ---- public API -------------------------------------------------------------------------------

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        results: list[JudgeResult | None] = [None] * len(prompts)
        with eval_no_grad(self.model):  # no dropout while judging
            for idx, batch in self._batches(prompts):
                probs_rows = self._number_logprobs(batch).exp().cpu().tolist()
                for i, row in zip(idx, probs_rows):
                    probs = dict(zip(NUMBERS, row))
                    results[i] = JudgeResult(score=aggregate_score(probs), probs=probs)
        return results  # type: ignore[return-value]

    def classify_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """Greedy answer (a few tokens) as label; probs = top-k of the first answer token."""
        results: list[JudgeResult | None] = [None] * len(prompts)
        with eval_no_grad(self.model):
            for idx, batch in self._batches(prompts):
                labels, firsts = self._greedy(batch)
                for i, label, dist in zip(idx, labels, firsts):
                    results[i] = JudgeResult(label=label, probs=dist)
        return results  # type: ignore[return-value]

    # ---- internals --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Token ids of the judge prompt as the user turn plus the assistant generation prompt."""
        tok = self.tokenizer
        if not self.use_chat_template:
            return tok(prompt)["input_ids"]
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tok(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS if any

    def _batches(self, prompts: Sequence[str]) -> list[tuple[list[int], list[list[int]]]]:
        """(original indices, token id lists) per batch, grouped by length so padding stays small."""
        encoded = [self.encode(p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        chunks = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        return [(idx, [encoded[i] for i in idx]) for idx in chunks]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _digit_ids(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Ids of tokens whose raw string starts with an ASCII digit (continuations of a number)."""
        if self._digit_cache is None:
            vocab_map = self.tokenizer.get_vocab()  # raw token string -> id, added tokens included
            ids = sorted(i for t, i in vocab_map.items() if t[:1] in _DIGITS)
            self._digit_cache = torch.tensor(ids, dtype=torch.long)
        return self._digit_cache[self._digit_cache < vocab].to(device)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, T)

    def _number_logprobs(self, batch: list[list[int]]) -> torch.Tensor:
        """(B, 101) float64 log P(n) as defined in the module docstring, one forward for the batch."""
        trie, dev = self._trie, self._device
        prompt, prompt_mask = pad_sequences(batch, self._pad_id, "left", dev)
        b, width, n = len(batch), prompt.shape[1], trie.size
        lens = prompt_mask.sum(1)
        pad = width - lens
        ids = torch.cat([prompt, trie.token.to(dev)[None].expand(b, n)], dim=1)

        arange = torch.arange(width, device=dev)
        positions = torch.cat(
            [(arange[None] - pad[:, None]).clamp(min=0), lens[:, None] + trie.depth.to(dev)[None] - 1], dim=1
        )
        real = arange[None] >= pad[:, None]  # (B, width): keys that are prompt, not padding
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(width, dtype=torch.bool, device=dev)
        top = (causal[None] & real[:, None]) | eye[None]  # a pad row sees itself: no fully masked row
        top = torch.cat([top, torch.zeros(b, width, n, dtype=torch.bool, device=dev)], dim=2)
        tree = trie.ancestor_or_self.to(dev).expand(b, n, n)  # a node sees its ancestors and itself
        bottom = torch.cat([real[:, None].expand(b, n, width), tree], dim=2)
        allowed = torch.cat([top, bottom], dim=1)  # (B, T, T)
        mask = self._additive(allowed)
        config = self.model.config
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            near = (positions[:, :, None] - positions[:, None, :]) < config.sliding_window
            mask = {"full_attention": mask, "sliding_attention": self._additive(allowed & near)}

        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=n + 1
        )
        # Normalisers summed in float64: a float32 softmax over a 150k vocabulary is off by ~3e-4.
        digits = self._digit_ids(out.logits.shape[-1], dev)
        parent_row, token = trie.parent_row.to(dev), trie.token.to(dev)
        edges, ends = [], []
        for logits in out.logits:  # row by row to bound memory; rows: last prompt position, then the nodes
            logits = logits.float()
            peak = logits.max(-1, keepdim=True).values
            log_total = peak.squeeze(-1).double() + (logits - peak).exp().sum(-1, dtype=torch.float64).log()
            edges.append(logits[parent_row, token].double() - log_total[parent_row])  # log p(token | parent)
            p_digit = (logits[1:, digits].double() - log_total[1:, None]).exp().sum(-1)
            ends.append(torch.log1p(-p_digit.clamp(max=1.0)))  # log p(the number ends here)
        path, log_end = torch.stack(edges), torch.stack(ends)  # (B, n) each
        for d in range(2, int(trie.depth.max()) + 1):  # parents come first: add their path level by level
            nodes = (trie.depth == d).nonzero().squeeze(1)
            path[:, nodes.to(dev)] += path[:, trie.parent[nodes].to(dev)]
        return (path + log_end)[:, trie.number_node.to(dev)]

    def _collect_eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {i for i in ids if i is not None}

    def _greedy(self, batch: list[list[int]]) -> tuple[list[str], list[dict[str, float]]]:
        """Greedy labels with the project's KV-cached decoder (no generate(): its config merging may turn
        sampling on), and the first answer token's distribution (one more prefill of the prompts)."""
        ids, attn = pad_sequences(batch, self._pad_id, "left", self._device)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=padded_positions(attn), logits_to_keep=1)
        first = out.logits[:, -1].float().softmax(-1)
        settings = DecodeSettings(temperature=0.0, max_new_tokens=self.classify_max_new_tokens)
        decoded = decode(self.model, batch, list(range(len(batch))), [0] * len(batch), settings,
                         sorted(self._eos_ids), self._pad_id)
        labels = [self.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens, _ in decoded]
        top = first.topk(min(self.classify_top_k, first.shape[-1]), dim=-1)
        firsts = []
        for probs, idx in zip(top.values.tolist(), top.indices.tolist()):
            dist: dict[str, float] = {}
            for p, i in zip(probs, idx):
                key = self.tokenizer.decode([i]).strip()
                dist[key] = dist.get(key, 0.0) + p
            firsts.append(dist)
        return labels, firsts


class PretrainedLocalJudge(LocalHFJudge):
    """LocalHFJudge loaded from a hub id or folder, so it can be declared in YAML:
    ``judge: {class_path: em_lightning.judges.PretrainedLocalJudge, init_args: {name_or_path: ...}}``."""

    def __init__(
        self,
        name_or_path: str,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int = 8,
        use_chat_template: bool = True,
    ) -> None:
        loaded = LocalHFJudge.from_pretrained(
            name_or_path, dtype=dtype, device=device, batch_size=batch_size, use_chat_template=use_chat_template
        )
        super().__init__(loaded.model, loaded.tokenizer, name=loaded.name, batch_size=batch_size,
                         use_chat_template=use_chat_template)
