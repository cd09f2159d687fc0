"""Generate answers with a trained run (or its untouched base) and score them.

    evaluate(data, image_root, run=RUN)                      the run: base + adapter + alignment
    evaluate(data, image_root, run=EXPORT)                   an exported folder, the same way
    evaluate(data, image_root, run=RUN, base_only=True)      the run's base student, nothing added
    evaluate(data, image_root, student="tiny"|PATH, out=DIR) a base student without a run

The model is loaded by `distill.inference.load_medalign`, as predict, pictures and export
load it: the same base, prompt template, image geometry and alignment transform. Prompts
are the training prompts (data.encode's tokens up to the end of the first turn's
generation prompt). Generation is batched, left-padded, with the KV cache (inference.py).

Files holding several splits are read at their `test` split unless --split says
otherwise (R2Gen's "test" key; records whose split field, or VQA-RAD's phrase_type,
says test); metrics.json records the split used.

Broken samples: every image is checked to exist before the model loads. An image
that cannot be decoded comes back from the DataLoader as an error item (never as a
worker traceback); `on_error="fail"` stops at the first one with one line naming it,
`"skip"` lists it in skipped.jsonl and scores the rest. Predictions are written
batch by batch, so whatever stops a run, what was generated is kept.

Output, per dataset (the data file's stem, plus "-SPLIT" when --split is given):

    RUN/eval/<stem>/predictions.jsonl   {id, image, question, answer (reference), prediction,
                                         task, answer_type[, score]}, written as generated
    RUN/eval/<stem>/metrics.json        VQA and report metrics (distill.metrics), which
                                         implementation computed each, the model, settings,
                                         the split used, how many samples were skipped
    RUN/eval/<stem>/skipped.jsonl       {id, image, error} per skipped sample (skip only)
    base: RUN/base/eval/<stem>/... for --base-only of a run; DIR/eval/<stem>/... with
          DIR/base.json for a base student without a run (compare shows both as rows)
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from precompute.datasets import Record, load_records, resolve_image

from . import grounding as G
from . import metrics as M
from .data import record_images
from .inference import (LoadError, MedAlignModel, decode, generate_batch, load_medalign, model_settings,
                        pad_token_id, student_attention)
from .student import StudentError

log = logging.getLogger("medalign.eval")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to do."""


ON_ERROR = ("fail", "skip")
EVAL_SPLIT = "test"       # what an evaluation reads from a file holding several splits
SHOW_MISSING = 5          # missing images named in the error


# ----------------------------------------------------------------------------- the evaluation

def data_stem(data, split: str | None = None) -> str:
    return Path(data).stem + (f"-{split}" if split else "")


def output_dir(*, run=None, base_only=False, out=None, stem: str) -> Path:
    if out is not None:
        return Path(out) / "eval" / stem
    if run is None:
        raise EvalError("a base student without a run needs --out DIR")
    return Path(run) / ("base" if base_only else "") / "eval" / stem


def score_predictions(rows: list[dict], meteor: bool = True) -> dict:
    """metrics.json's scores from predictions.jsonl rows (those with a reference)."""
    scored = [r for r in rows if r["answer"]]
    result: dict = {"n": len(rows), "n_with_reference": len(scored)}
    # Questions: every row with an answer type, and (as MedAlign's run_eval.py counts them, as
    # closed) the untyped rows of a file that has typed ones; reports are never questions.
    typed = any(r.get("answer_type") in ("closed", "open") for r in scored)
    vqa = [r for r in scored if r.get("answer_type") in ("closed", "open")
           or (typed and r.get("answer_type") is None and r.get("task") != "report")]
    if vqa:
        result["vqa"] = M.vqa_metrics([r["prediction"] for r in vqa], [r["answer"] for r in vqa],
                                      [r.get("answer_type") for r in vqa])
    groups = {"all": scored}
    if vqa:
        groups.update({t: [r for r in scored if r.get("answer_type") == t] for t in ("closed", "open")})
    result["text"] = {}
    for name, group in groups.items():
        if group:
            result["text"][name] = M.report_metrics([r["prediction"] for r in group], [r["answer"] for r in group],
                                                    meteor=meteor)
    used_meteor = any(g.get("METEOR") is not None for g in result["text"].values())
    reasons = [g["unavailable"].get("METEOR") for g in result["text"].values() if g["unavailable"].get("METEOR")]
    result["implementations"] = M.implementations(used_meteor, reasons[0] if reasons else None)
    return result


def select_records(data, image_root, *, fmt: str = "auto", split: str | None = None, lang: str = "en",
                   limit: int | None = None) -> list[Record]:
    """The records an evaluation generates for: those with a question, the test
    split where the file holds several (EVAL_SPLIT), the first `limit`."""
    records = load_records(data, image_root, fmt=fmt, split=split, default_split=EVAL_SPLIT, lang=lang)
    records = [r for r in records if r.turns]
    if not records:
        raise EvalError(f"{data}: no records with a question (images alone cannot be evaluated)")
    if limit is not None:
        records = records[:limit]
    multi = sum(len(r.turns) > 1 for r in records)
    if multi:
        log.warning("%d records have several turns; the first question of each is evaluated", multi)
    return records


def split_used(records: list[Record], asked: str | None) -> str | None:
    """The split the evaluated records come from (None for a file without splits)."""
    splits = {r.split for r in records}
    return asked if asked is not None else (splits.pop() if len(splits) == 1 else None)


def check_images(records: list[Record], image_root, data, on_error: str,
                 images: str = "first") -> tuple[list[Record], list[dict]]:
    """(records whose images exist, skipped rows), before any model is loaded: with
    `fail`, one missing image is an error listing the first few. `images`: which of a
    record's images the model is shown (distill.data.record_images)."""
    missing = {}
    for key in dict.fromkeys(k for r in records for k in record_images(r, images)):  # each image once
        path = resolve_image(image_root, key)
        if not path.is_file():
            missing[key] = path
    if not missing:
        return records, []
    if on_error == "fail":
        shown = ", ".join(str(p) for p in list(missing.values())[:SHOW_MISSING])
        more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
        raise EvalError(f"{data}: {len(missing)} image{'s' if len(missing) > 1 else ''} not found: {shown}{more}; "
                        f"check --image-root, or pass --on-error skip to evaluate the rest")
    broken = [r for r in records if any(k in missing for k in record_images(r, images))]
    log.warning("%d images of %s not found: their %d questions are skipped", len(missing), data, len(broken))
    skipped = [_skipped_row(r, "; ".join(f"{missing[k]}: no such file" for k in record_images(r, images)
                                         if k in missing)) for r in broken]
    return [r for r in records if r not in broken], skipped


def _skipped_row(record: Record, error: str) -> dict:
    return {"id": record.id, "image": record.images[0], "error": error}


def _prediction_row(record: Record, prediction: str, images: str = "first") -> dict:
    row = {"id": record.id, "image": record.images[0], "question": record.prompt, "answer": record.answer,
           "prediction": prediction, "task": record.task, "answer_type": record.answer_type}
    if images == "all" and len(record.images) > 1:
        row["images"] = list(record.images)  # every view the model was shown
    if record.answer and record.answer_type in ("closed", "open"):
        row["score"] = M.question_score(prediction, record.answer, record.answer_type)
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class Generated:
    rows: list[dict]            # predictions.jsonl, in record order
    skipped: list[dict]         # skipped.jsonl rows (broken samples, with skip)
    seconds: float
    new_tokens: int


def generate_all(em: MedAlignModel, records: list[Record], image_root, dest: Path, *, on_error: str,
                 num_beams: int, max_new_tokens: int, batch_size: int, num_workers: int,
                 progress: bool, desc: str, masks: dict | None = None, layer: int | None = None) -> Generated:
    """Generate for every record, appending each batch's rows to dest/predictions.jsonl
    as it finishes (flushed: a crash or Ctrl-C keeps what was generated). With `masks`,
    each row also gets the share of the student's attention at `layer` inside its image's
    region (distill.grounding)."""
    covers: dict[str, object] = {}
    pad_id = pad_token_id(em.student.processor.tokenizer)
    loader = DataLoader(em.dataset(records, image_root), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=em.collate())
    out = Generated([], [], 0.0, 0)
    path = dest / "predictions.jsonl"
    t0 = time.perf_counter()
    bar = tqdm(total=len(records), desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    try:
        with path.open("w") as f:
            for batch in loader:
                for e in batch["errors"]:
                    record = records[e["index"]]
                    if on_error == "fail":
                        kept = (f"the {len(out.rows)} predictions made before it are in {path}" if out.rows
                                else "nothing was generated before it")
                        raise EvalError(f"sample {record.id!r}: {e['error']}; {kept}; fix or remove the image, "
                                        f"or pass --on-error skip")
                    out.skipped.append(_skipped_row(record, e["error"]))
                if "input_ids" in batch:
                    new = generate_batch(em, batch, num_beams=num_beams, max_new_tokens=max_new_tokens)
                    out.new_tokens += int((new != pad_id).sum())
                    looks = _grounding(em, batch, records, masks, covers, layer) if masks is not None else {}
                    for i, text in zip(batch["index"].tolist(), decode(em, new)):
                        out.rows.append(_prediction_row(records[i], text, em.images))
                        if i in looks:
                            out.rows[-1]["grounding"] = looks[i]
                        f.write(json.dumps(out.rows[-1], ensure_ascii=False) + "\n")
                    f.flush()
                bar.update(len(batch["errors"]) + (len(batch["index"]) if "index" in batch else 0))
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    return out


def _grounding(em: MedAlignModel, batch, records, masks: dict, covers: dict, layer: int) -> dict:
    """record index -> {"in_mask", "chance"} over its images that have a non-empty mask."""
    att = student_attention(em, batch, layer).numpy()
    rows, shown = batch["image_rows"].tolist(), {}
    for n, row in enumerate(rows):
        i = int(batch["index"][row])
        keys = record_images(records[i], em.images)
        key = keys[sum(r == row for r in rows[:n])]                # this image's place in its record
        if key not in masks or not np.asarray(masks[key]).any():
            continue
        if key not in covers:
            covers[key] = G.mask_on_grid(masks[key], em.student.processor.image_processor, em.pad_to_square,
                                         em.student.grid)
        shown.setdefault(i, []).append((G.attention_in_mask(att[n], covers[key]), float(covers[key].mean())))
    return {i: {"in_mask": float(np.mean([a for a, _ in v])), "chance": float(np.mean([c for _, c in v]))}
            for i, v in shown.items()}


def evaluate(data, image_root, *, run=None, student: str | None = None, out=None, base_only: bool = False,
             fmt: str = "auto", split: str | None = None, lang: str = "en", num_beams: int = 1,
             max_new_tokens: int = 64, batch_size: int = 8, limit: int | None = None, device: str = "auto",
             precision: str = "auto", pad_to_square: bool | None = None, num_workers: int = 0,
             meteor: bool = True, on_error: str = "fail", name: str | None = None, progress: bool = True,
             model: MedAlignModel | None = None, masks=None, layer: int | None = None,
             quantize: str | None = "run") -> Path:
    """Generate for every record of `data` and write predictions.jsonl + metrics.json
    (+ skipped.jsonl). Returns the output directory. `model` reuses a loaded MedAlignModel.
    `masks` (an .npz, distill.grounding): also measure where the student looks, at `layer`
    [the run's]."""
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise EvalError("num_beams, max_new_tokens, batch_size and limit must be >= 1")
    if on_error not in ON_ERROR:
        raise EvalError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if run is not None and out is not None and not base_only:
        raise EvalError("--out is for base models; a run's evaluation goes to RUN/eval/")
    stem = name or data_stem(data, split)
    dest = output_dir(run=run, base_only=base_only, out=out, stem=stem)
    records = select_records(data, image_root, fmt=fmt, split=split, lang=lang, limit=limit)
    settings = model_settings(run) if run is not None else {}  # the run's (or export's), before loading it
    evaluated, missing = check_images(records, image_root, data, on_error, settings.get("images", "first"))
    region_masks = G.load_masks(masks) if masks is not None else None
    if region_masks is not None and layer is None:
        if run is None:
            raise EvalError("--masks on a base student without a run needs --layer N (the decoder layer to read)")
        layer = int(settings["layer"])
    if not evaluated:
        raise EvalError(f"{data}: none of its {len(records)} images was found under {image_root}; "
                        f"check --image-root")
    home = Path(out) if out is not None else None
    em = model or load_medalign(run, student=student, base_only=base_only, home=home, device=device,
                                precision=precision, pad_to_square=pad_to_square, quantize=quantize,
                                doing="evaluate it")

    dest.mkdir(parents=True, exist_ok=True)
    # Results of an earlier evaluation must not sit next to this one's partial predictions.
    for stale in ("metrics.json", "skipped.jsonl"):
        (dest / stale).unlink(missing_ok=True)
    gen = generate_all(em, evaluated, image_root, dest, on_error=on_error, num_beams=num_beams,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, num_workers=num_workers,
                       progress=progress, desc=f"eval {stem}", masks=region_masks, layer=layer)
    skipped = missing + gen.skipped
    if skipped:  # the count goes into metrics.json; the CLI prints it
        _write_jsonl(dest / "skipped.jsonl", skipped)
    if not gen.rows:
        raise EvalError(f"{data}: every sample was skipped, nothing to score; the reasons are in "
                        f"{dest / 'skipped.jsonl'}")

    result = {
        "model": {"kind": em.kind, **em.info},
        "data": {"path": str(data), "image_root": str(image_root), "format": fmt,
                 "split": split_used(records, split), "lang": lang, "stem": stem, "limit": limit,
                 "on_error": on_error, "samples": len(records), "skipped": len(skipped)},
        "generation": {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "do_sample": False, "kv_cache": True, "padding": "left",
                       "precision": em.precision, "device": str(em.device),
                       "seconds": gen.seconds, "new_tokens": gen.new_tokens},
        **score_predictions(gen.rows, meteor=meteor),
        "versions": _versions(),
    }
    if region_masks is not None:
        result["grounding"] = G.summarize(gen.rows, layer, masks)
    (dest / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if out is not None:
        base = {"kind": "base", "student": em.info.get("student"), "student_path": em.info.get("student_path")}
        (Path(out) / "base.json").write_text(json.dumps(base, indent=2) + "\n")
    elif base_only:
        (Path(run) / "base" / "base.json").write_text(json.dumps(
            {"kind": "base", "run": str(run), "student": em.info.get("student"),
             "student_path": em.info.get("student_path")}, indent=2) + "\n")
    return dest


def _versions() -> dict:
    import peft
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "pycocoevalcap": M._version("pycocoevalcap")}


def headline(metrics: dict) -> dict:
    """The few numbers a table shows, as fractions (None where absent)."""
    out = {}
    vqa = metrics.get("vqa")
    if vqa:
        out["closed_acc"] = vqa["closed"]["accuracy"]
        out["closed_acc_llava_med"] = vqa["closed"]["accuracy_llava_med"]
        out["closed_acc_medalign"] = vqa["medalign"]["closed_accuracy"]   # the paper's closed column
        out["open_recall"] = vqa["open"]["recall"]
        out["vqa_overall"] = vqa["overall"]["score"]
    grounding = metrics.get("grounding")
    if grounding:
        out["grounding"] = grounding["attention_in_mask"]            # attention share inside the masks
        out["grounding_chance"] = grounding["chance"]
    text = metrics.get("text", {}).get("all")
    if text:
        for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "METEOR", "CIDEr"):
            out[k] = text.get(k)
    return out


__all__ = ["EvalError", "LoadError", "evaluate", "select_records", "check_images", "generate_all",
           "score_predictions", "data_stem", "output_dir", "headline", "StudentError", "ON_ERROR", "EVAL_SPLIT"]
