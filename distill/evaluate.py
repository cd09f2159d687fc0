"""Generate answers with a trained run (or its untouched base) and score them.

    evaluate(data, image_root, run=RUN)                      the run: base + adapter + alignment
    evaluate(data, image_root, run=RUN, base_only=True)      the run's base student, nothing added
    evaluate(data, image_root, student="tiny"|PATH, out=DIR) a base student without a run

The trained model is rebuilt exactly as a user would: the base student from the
run's config.json ("tiny" -> RUN/tiny-student), the adapter with plain peft
(`PeftModel.from_pretrained(base, RUN/adapter)`) and the alignment transform
(`load_alignment(RUN/alignment)`) re-attached at its layer by a DistillTap. The
transform is applied to the visual tokens in the prefill; decode steps reuse them
from the KV cache (DistillTap leaves forwards of another length alone).

Prompts are the training prompts (data.encode's tokens up to the end of the first
turn's generation prompt), the image prepared as in training (pad to square when
the run's cache teacher did). Batches are LEFT-padded for generation; generate()
derives position ids from the attention mask, so a padded sample generates what it
would alone. Greedy (num_beams 1) or beam search, always with the KV cache.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from precompute.datasets import Record, load_records, resolve_image

from . import metrics as M
from .data import DistillDataset, split_errors
from .precision import DTYPES, autocast, resolve_precision
from .student import (DistillTap, Student, StudentError, load_adapter, load_alignment, load_student,
                      make_tiny_student, student_geometry)

log = logging.getLogger("medalign.eval")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to do."""


ON_ERROR = ("fail", "skip")
EVAL_SPLIT = "test"       # what an evaluation reads from a file holding several splits
SHOW_MISSING = 5          # missing images named in the error


@dataclass
class EvalModel:
    """A student ready to generate: base (+ adapter + alignment tap for a trained run)."""
    student: Student
    tap: DistillTap | None
    kind: str                    # "trained" | "base"
    pad_to_square: bool
    device: torch.device
    precision: str               # "bf16" | "fp16" | "fp32" (resolved: distill.precision)
    info: dict = field(default_factory=dict)   # what was loaded, for metrics.json

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


# ----------------------------------------------------------------------------- loading

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise EvalError(f"{run} is not a run directory (no config.json); pass the --out of a "
                        f"`medalign-distill run`, or evaluate a base student with --student PATH --out DIR")
    return json.loads(path.read_text())


def run_pad_to_square(run: Path, config: dict) -> bool:
    """The image geometry the run trained with: its student.json (written by training),
    else, for runs from before it, the config's value or the cache teacher's preprocessing."""
    record = Path(run) / "student.json"
    if record.is_file():
        return bool(json.loads(record.read_text())["pad_to_square"])
    if config.get("pad_to_square") is not None:
        return bool(config["pad_to_square"])
    meta = Path(run) / "cache_metadata.json"
    if meta.is_file():
        return bool(json.loads(meta.read_text()).get("preprocessing", {}).get("pad_to_square"))
    return False


def _student_dir(student: str, home: Path, seed: int = 0) -> Path:
    if student == "tiny":
        path = Path(home) / "tiny-student"
        if not (path / "config.json").exists():
            make_tiny_student(path, seed=seed)
        return path
    return Path(student).expanduser()


def load_for_eval(run=None, *, student: str | None = None, base_only: bool = False, home=None,
                  device: str = "auto", precision: str = "auto", pad_to_square: bool | None = None,
                  quantize: str | None = "run") -> EvalModel:
    """The model to evaluate. With `run`: its base student, plus (unless base_only) its
    adapter and alignment transform. Without: `student` (a path or "tiny", built in `home`).
    quantize: "run" stores the language model as the run trained it (config.json; none
    without a run), or "none" / None, "4bit", "8bit"."""
    dev = _device(device)
    precision = resolve_precision(precision, dev)
    dtype = DTYPES[precision]
    info: dict = {}
    if run is not None:
        run = Path(run)
        config = read_run_config(run)
        if student is not None and student != config["student"]:
            raise EvalError(f"--student {student!r} differs from the run's student {config['student']!r}; "
                            f"a run is evaluated on the base it was trained from")
        base_dir = _student_dir(config["student"], run, seed=int(config.get("seed", 0)))
        pad = run_pad_to_square(run, config) if pad_to_square is None else pad_to_square
        info.update(run=str(run), student=config["student"])
        if quantize == "run":
            quantize = config.get("quantize")
    else:
        if student is None:
            raise EvalError("give --run RUN (a trained run) or --student PATH_OR_tiny with --out DIR (a base model)")
        base_only = True
        base_dir = _student_dir(student, Path(home))
        # a base student is shown images the way it was trained (converted students say how)
        pad = pad_to_square if pad_to_square is not None else bool(student_geometry(str(base_dir)))
        info.update(student=student)
    info["student_path"] = str(base_dir)
    quantize = None if quantize in ("run", "none") else quantize
    info["quantize"] = quantize
    loaded = load_student(str(base_dir), dtype=dtype, device=str(dev),
                          chat_template=config.get("chat_template") if run is not None else None, quantize=quantize)
    tap = None
    if base_only:
        kind = "base"
        info.update(adapter=None, alignment=None)
    else:
        kind = "trained"
        adapter = run / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise EvalError(f"{run} has no final adapter ({adapter}); the run has not finished: resume it, "
                            f"or evaluate its base with --base-only")
        loaded.model = load_adapter(loaded.model, adapter)
        info["adapter"] = str(adapter)
        info["alignment"] = None
        if (run / "alignment").is_dir():
            transform = load_alignment(run / "alignment").to(dev)
            layer = transform.layer if transform.layer is not None else config.get("layer")
            tap = DistillTap(loaded, int(layer), transform, capture_attention=False)
            info["alignment"] = {"path": str(run / "alignment"), "layer": int(layer), "eps": transform.eps,
                                 "rank": transform.rank}
    loaded.model.eval()
    info["pad_to_square"] = pad
    return EvalModel(loaded, tap, kind, pad, dev, precision, info)


# ----------------------------------------------------------------------------- prompts

def left_pad_collate(pad_id: int, image_token_id: int, num_visual_tokens: int):
    """DistillDataset items -> LEFT-padded generation prompts (the answer cut off).

    Never raises for a sample (it may run in a DataLoader worker, whose exceptions
    reach the user wrapped in traceback text): broken items, and prompts without
    exactly `num_visual_tokens` image tokens, go to batch["errors"] as
    {"index", "error"}; the prompt tensors are there only when a sample is left."""

    def collate(items):
        items, errors = split_errors(items)
        good = []
        for it in items:
            found = it["input_ids"][:it["query_rows"][1]].count(image_token_id)
            if found == num_visual_tokens:
                good.append(it)
            else:
                errors.append({"index": it["index"], "error": f"expected {num_visual_tokens} image tokens in "
                                                              f"its prompt, found {found}"})
        if not good:
            return {"errors": errors}
        return {**_left_pad(good, pad_id, image_token_id, num_visual_tokens), "errors": errors}

    return collate


def _left_pad(items, pad_id: int, image_token_id: int, num_visual_tokens: int) -> dict:
    """Same-length prompts for generate(): pads on the left, the image tokens' positions found."""
    prompts = [it["input_ids"][:it["query_rows"][1]] for it in items]
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    query_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, it) in enumerate(zip(prompts, items)):
        off = T - len(p)
        input_ids[b, off:] = torch.tensor(p)
        attention_mask[b, off:] = 1
        lo, hi = it["query_rows"]
        query_mask[b, off + lo:off + hi] = True
    visual = (input_ids == image_token_id) & attention_mask.bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "visual_index": visual.nonzero()[:, 1].view(B, num_visual_tokens), "query_mask": query_mask,
            "index": torch.tensor([it["index"] for it in items])}


def prompt_dataset(em: EvalModel, records, image_root) -> DistillDataset:
    s = em.student
    # No truncation: an answer longer than any limit still leaves the prompt whole.
    return DistillDataset(records, image_root, s.processor, s.num_visual_tokens, 1 << 30, None, em.pad_to_square)


@torch.no_grad()
def generate_batch(em: EvalModel, batch, *, num_beams: int = 1, max_new_tokens: int = 64) -> torch.Tensor:
    """New token ids [B, <= max_new_tokens] (pad after EOS) for one left-padded batch."""
    s, dev = em.student, em.device
    tok = s.processor.tokenizer
    if em.tap is not None:  # generate() repeats each sample num_beams times before the prefill
        em.tap.set_batch(batch["visual_index"].repeat_interleave(num_beams, 0).to(dev),
                         batch["query_mask"].repeat_interleave(num_beams, 0).to(dev))
    input_ids = batch["input_ids"].to(dev)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with autocast(dev, em.precision):
        out = s.model.generate(input_ids=input_ids, attention_mask=batch["attention_mask"].to(dev),
                               pixel_values=batch["pixel_values"].to(dev, dtype=s.model.dtype),
                               max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                               num_return_sequences=1, use_cache=True, pad_token_id=pad_id,
                               suppress_tokens=[s.image_token_id],  # a placeholder, never an answer
                               eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
    return out[:, input_ids.shape[1]:]


def decode(em: EvalModel, new_ids: torch.Tensor) -> list[str]:
    tok = em.student.processor.tokenizer
    return [t.strip() for t in tok.batch_decode(new_ids, skip_special_tokens=True)]


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


def check_images(records: list[Record], image_root, data, on_error: str) -> tuple[list[Record], list[dict]]:
    """(records whose image exists, skipped rows), before any model is loaded: with
    `fail`, one missing image is an error listing the first few."""
    missing = {}
    for key in dict.fromkeys(r.images[0] for r in records):  # each image once; the student sees the first
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
    log.warning("%d images of %s not found: their %d questions are skipped", len(missing), data,
                sum(r.images[0] in missing for r in records))
    skipped = [_skipped_row(r, f"{missing[r.images[0]]}: no such file") for r in records if r.images[0] in missing]
    return [r for r in records if r.images[0] not in missing], skipped


def _skipped_row(record: Record, error: str) -> dict:
    return {"id": record.id, "image": record.images[0], "error": error}


def _prediction_row(record: Record, prediction: str) -> dict:
    row = {"id": record.id, "image": record.images[0], "question": record.prompt, "answer": record.answer,
           "prediction": prediction, "task": record.task, "answer_type": record.answer_type}
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


def generate_all(em: EvalModel, records: list[Record], image_root, dest: Path, *, on_error: str,
                 num_beams: int, max_new_tokens: int, batch_size: int, num_workers: int,
                 progress: bool, desc: str) -> Generated:
    """Generate for every record, appending each batch's rows to dest/predictions.jsonl
    as it finishes (flushed: a crash or Ctrl-C keeps what was generated)."""
    s = em.student
    tok = s.processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    loader = DataLoader(prompt_dataset(em, records, image_root), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers,
                        collate_fn=left_pad_collate(pad_id, s.image_token_id, s.num_visual_tokens))
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
                    for i, text in zip(batch["index"].tolist(), decode(em, new)):
                        out.rows.append(_prediction_row(records[i], text))
                        f.write(json.dumps(out.rows[-1], ensure_ascii=False) + "\n")
                    f.flush()
                bar.update(len(batch["errors"]) + (len(batch["index"]) if "index" in batch else 0))
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    return out


def evaluate(data, image_root, *, run=None, student: str | None = None, out=None, base_only: bool = False,
             fmt: str = "auto", split: str | None = None, lang: str = "en", num_beams: int = 1,
             max_new_tokens: int = 64, batch_size: int = 8, limit: int | None = None, device: str = "auto",
             precision: str = "auto", pad_to_square: bool | None = None, num_workers: int = 0,
             meteor: bool = True, on_error: str = "fail", name: str | None = None, progress: bool = True,
             model: EvalModel | None = None, quantize: str | None = "run") -> Path:
    """Generate for every record of `data` and write predictions.jsonl + metrics.json
    (+ skipped.jsonl). Returns the output directory. `model` reuses a loaded EvalModel."""
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise EvalError("num_beams, max_new_tokens, batch_size and limit must be >= 1")
    if on_error not in ON_ERROR:
        raise EvalError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if run is not None and out is not None and not base_only:
        raise EvalError("--out is for base models; a run's evaluation goes to RUN/eval/")
    stem = name or data_stem(data, split)
    dest = output_dir(run=run, base_only=base_only, out=out, stem=stem)
    records = select_records(data, image_root, fmt=fmt, split=split, lang=lang, limit=limit)
    evaluated, missing = check_images(records, image_root, data, on_error)
    if not evaluated:
        raise EvalError(f"{data}: none of its {len(records)} images was found under {image_root}; "
                        f"check --image-root")
    home = Path(out) if out is not None else None
    em = model or load_for_eval(run, student=student, base_only=base_only, home=home, device=device,
                                precision=precision, pad_to_square=pad_to_square, quantize=quantize)

    dest.mkdir(parents=True, exist_ok=True)
    # Results of an earlier evaluation must not sit next to this one's partial predictions.
    for stale in ("metrics.json", "skipped.jsonl"):
        (dest / stale).unlink(missing_ok=True)
    gen = generate_all(em, evaluated, image_root, dest, on_error=on_error, num_beams=num_beams,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, num_workers=num_workers,
                       progress=progress, desc=f"eval {stem}")
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
    text = metrics.get("text", {}).get("all")
    if text:
        for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "METEOR", "CIDEr"):
            out[k] = text.get(k)
    return out


__all__ = ["EvalError", "EvalModel", "load_for_eval", "left_pad_collate", "generate_batch", "decode",
           "evaluate", "select_records", "check_images", "generate_all", "score_predictions", "data_stem",
           "output_dir", "headline", "StudentError", "ON_ERROR", "EVAL_SPLIT"]
