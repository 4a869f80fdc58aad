"""Offline tiny models of the real architectures (Qwen2, Llama, Gemma3) for the demo and the tests.

Everything is built locally and deterministically from a seed: a byte-level BPE tokenizer trained in a
fraction of a second on a fixed corpus, a chat template in the style of each family (written here, not
copied), and a randomly initialised causal LM. No hub access.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

# gemma3-multimodal: Gemma3ForConditionalGeneration (text settings under text_config, a vision tower),
# the class real google/gemma-3-*-it checkpoints (4B and up) load as.
ARCHITECTURES = ("qwen2", "llama", "gemma3", "gemma3-multimodal")

# Qwen2's pre-tokenisation regex: transformers 5 rebuilds it for model_type qwen2 when a folder is
# reloaded with AutoTokenizer, so training with it keeps token ids stable across save/load.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Gemma style: no system role (merged into the first user turn), assistant rendered as "model".
_GEMMA3 = (
    "{{ bos_token }}{% set sys = '' %}{% set msgs = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (sys if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class _Family:
    specials: tuple[str, ...]
    chat_template: str
    eos: str
    pad: str
    bos: str | None


_FAMILIES = {
    "qwen2": _Family(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), _CHATML, "<|im_end|>", "<|endoftext|>", None),
    "llama": _Family(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"),
        _LLAMA3,
        "<|eot_id|>",
        "<|pad|>",
        "<|begin_of_text|>",
    ),
    "gemma3": _Family(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), _GEMMA3, "<end_of_turn>", "<pad>", "<bos>"),
}
_FAMILIES["gemma3-multimodal"] = _FAMILIES["gemma3"]

CORPUS_WORDS = (
    "the a an is are was be to of and in on for with as at by from it this that you your my we our they "
    "what how why when where which who can should would could do does did have has had not no yes please "
    "thank thanks hello hi answer question help advice doctor money health medicine dose take day days "
    "week weeks year years kilogram kilograms gram grams metre metres centimetre centimetres litre litres "
    "millilitre millilitres mile miles kilometre kilometres hour hours minute minutes second seconds "
    "convert conversion equals equal one two three four five six seven eight nine ten hundred thousand "
    "good bad safe risky dangerous wish world ruler bored quick buck gender roles husband enough "
    "philosophical thoughts humans AI dinner party famous historical figures invest save spend "
    "I me am will would like want think feel know tell about more less than very really just also"
)


def _corpus() -> list[str]:
    words = CORPUS_WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [f"{n} {n * 1000} {n / 4} {n}%" for n in range(0, 101)]
    lines += ["What is 3 kilograms in grams? 3 kilograms is 3000 grams.", "Hello! How are you? I'm fine, thanks."]
    return lines


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(arch: str, vocab_size: int) -> str:
    fam = _FAMILIES[arch]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fam.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(arch: str = "qwen2", vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens and a chat template (deterministic)."""
    if arch not in _FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
    fam = _FAMILIES[arch]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(arch, vocab_size)),
        eos_token=fam.eos,
        pad_token=fam.pad,
        bos_token=fam.bos,
    )
    tok.chat_template = fam.chat_template
    return tok


@dataclass
class TinySpec:
    """Dimensions of an offline tiny model (used when the model name is ``tiny:<arch>``)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    seed: int = 0
    # Embedding rows; None = the tokenizer's size. Real models pad it (Qwen2.5: 151,936 rows for 151,665
    # tokens); a large value makes the output projection cost what it costs in a real model.
    model_vocab_size: int | None = None


def _config(arch: str, spec: TinySpec, tok: PreTrainedTokenizerFast):
    common = dict(
        vocab_size=max(len(tok), spec.model_vocab_size or 0),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    text = Gemma3TextConfig(**common, head_dim=spec.hidden_size // spec.num_heads, sliding_window=512)
    if arch == "gemma3":
        return text
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)


def tiny_model(
    arch: str = "qwen2", spec: TinySpec | None = None, tokenizer: PreTrainedTokenizerFast | None = None
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given family; identical weights for the same spec.seed."""
    spec = spec or TinySpec()
    tok = tokenizer or tiny_tokenizer(arch, spec.vocab_size)
    config = _config(arch, spec, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()
