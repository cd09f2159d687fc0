"""Number formats of a student: the precision it computes in, and how its frozen base is stored.

Precision (--precision, RunConfig.precision):
  auto   bf16 on a GPU that has it (compute capability 8+: A100, L4, H100, RTX 30xx/40xx),
         fp16 on one that does not (V100, T4: bf16 there is emulated and slow), fp32 on CPU
  bf16   the frozen weights stored in bf16, the forward under bf16 autocast
  fp16   the same in fp16, with a gradient scaler: fp16's 5 exponent bits underflow small
         gradients, so the loss is multiplied by a large scale before backward and the
         gradients divided by it before the update; a step whose gradients overflowed
         (inf/NaN) is skipped and the scale halved (torch.amp.GradScaler). Training counts
         the skipped steps in metrics.jsonl.
  fp32   everything in fp32 (CPU; debugging)
The trained tensors stay fp32 in every mode: peft keeps LoRA weights fp32 on a 16-bit base,
and the alignment transform W is created fp32 (distill.student.AlignmentTransform).

Quantization (--quantize 4bit|8bit, RunConfig.quantize): QLoRA. The language model's
linear layers are stored by bitsandbytes, 4-bit NF4 with double quantisation (the scales
quantised too, ~0.4 bit/parameter saved) computing in the precision above, or 8-bit
LLM.int8(). Everything else keeps the precision's dtype: the vision tower and projector
(they run once per image, before any trained tensor: nothing of theirs is kept for
backward), the embeddings and lm_head (as QLoRA does), the norms in fp32 (peft's
prepare_model_for_kbit_training). LoRA trains on top of the quantized layers; the
adapter it saves is plain peft, and loads on the quantized or the unquantized base alike.
"""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn

from .extras import require

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE = ("4bit", "8bit")

# Modules bitsandbytes must leave alone: everything outside the decoder layers. Both
# transformers layouts (>= 4.52: under `model.`; before: top level), since its matching
# goes from the start of the name.
_NOT_QUANTIZED = ("model.vision_tower", "model.multi_modal_projector", "vision_tower", "multi_modal_projector",
                  "lm_head")


# On CPUs with AVX512-bf16, importing bitsandbytes (peft and transformers do, when it is
# installed) tries to fetch an optional inference kernel from the Hugging Face hub (the
# `kernels` package) and warns when it cannot: nothing here loads code from the hub, so
# that warning, the only one of that module, is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class QuantizeError(ValueError):
    """A quantized student cannot be used as asked; the message says what to do instead."""


# ----------------------------------------------------------------------------- precision

def resolve_precision(precision: str, device) -> str:
    """"auto" -> the precision this device trains in (module docstring); others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    # not torch.cuda.is_bf16_supported(): by default it also says yes where bf16 is only emulated
    return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def autocast(device, precision: str):
    """The forward's autocast for a resolved precision (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


class LossScaler:
    """torch.amp.GradScaler for fp16, a pass-through otherwise; counts the optimiser steps
    it skipped (gradients with inf/NaN, the scale halved)."""

    def __init__(self, device, precision: str, init_scale: float = 2.0 ** 16):
        self.enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale, enabled=self.enabled)
        self.skipped = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer) -> None:
        """Gradients back to their true size (before clipping them)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """The optimiser step unless the gradients overflowed; True when it was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()  # lowers the scale exactly when this step was skipped
        taken = self.scaler.get_scale() >= before
        self.skipped += not taken
        return taken

    @property
    def scale_value(self) -> float:
        return self.scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state["skipped"])


# ----------------------------------------------------------------------------- quantization

def quantization_config(quantize: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for --quantize, computing in `dtype`."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    require("bitsandbytes", f"--quantize {quantize}")
    if quantize == "8bit":  # LLM.int8 always computes in fp16; bitsandbytes says so at every matmul
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once_per_process)
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(_NOT_QUANTIZED))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(_NOT_QUANTIZED))


def _once_per_process(record: logging.LogRecord) -> bool:
    key = record.msg
    if key in _said:
        return False
    _said.add(key)
    return True


_said: set = set()


def quantized_linears(model: nn.Module) -> dict[str, str]:
    """{module name: "4bit" | "8bit"} for every bitsandbytes linear layer in the model."""
    if "bitsandbytes" not in sys.modules:  # nothing can be quantized without it
        return {}
    import bitsandbytes as bnb
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            found[name] = "4bit"
        elif isinstance(m, bnb.nn.Linear8bitLt):
            found[name] = "8bit"
    return found


def check_quantized(model: nn.Module, decoder: nn.Module, quantize: str) -> None:
    """Every linear layer of the decoder is stored as asked, and nothing outside it is.
    (Which modules bitsandbytes skips is matched by name; a transformers version with
    other names would otherwise quantize the vision tower silently, or nothing at all.)"""
    inside = {id(m) for m in decoder.modules()}
    found = quantized_linears(model)
    by_id = {id(m): name for name, m in model.named_modules()}
    outside = [n for n in found if id(model.get_submodule(n)) not in inside]
    plain = [by_id[id(m)] for m in decoder.modules() if type(m) is nn.Linear]
    wrong = [n for n, kind in found.items() if kind != quantize]
    if outside or plain or wrong:
        raise QuantizeError(f"--quantize {quantize}: bitsandbytes did not quantize the student as intended "
                            f"(outside the decoder: {outside[:3]}, decoder layers left unquantized: {plain[:3]}, "
                            f"other formats: {wrong[:3]}); this transformers version names the modules "
                            f"differently: report it, and train without --quantize meanwhile")


def prepare_for_kbit_training(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """peft's preparation of a quantized model for training (everything frozen, the norms
    in fp32), with the other unquantized weights put back in `dtype`: peft upcasts all of
    them to fp32 (for fp16 training on old GPUs), which would double the vision tower,
    projector, embeddings and lm_head (~1.2 GB more at 7B) for no gain under autocast.
    QLoRA's reference training keeps them 16-bit likewise."""
    from peft import prepare_model_for_kbit_training

    # Activation checkpointing is train.py's (non-reentrant, which needs no input-grad hook).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if dtype != torch.float32:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                continue
            for p in module.parameters(recurse=False):
                if p.dtype == torch.float32:
                    p.data = p.data.to(dtype)
    return model
