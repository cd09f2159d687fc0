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

Output, per dataset (the data file's stem, plus "-SPLIT" when --split is given):

    RUN/eval/<stem>/predictions.jsonl   {id, image, question, answer (reference), prediction,
                                         task, answer_type[, score]}
    RUN/eval/<stem>/metrics.json        VQA and report metrics (distill.metrics), which
                                         implementation computed each, the model, settings
    base: RUN/base/eval/<stem>/... for --base-only of a run; DIR/eval/<stem>/... with
          DIR/base.json for a base student without a run (compare shows both as rows)
"""

from __future__ import annotations

import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from precompute.datasets import load_records

from . import metrics as M
from .data import DistillDataset, SampleError
from .student import DistillTap, Student, StudentError, load_alignment, load_student, make_tiny_student

log = logging.getLogger("medalign.eval")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to do."""


@dataclass
class EvalModel:
    """A student ready to generate: base (+ adapter + alignment tap for a trained run)."""
    student: Student
    tap: DistillTap | None
    kind: str                    # "trained" | "base"
    pad_to_square: bool
    device: torch.device
    bf16: bool
    info: dict = field(default_factory=dict)   # what was loaded, for metrics.json


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


def _run_pad_to_square(run: Path, config: dict) -> bool:
    """As training decided: the config's value, else the cache teacher's preprocessing."""
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
                  device: str = "auto", precision: str = "auto", pad_to_square: bool | None = None) -> EvalModel:
    """The model to evaluate. With `run`: its base student, plus (unless base_only) its
    adapter and alignment transform. Without: `student` (a path or "tiny", built in `home`)."""
    from peft import PeftModel

    dev = _device(device)
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    info: dict = {}
    if run is not None:
        run = Path(run)
        config = read_run_config(run)
        if student is not None and student != config["student"]:
            raise EvalError(f"--student {student!r} differs from the run's student {config['student']!r}; "
                            f"a run is evaluated on the base it was trained from")
        base_dir = _student_dir(config["student"], run, seed=int(config.get("seed", 0)))
        pad = _run_pad_to_square(run, config) if pad_to_square is None else pad_to_square
        info.update(run=str(run), student=config["student"])
    else:
        if student is None:
            raise EvalError("give --run RUN (a trained run) or --student PATH_OR_tiny with --out DIR (a base model)")
        base_only = True
        base_dir = _student_dir(student, Path(home))
        pad = bool(pad_to_square)
        info.update(student=student)
    info["student_path"] = str(base_dir)
    loaded = load_student(str(base_dir), dtype=dtype, device=str(dev),
                          chat_template=config.get("chat_template") if run is not None else None)
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
        with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter)
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
    return EvalModel(loaded, tap, kind, pad, dev, bf16, info)


# ----------------------------------------------------------------------------- prompts

def left_pad_collate(pad_id: int, image_token_id: int, num_visual_tokens: int):
    """DistillDataset items -> LEFT-padded generation prompts (the answer cut off)."""

    def collate(items):
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
        counts = visual.sum(1)
        if not bool((counts == num_visual_tokens).all()):
            raise SampleError(f"expected {num_visual_tokens} image tokens per prompt, found {counts.tolist()}")
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "visual_index": visual.nonzero()[:, 1].view(B, num_visual_tokens), "query_mask": query_mask,
                "index": torch.tensor([it["index"] for it in items])}

    return collate


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
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=em.bf16):
        out = s.model.generate(input_ids=input_ids, attention_mask=batch["attention_mask"].to(dev),
                               pixel_values=batch["pixel_values"].to(dev, dtype=s.model.dtype),
                               max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                               num_return_sequences=1, use_cache=True, pad_token_id=pad_id,
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
    vqa = [r for r in scored if r.get("answer_type") in ("closed", "open")]
    if vqa:
        result["vqa"] = M.vqa_metrics([r["prediction"] for r in vqa], [r["answer"] for r in vqa],
                                      [r["answer_type"] for r in vqa])
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


def evaluate(data, image_root, *, run=None, student: str | None = None, out=None, base_only: bool = False,
             fmt: str = "auto", split: str | None = None, num_beams: int = 1, max_new_tokens: int = 64,
             batch_size: int = 8, limit: int | None = None, device: str = "auto", precision: str = "auto",
             pad_to_square: bool | None = None, num_workers: int = 0, meteor: bool = True,
             name: str | None = None, progress: bool = True, model: EvalModel | None = None) -> Path:
    """Generate for every record of `data` and write predictions.jsonl + metrics.json.
    Returns the output directory. `model` reuses an already loaded EvalModel."""
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise EvalError("num_beams, max_new_tokens, batch_size and limit must be >= 1")
    if run is not None and out is not None and not base_only:
        raise EvalError("--out is for base models; a run's evaluation goes to RUN/eval/")
    stem = name or data_stem(data, split)
    dest = output_dir(run=run, base_only=base_only, out=out, stem=stem)
    records = load_records(data, image_root, fmt=fmt, split=split)
    records = [r for r in records if r.turns]
    if not records:
        raise EvalError(f"{data}: no records with a question (images alone cannot be evaluated)")
    if limit is not None:
        records = records[:limit]
    multi = sum(len(r.turns) > 1 for r in records)
    if multi:
        log.warning("%d records have several turns; the first question of each is evaluated", multi)
    home = Path(out) if out is not None else None
    em = model or load_for_eval(run, student=student, base_only=base_only, home=home, device=device,
                                precision=precision, pad_to_square=pad_to_square)

    s = em.student
    dataset = prompt_dataset(em, records, image_root)
    tok = s.processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=left_pad_collate(pad_id, s.image_token_id, s.num_visual_tokens))
    predictions: list[str] = [""] * len(records)
    t0 = time.perf_counter()
    new_tokens = 0
    bar = tqdm(total=len(records), desc=f"eval {stem}", unit="q", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            new = generate_batch(em, batch, num_beams=num_beams, max_new_tokens=max_new_tokens)
            new_tokens += int((new != pad_id).sum())
            for i, text in zip(batch["index"].tolist(), decode(em, new)):
                predictions[i] = text
            bar.update(len(batch["index"]))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    rows = []
    for r, pred in zip(records, predictions):
        row = {"id": r.id, "image": r.images[0], "question": r.prompt, "answer": r.answer, "prediction": pred,
               "task": r.task, "answer_type": r.answer_type}
        if r.answer and r.answer_type in ("closed", "open"):
            row["score"] = M.question_score(pred, r.answer, r.answer_type)
        rows.append(row)
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / "predictions.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    result = {
        "model": {"kind": em.kind, **em.info},
        "data": {"path": str(data), "image_root": str(image_root), "format": fmt, "split": split, "stem": stem,
                 "limit": limit},
        "generation": {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "do_sample": False, "kv_cache": True, "padding": "left",
                       "precision": "bf16" if em.bf16 else "fp32", "device": str(em.device),
                       "seconds": seconds, "new_tokens": new_tokens},
        **score_predictions(rows, meteor=meteor),
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
        out["open_recall"] = vqa["open"]["recall"]
        out["vqa_overall"] = vqa["overall"]["score"]
    text = metrics.get("text", {}).get("all")
    if text:
        for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "METEOR", "CIDEr"):
            out[k] = text.get(k)
    return out


__all__ = ["EvalError", "EvalModel", "load_for_eval", "left_pad_collate", "generate_batch", "decode",
           "evaluate", "score_predictions", "data_stem", "output_dir", "headline", "StudentError"]
