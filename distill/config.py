"""One frozen, validated config per training run, saved next to its outputs.

Defaults follow the reference recipe (docs/method.md): layer 20, alpha 1.0, beta 0.03,
LoRA r 32 / alpha 16 / dropout 0.05 on the language model, lr 2e-4 cosine with 3%
warmup, no weight decay, effective batch 32, max length 1024, 9 epochs (the low end
of the reference's 9-12).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from precompute.cache import is_url
from precompute.datasets import LANGUAGES

from .precision import PRECISIONS, QUANTIZE
from .templates import CHAT_TEMPLATES
from .tracking import TRACKERS


@dataclass(frozen=True)
class RunConfig:
    # what to train on
    cache: Path | str                # a local folder, or an fsspec URL string (precompute.cache.is_url)
    teacher: str                     # cache group (teacher name or alias)
    student: str                     # local transformers LLaVA directory, or "tiny"
    data: Path
    image_root: Path
    out: Path
    format: str = "auto"
    split: str | None = None
    lang: str = "en"                # SLAKE question language: en | zh | all
    # the method
    layer: int = 20                  # attention loss at decoder layer index `layer`, transform at `layer - 1`
    alpha: float = 1.0               # weight of the spatial visual alignment loss (0 = off, no cost)
    beta: float = 0.03               # weight of the attention distillation loss (0 = off, no cost)
    eps: float = 1.0                 # alignment transform X + eps * X W^T
    align_rank: int | None = None    # None: full D x D W; r: low-rank W = B A
    attn_loss: str = "kl"            # "kl" (reference) | "softmax-kl"
    attn_temperature: float = 1.0
    pad_to_square: bool | None = None  # None: the student's geometry if it declares one, else the cache's
    chat_template: str | None = None   # None: the student's own; else a name in distill.templates.CHAT_TEMPLATES
    images: str = "first"            # "first": a record's first image; "all": every image, each with its targets
    # LoRA
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None   # None: every linear layer of the language model
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    epochs: float = 9.0              # the reference trains 9-12 epochs
    max_steps: int | None = None     # optimiser steps; overrides epochs
    batch_size: int = 4              # per process, per micro-step
    grad_accum: int = 8              # effective batch = batch_size * grad_accum (reference: 32)
    max_length: int = 1024
    gradient_checkpointing: bool | None = None   # None: on for CUDA, off on CPU
    precision: str = "auto"          # "auto" (bf16 on CUDA where supported, else fp16; fp32 on CPU) | bf16 | fp16 | fp32
    quantize: str | None = None      # None | "4bit" (QLoRA: NF4 + double quantisation) | "8bit"; distill.precision
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    # bookkeeping
    save_every: int = 500
    log_every: int = 10
    report_to: tuple[str, ...] = ()  # live tracking: "tensorboard", "wandb" (distill.tracking); () = none
    resume: bool = False

    def __post_init__(self):
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if isinstance(self.report_to, str):  # "tensorboard,wandb" as the flag and config files give it
            object.__setattr__(self, "report_to", tuple(t.strip() for t in self.report_to.split(",") if t.strip()))
        if isinstance(self.report_to, (list, tuple)):
            object.__setattr__(self, "report_to", tuple(t for t in self.report_to if t != "none"))
        if self.quantize == "none":  # as --quantize none and config files may say it
            object.__setattr__(self, "quantize", None)
        # Types first (a config file can hold anything: `layer: [1, 2]`), then finiteness:
        # `--eps inf` or `--alpha nan` would train to NaN, or silently without a loss.
        problems = [p for f in fields(self) if (p := _type_problem(f.name, getattr(self, f.name)))]
        if problems:
            raise _invalid(problems)
        problems = [f"{f.name} must be a finite number, got {getattr(self, f.name)}" for f in fields(self)
                    if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        if problems:
            raise _invalid(problems)
        for name in ("cache", "data", "image_root", "out"):
            value = getattr(self, name)
            if not (name == "cache" and is_url(value)):  # a URL stays a string: Path folds its '//'
                object.__setattr__(self, name, Path(value).expanduser())
        problems = []
        if self.layer < 1:
            problems.append(f"layer must be >= 1 (the transform sits at layer - 1), got {self.layer}")
        if self.alpha < 0 or self.beta < 0:
            problems.append("alpha and beta must be >= 0")
        if self.lang not in LANGUAGES:
            problems.append(f"lang must be one of {', '.join(LANGUAGES)}, got {self.lang!r}")
        if self.chat_template is not None and self.chat_template not in CHAT_TEMPLATES:
            problems.append(f"chat_template must be one of {', '.join(sorted(CHAT_TEMPLATES))}, "
                            f"got {self.chat_template!r}")
        if self.images not in ("first", "all"):
            problems.append(f"images must be 'first' or 'all', got {self.images!r}")
        if self.attn_loss not in ("kl", "softmax-kl"):
            problems.append(f"attn_loss must be 'kl' or 'softmax-kl', got {self.attn_loss!r}")
        if self.attn_temperature <= 0:
            problems.append("attn_temperature must be > 0")
        if self.align_rank is not None and self.align_rank < 1:
            problems.append("align_rank must be >= 1 (or None for a full matrix)")
        if self.lora_r < 1 or not 0 <= self.lora_dropout < 1:
            problems.append("lora_r must be >= 1 and 0 <= lora_dropout < 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            problems.append("lr must be > 0, weight_decay >= 0, 0 <= warmup_ratio < 1")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 16:
            problems.append("batch_size and grad_accum must be >= 1, max_length >= 16")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            problems.append("epochs must be > 0")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            problems.append(f"quantize must be one of {', '.join(QUANTIZE)} (or None), got {self.quantize!r}")
        unknown = sorted(set(self.report_to) - set(TRACKERS))
        if unknown:
            problems.append(f"report_to: unknown tracker(s) {unknown}; choose from none, {', '.join(TRACKERS)}")
        if self.save_every < 1 or self.log_every < 1 or self.num_workers < 0:
            problems.append("save_every and log_every must be >= 1, num_workers >= 0")
        if problems:
            raise _invalid(problems)

    @property
    def distill(self) -> bool:
        return self.alpha > 0 or self.beta > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in d.items()}

    def save(self, path: Path) -> None:
        # allow_nan=False: config.json is JSON (no Infinity/NaN), whatever got past validation
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _invalid(problems: list[str]) -> ValueError:
    """One line for one problem, a list for several."""
    if len(problems) == 1:
        return ValueError(f"invalid run config: {problems[0]}")
    return ValueError("invalid run config:\n  " + "\n  ".join(problems))


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path",
               type(None): "null"}


def _type_ok(value, tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:  # tuple[str, ...]
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Path:
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, tp)


def _type_problem(name: str, value) -> str | None:
    """None if `value` has the type RunConfig declares for field `name`, else what is wrong."""
    tp = typing.get_type_hints(RunConfig)[name]
    if _type_ok(value, tp):
        return None
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    wanted = " or ".join(_TYPE_NAMES.get(t, "a list of strings") for t in options)
    hint = ""
    if isinstance(value, str) and float in options:
        try:
            float(value)
            hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
        except ValueError:
            pass
    return f"{name} must be {wanted}, got {value!r} ({type(value).__name__}){hint}"


def load_config_file(path: Path) -> dict[str, Any]:
    """A JSON or YAML file of RunConfig fields (CLI flags override them)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML ({where}{what}); fix the file") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    # Relative paths in a config file are relative to the file, as users expect.
    for key in ("cache", "data", "image_root", "out"):
        if key in data and data[key] is not None and not is_url(data[key]) \
                and not Path(data[key]).expanduser().is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return data
