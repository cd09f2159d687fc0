"""`medalign-distill export`: a finished run as one self-contained folder to ship or serve.

    EXPORT/
      medalign_export.json   what it is: the run, template, image geometry, layer, merged or not
      README.md              how it was trained (teacher, layer, alpha, beta, data, metrics) and how to load it
      student/               the base student (config, weights, tokenizer, image processor, the run's
                             chat template); with --merge: the LoRA adapter merged into its weights
      adapter/               the LoRA adapter, plain peft format (not with --merge)
      alignment/             the alignment transform X + eps X Wᵀ (alignment.safetensors + config)

The alignment transform acts on the visual tokens' hidden states at one layer, so it
cannot be folded into any weight matrix; `distill.load_medalign(EXPORT)` puts it back
(see distill/inference.py) and returns a model `generate` works on. Loaded either way
(merged or not), the export answers like the run it came from.

Nothing of the run is changed; the folder is written as EXPORT.partial and renamed when
complete, so a failed export never passes for one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .compare import evaluations, last_metrics_row
from .evaluate import headline
from .inference import EXPORT_RECORD, load_medalign, read_run_config
from .student import CONVERSION_RECORD

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says what to do."""


def _evaluations(run: Path) -> dict:
    return {stem: {k: v for k, v in headline(m).items() if v is not None} for stem, m in evaluations(run)}


def export(run, out, *, merge: bool = False, dtype: str | None = None, progress: bool = True) -> Path:
    """Write `run` (a finished `medalign-distill run --out`) to `out`; see the module docstring.
    dtype (bf16 | fp16 | fp32): the merged weights' dtype [the base checkpoint's own]."""
    run, out = Path(run), Path(out)
    config = read_run_config(run)
    if out.exists():
        raise ExportError(f"{out} exists already; choose another --out or remove it")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype is not None and not merge:
        raise ExportError("--dtype applies to merged weights (--merge); without it the base is copied as it is")
    if merge and config.get("quantize"):
        raise ExportError(f"run {run} trained a {config['quantize']} quantized student: LoRA cannot be merged into "
                          f"quantized weights without a lossy re-quantisation; export without --merge (the "
                          f"adapter then loads on the 4-bit or the full-precision base)")
    # Loading first checks that the run is complete (adapter, alignment) and resolves its base,
    # template and geometry exactly as eval and predict do.
    m = load_medalign(run, device="cpu", precision="fp32" if merge else "auto", doing="export it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        base = Path(m.info["student_path"])
        processor = m.student.processor
        if merge:
            merged = m.model.merge_and_unload()
            target = DTYPES[dtype] if dtype else _stored_dtype(base)
            merged.to(target).save_pretrained(tmp / "student")
        else:
            shutil.copytree(base, tmp / "student", ignore=shutil.ignore_patterns(
                "*.partial", "tokenizer*", "special_tokens_map.json", "chat_template.*", "processor_config.json",
                "preprocessor_config.json"))
            shutil.copytree(run / "adapter", tmp / "adapter")
        # the processor with the run's chat template, so plain transformers prompts it the same way
        processor.save_pretrained(tmp / "student")
        if (base / CONVERSION_RECORD).is_file():
            shutil.copy2(base / CONVERSION_RECORD, tmp / "student" / CONVERSION_RECORD)
        if m.tap is not None:
            shutil.copytree(run / "alignment", tmp / "alignment")
        record = {
            "format": 1, "merged": merge, "dtype": dtype, "chat_template": m.student.chat_template,
            "quantize": None if merge else config.get("quantize"),
            "pad_to_square": m.pad_to_square, "images": m.images, "layer": config["layer"],
            "run": {"path": str(run), "config": config},
            "teacher": _teacher(run), "final_metrics": last_metrics_row(run), "evaluations": _evaluations(run),
        }
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(readme(record, out.name))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _stored_dtype(base: Path) -> torch.dtype:
    config = json.loads((base / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return getattr(torch, str(name), torch.float32) if name else torch.float32


def _teacher(run: Path) -> dict:
    f = run / "cache_metadata.json"
    if not f.is_file():
        return {}
    md = json.loads(f.read_text())
    return {k: md.get(k) for k in ("teacher", "arch", "checkpoint", "recipe", "random_init", "preprocessing")}


def readme(record: dict, name: str) -> str:
    """The exported folder's README: what it is and how to use it."""
    c = record["run"]["config"]
    t = record["teacher"]
    teacher = f"{t.get('teacher')} ({t.get('arch')}, weights {t.get('checkpoint') or 'random'})" if t else "none"
    losses = {k: round(v, 4) for k, v in record["final_metrics"].items()
              if k in ("step", "loss", "ntp", "vis", "att")}
    evals = "\n".join(f"- `{stem}`: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in m.items())
                      for stem, m in record["evaluations"].items()) or "- (the run was not evaluated)"
    adapter = ("LoRA merged into `student/`'s weights" + (f" ({record['dtype']})" if record["dtype"] else "")
               if record["merged"] else "LoRA adapter in `adapter/` (plain peft format)")
    return f"""# {name}: a MedAlign-distilled student

Exported by `medalign-distill export` from run `{record['run']['path']}`.

## How it was trained

- student: `{c['student']}`, prompt template `{record['chat_template'] or "the checkpoint's own"}`, images
  {'padded to square (CLIP mean colour) before' if record['pad_to_square'] else 'resized and centre-cropped by'}
  the processor; record images shown: {record['images']}
- teacher targets: {teacher}
- MedAlign: alignment transform after decoder layer {c['layer'] - 1}, attention loss at layer {c['layer']};
  alpha {c['alpha']}, beta {c['beta']}, eps {c['eps']}, attention loss `{c['attn_loss']}`
- LoRA r {c['lora_r']}, alpha {c['lora_alpha']}, dropout {c['lora_dropout']}; lr {c['lr']}, epochs {c['epochs']},
  max steps {c['max_steps']}, batch {c['batch_size']} x {c['grad_accum']} accumulation
- data: `{c['data']}` (images under `{c['image_root']}`)
- final training losses: {losses}

Evaluations of the run (x1, not %):
{evals}

## What is in here

- `student/`: the base model (transformers `LlavaForConditionalGeneration`) with its processor
- {adapter}
- `alignment/`: the alignment transform, which must be applied at inference (below)
- `{EXPORT_RECORD}`: all of the above as data

## Use it

```python
from distill import load_medalign          # pip install medalign
model = load_medalign("{name}")
print(model.answer(["scan.png"], "Is there a pleural effusion?"))
# or as any transformers LLaVA: the transform finds the image tokens itself
out = model.model.generate(input_ids=..., attention_mask=..., pixel_values=..., max_new_tokens=64)
```

From the command line: `medalign-distill predict --run {name} --image scan.png --question "..."`
and `medalign-distill eval --run {name} --data test.json --image-root images/`.

Serving: the alignment transform is a forward hook, not a weight; a server must load the
model through `load_medalign` (or re-create the hook: `distill.student.DistillTap` with
`follow_input_ids`), not as a bare LLaVA checkpoint, or its answers differ from the run's.
Images must be prepared as in training (padding above; `MedAlignModel.dataset` does it).
"""
