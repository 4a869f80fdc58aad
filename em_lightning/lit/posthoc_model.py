"""The model a post-hoc command (``em-fit eval``, ``steer``, ``direction``) works on: a saved adapter or fully
fine-tuned model folder, an em-fit checkpoint, or a step of a run rebuilt from its trajectory. The base
model comes from ``--base`` or the run's recorded config."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from peft import PeftModel

from em_lightning.run.checkpoints import checkpoint_global_step, consolidate
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.lit.module import EMFineTune
from em_lightning.phase.reconstruct import export_step_adapter
from em_lightning.run.config import RunConfig
from em_lightning.model.tiny import TinySpec


def _spec_from_run(run: Path):
    try:
        base = RunConfig(run).model_base()
    except ValueError as exc:  # no config.yaml
        raise ValueError(f"--run {exc}") from None
    base["tiny"] = TinySpec(**(base.get("tiny") or {}))
    return ModelSpec(**base)


def _base_spec(args):
    spec = _spec_from_run(args.run) if args.run else None
    if args.base:
        spec = ModelSpec(name_or_path=args.base, tiny=spec.tiny if spec else ModelSpec().tiny)
    if spec is None:
        raise ValueError("give the base model: --base NAME_OR_PATH or --run RUN_DIR")
    return spec


def load_model_for_eval(args, workdir: Path) -> tuple[Any, Any, int, str]:
    """(model, tokenizer, step, description) for the source the arguments name."""
    if args.run is not None and not (args.run / "config.yaml").is_file():
        raise ValueError(f"--run {args.run}: no config.yaml there (is it a run directory?)")
    if args.ckpt:  # hyperparameters in the checkpoint name the base model and the adapter
        if not args.ckpt.exists():
            raise ValueError(f"--ckpt {args.ckpt}: no such file")
        step = args.step if args.step is not None else checkpoint_global_step(args.ckpt)
        ckpt = consolidate(args.ckpt, workdir / "consolidated.ckpt")  # FSDP2 shards -> one file
        with warnings.catch_warnings():  # "keys missing from the checkpoint": the frozen base, by design
            warnings.simplefilter("ignore")
            # builds the model (configure_model) before loading the trainable weights
            module = EMFineTune.load_from_checkpoint(ckpt, map_location="cpu")
        return module.model, module.tokenizer, step, f"checkpoint {args.ckpt}"
    adapter, step, what = args.adapter, args.step, None
    if adapter is None:
        if args.run is None:
            raise ValueError("give what to evaluate: --adapter DIR, --ckpt PATH or --run RUN_DIR [--step S]")
        if args.step is None:
            adapter, step, what = args.run / "adapter", _last_step(args.run), f"final adapter of {args.run}"
        else:
            adapter = export_step_adapter(args.run, args.step, workdir / f"adapter_step_{args.step}")
            what = f"step {args.step} of {args.run} (rebuilt from the trajectory)"
    if not adapter.is_dir():
        raise ValueError(f"adapter folder {adapter} not found")
    if not (adapter / "adapter_config.json").is_file() and (adapter / "config.json").is_file():
        spec = ModelSpec(name_or_path=str(adapter))  # a fully fine-tuned model, saved whole
        tokenizer = load_tokenizer(spec)
        return load_model(spec, tokenizer), tokenizer, step or 0, what or f"model {adapter}"
    spec = _base_spec(args)
    tokenizer = load_tokenizer(spec)
    model = PeftModel.from_pretrained(load_model(spec, tokenizer), adapter)
    return model, tokenizer, step or 0, what or f"adapter {adapter} on {spec.name_or_path}"


def _last_step(run: Path) -> int:
    last = run / "checkpoints" / "last.ckpt"
    return checkpoint_global_step(last) if last.is_file() else 0
