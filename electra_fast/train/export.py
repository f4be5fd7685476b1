"""What rebuilds a pretrainer from a training checkpoint (`model_spec` / `model_from_spec`), and `export`: a
checkpoint to `discriminator/` and `generator/` directories in transformers format, each with the tokenizer.

A run's operations on its files: they build an `ElectraPretrainer`, so they sit above `electra_fast.pretraining`
(`electra_fast.io` holds the checkpoint files themselves).
"""
from __future__ import annotations

import os
import shutil

from electra_fast.data.tokenizer import save_tokenizer, tokenizer_from_str
from electra_fast.errors import InputError, ensure_writable
from electra_fast.io.checkpoint import latest_checkpoint, load_checkpoint
from electra_fast.model.config import ElectraModelConfig
from electra_fast.model.hf_format import require_transformers
from electra_fast.pretraining.families import is_slim
from electra_fast.pretraining.families.rtd_head import RTDDiscriminator
from electra_fast.pretraining.pretrainer import ElectraPretrainer
from electra_fast.train.distributed import model_weights


def _transformers_spec(module) -> dict:
    """A transformers model's class and config (an `RTDDiscriminator`: its encoder's, `"rtd_head": True`)."""
    model = module.encoder if isinstance(module, RTDDiscriminator) else module
    return {"class": type(model).__name__, "config_class": type(model.config).__name__,
            "config": model.config.to_dict(), "rtd_head": isinstance(module, RTDDiscriminator)}


def _transformers_model(spec: dict):
    tf = require_transformers()
    model = getattr(tf, spec["class"])(getattr(tf, spec["config_class"]).from_dict(spec["config"]))
    return RTDDiscriminator(model) if spec["rtd_head"] else model


def model_spec(model) -> dict:
    """What rebuilds the model's structure (configs + pretrainer settings), stored in checkpoints: the slim
    models' `ElectraModelConfig`s, or (`"arch": "transformers"`: DeBERTa-v3, BERT, ...) each model's transformers
    class and config. Never the kernel options: a checkpoint resumes under any backend."""
    if is_slim(model.discriminator):
        return {"generator": model.generator.config.to_dict(),
                "discriminator": model.discriminator.config.to_dict(), "settings": model.settings()}
    return {"arch": "transformers", "generator": _transformers_spec(model.generator),
            "discriminator": _transformers_spec(model.discriminator), "settings": model.settings()}


def model_from_spec(spec: dict) -> ElectraPretrainer:
    """The (freshly initialised) model a `model_spec` describes; load the checkpoint's weights into it."""
    settings = dict(spec["settings"])
    if spec.get("arch") == "transformers":
        return ElectraPretrainer(_transformers_model(spec["generator"]), _transformers_model(spec["discriminator"]),
                                 **settings)
    gdes = settings.pop("gdes", False)
    unpadded = {"pad_vocab_multiple": 1}  # checkpoints written before the vocabulary was padded lack the field
    return ElectraPretrainer.from_configs(ElectraModelConfig(**{**unpadded, **spec["generator"]}),
                                          ElectraModelConfig(**{**unpadded, **spec["discriminator"]}), gdes=gdes,
                                          **settings)


def _replace(src: str, dst: str) -> None:
    """Move a finished file or directory over `dst`; a directory's old copy is deleted only after the swap."""
    if not os.path.isdir(src):
        os.replace(src, dst)
        return
    old = f"{dst}.old-{os.getpid()}"
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: str, output_dir: str) -> str:
    """Write `output_dir/discriminator/` and `output_dir/generator/` (transformers format, each with the
    tokenizer) from a training checkpoint file or a run directory (its newest checkpoint). -> output_dir."""
    if not os.path.exists(checkpoint):
        raise InputError(f"{checkpoint!r} does not exist: pass a run's output directory or a checkpoint file")
    if os.path.isdir(checkpoint):
        found = latest_checkpoint(os.path.join(checkpoint, "checkpoints"))
        if found is None:
            raise InputError(f"no checkpoint in {checkpoint!r}: pass a run's output directory or a checkpoint file")
        checkpoint = found
    state = load_checkpoint(checkpoint)
    model = model_from_spec(state["model_spec"])
    model.load_state_dict(model_weights(state))
    ensure_writable(output_dir, "--output")
    tmp = os.path.join(output_dir, f".export-{os.getpid()}")
    model.save_pretrained(tmp)
    tok = tokenizer_from_str(state["tokenizer"]) if state.get("tokenizer") else None
    for name in os.listdir(tmp):
        if tok is not None and os.path.isdir(os.path.join(tmp, name)):
            save_tokenizer(tok, os.path.join(tmp, name))
        _replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)
    return output_dir
