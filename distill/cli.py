"""`medalign-distill`: train students from a teacher-target cache.

Thin: flags (and an optional config file, flags winning) become one RunConfig,
which is validated, saved in the run directory, and handed to `train`.
"""

from __future__ import annotations

from pathlib import Path

import click

from precompute.cache import CacheError
from precompute.datasets import DatasetError
from precompute.images import ImageError

from .config import RunConfig, load_config_file

USER_ERRORS = (CacheError, DatasetError, ImageError, KeyError, ValueError, FileNotFoundError)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Fine-tune a LLaVA-style student with LoRA and MedAlign's distillation losses.

    \b
    medalign-distill run --cache ./cache --teacher unimed --student ~/models/llava-med-hf \\
        --data train.json --image-root images/ --out runs/unimed-l20 --layer 20 --alpha 1 --beta 0.03
    medalign-distill run ... --out runs/no-attn --beta 0      # ablation: same cache, no teacher run

    The teacher is never loaded: its targets stream from the cache built by
    `medalign-cache build`.
    """


def _opt(*names, **kw):
    # Every flag defaults to None so a config file's value survives unless the flag is given.
    return click.option(*names, default=None, show_default=False, **kw)


@main.command()
@_opt("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
      help="JSON/YAML file of run settings; flags given here override it.")
@_opt("--cache", type=click.Path(path_type=Path), help="Cache built by medalign-cache.")
@_opt("--teacher", help="Teacher group in the cache (name or alias, e.g. unimed).")
@_opt("--student", help="Local transformers LLaVA directory, or 'tiny' for a tiny random student.")
@_opt("--data", type=click.Path(path_type=Path), help="Training dataset file.")
@_opt("--image-root", type=click.Path(path_type=Path), help="Folder the dataset's image paths are relative to.")
@_opt("--out", type=click.Path(path_type=Path), help="Run directory (config, logs, metrics, adapter).")
@_opt("--format", help="Dataset format [auto].")
@_opt("--split", help="Split for files holding several (R2Gen).")
@_opt("--layer", type=int, help="Decoder layer l of the attention loss; the transform sits at l-1 [20].")
@_opt("--alpha", type=float, help="Weight of the visual alignment loss; 0 turns it off [1.0].")
@_opt("--beta", type=float, help="Weight of the attention distillation loss; 0 turns it off [0.03].")
@_opt("--eps", type=float, help="Alignment transform scale eps [1.0].")
@_opt("--align-rank", type=int, help="Low-rank alignment transform of this rank [full D x D].")
@_opt("--attn-loss", type=click.Choice(["kl", "softmax-kl"]), help="Attention loss form [kl, the reference].")
@_opt("--attn-temperature", type=float, help="Temperature of softmax-kl [1.0].")
@_opt("--pad-to-square/--no-pad-to-square", help="Pad images to square [follow the cache's teacher].")
@_opt("--lora-r", type=int, help="LoRA rank [32].")
@_opt("--lora-alpha", type=int, help="LoRA alpha [16].")
@_opt("--lora-dropout", type=float, help="LoRA dropout [0.05].")
@_opt("--lora-targets", help="Comma-separated module names [every linear layer of the language model].")
@_opt("--lr", type=float, help="Peak learning rate [2e-4].")
@_opt("--weight-decay", type=float, help="[0].")
@_opt("--warmup-ratio", type=float, help="[0.03].")
@_opt("--epochs", type=float, help="[1].")
@_opt("--max-steps", type=int, help="Optimiser steps; overrides --epochs.")
@_opt("--batch-size", type=int, help="Samples per micro-batch [4].")
@_opt("--grad-accum", type=int, help="Micro-batches per optimiser step [8].")
@_opt("--max-length", type=int, help="Token limit per sample [1024].")
@_opt("--gradient-checkpointing/--no-gradient-checkpointing", help="[on for CUDA].")
@_opt("--precision", type=click.Choice(["auto", "bf16", "fp32"]), help="[auto: bf16 on CUDA].")
@_opt("--device", help="[auto].")
@_opt("--workers", "num_workers", type=int, help="DataLoader workers [2].")
@_opt("--seed", type=int, help="[0].")
@_opt("--save-every", type=int, help="Checkpoint every N steps [500].")
@_opt("--log-every", type=int, help="[10].")
@click.option("--resume", is_flag=True, default=False, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def run(config_file, quiet, **flags):
    """Train one run (teacher targets from the cache; the teacher is never loaded)."""
    from .train import RunError, train

    try:
        settings = load_config_file(config_file) if config_file else {}
        resume = flags.pop("resume")
        settings.update({k: v for k, v in flags.items() if v is not None})
        if resume:
            settings["resume"] = True
        if isinstance(settings.get("lora_targets"), str):
            settings["lora_targets"] = [t.strip() for t in settings["lora_targets"].split(",") if t.strip()]
        required = [k for k in ("cache", "teacher", "student", "data", "image_root", "out") if not settings.get(k)]
        alpha, beta = settings.get("alpha", 1.0), settings.get("beta", 0.03)
        if alpha == 0 and beta == 0:  # plain LoRA needs no cache
            required = [k for k in required if k not in ("cache", "teacher")]
            settings.setdefault("cache", ".")
            settings.setdefault("teacher", "")
        if required:
            raise click.UsageError("missing " + ", ".join("--" + k.replace("_", "-") for k in required))
        config = RunConfig.from_dict(settings)
        out = train(config, progress=not quiet).out
    except (RunError, *USER_ERRORS) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise click.ClickException(str(msg)) from e
    click.echo(f"run finished: {out}")
