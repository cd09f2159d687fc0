"""A trained MedAlign model, ready to answer: `load_medalign` and batched generation.

    from distill import load_medalign
    m = load_medalign("runs/unimed-l20")            # a run directory, or an exported folder
    print(m.answer(["scan.png"], "Is there a pleural effusion?"))
    # or plain transformers: the alignment transform follows the image tokens by itself
    out = m.model.generate(input_ids=..., attention_mask=..., pixel_values=...)

One loader for everything that runs a trained model (eval, predict, pictures, export),
so the same inputs meet the same model, prompt template and image geometry:

- the base student (a run's `student`, "tiny" -> RUN/tiny-student; an export's
  `student/` folder), with the prompt template the run trained with;
- its LoRA adapter, loaded with plain peft (`PeftModel.from_pretrained`), unless the
  export merged it into the weights;
- the alignment transform `X + eps X Wᵀ` on the visual tokens after decoder layer l-1.
  It cannot be folded into the weights (it acts on the visual tokens' positions only), so
  a forward pre-hook finds the image tokens in each forward's input_ids and applies it
  there (`DistillTap.follow_input_ids`): `model.generate` works as with any LLaVA. Decode
  steps of generation (one new token) are left alone: the transformed visual tokens sit
  in the KV cache from the prefill;
- the image geometry the run trained with (pad to square or not) and the image mode
  (`first` image of a record or `all`).

Generation here is batched and LEFT-padded (generate() derives position ids from the
attention mask, so a padded prompt generates what it would alone), greedy or beam
search, with the KV cache; the image placeholder token is never generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from precompute.datasets import Record

from .data import DistillDataset, split_errors, text_limit, visual_layout
from .precision import DTYPES, autocast, resolve_precision
from .rundir import STUDENT_RECORD, ensure_tiny_student, require_finished
from .student import (DistillTap, Student, StudentError, load_adapter, load_alignment, load_student,
                      student_geometry)

EXPORT_RECORD = "medalign_export.json"   # what `medalign-distill export` writes (distill/export.py)


class LoadError(ValueError):
    """A model that cannot be loaded as asked; the message says what to do."""


@dataclass
class MedAlignModel:
    """A student ready to generate: base (+ adapter + alignment transform of a trained run)."""
    student: Student
    tap: DistillTap | None       # the alignment transform, following the image tokens of each forward
    kind: str                    # "trained" | "base"
    pad_to_square: bool          # images padded to square before the processor (the run's geometry)
    images: str                  # "first" | "all": which images of a record the student is shown
    device: torch.device
    precision: str               # "bf16" | "fp16" | "fp32" (resolved: distill.precision)
    info: dict = field(default_factory=dict)   # what was loaded (metrics.json, export's README)

    @property
    def model(self):
        return self.student.model

    def dataset(self, records, image_root) -> DistillDataset:
        """Prompts of `records` as this model is shown them. No truncation: an answer longer
        than any limit still leaves the prompt whole. But a prompt longer than the model's
        context cannot be generated from: such text is refused (answers cut) by characters,
        before it is tokenised (data.bound_text)."""
        s = self.student
        context = getattr(s.model.config.get_text_config(), "max_position_embeddings", None) or 32768
        return DistillDataset(records, image_root, s.processor, s.num_visual_tokens, 1 << 30, None,
                              self.pad_to_square, images=self.images,
                              max_chars=text_limit(s.processor.tokenizer, context))

    def collate(self):
        tok = self.student.processor.tokenizer
        return left_pad_collate(pad_token_id(tok), self.student.image_token_id, self.student.num_visual_tokens)

    def answer(self, images: list, question: str, *, max_new_tokens: int = 64, num_beams: int = 1,
               streamer=None) -> str:
        """The answer to one question about one study (one image, or several with images="all")."""
        paths = [Path(p).expanduser().resolve() for p in images]
        root = common_folder(paths)
        record = Record(id="q", images=tuple(p.relative_to(root).as_posix() for p in paths),
                        turns=((question, ""),), task="vqa")
        batch = self.collate()([self.dataset([record], root)[0]])
        if batch["errors"]:
            raise LoadError(batch["errors"][0]["error"])
        return decode(self, generate_batch(self, batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                           streamer=streamer))[0]


def common_folder(paths: list[Path]) -> Path:
    """The deepest folder holding every one of `paths` (the image root of loose files)."""
    common = []
    for group in zip(*(p.parent.parts for p in paths)):
        if len(set(group)) > 1:
            break
        common.append(group[0])
    return Path(*common)


def pad_token_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


# ----------------------------------------------------------------------------- loading

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise LoadError(f"{run} is not a run directory (no config.json); pass the --out of a "
                        f"`medalign-distill run` (or an exported folder), or a base student with --student PATH")
    return json.loads(path.read_text())


def model_settings(path) -> dict:
    """How a trained model was made: an exported folder's record (EXPORT_RECORD), else
    the run's config.json (read_run_config: an error when there is none)."""
    path = Path(path)
    if (path / EXPORT_RECORD).is_file():
        return json.loads((path / EXPORT_RECORD).read_text())
    return read_run_config(path)


def run_pad_to_square(run: Path, config: dict) -> bool:
    """The image geometry the run trained with: its student.json (written by training),
    else, for runs from before it, the config's value or the cache teacher's preprocessing."""
    record = Path(run) / STUDENT_RECORD
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
        return ensure_tiny_student(Path(home) / "tiny-student", seed=seed)
    return Path(student).expanduser()


@dataclass(frozen=True)
class _Parts:
    """Where a trained model's pieces are, and how it showed the student its inputs."""
    base: Path
    chat_template: str | None
    adapter: Path | None
    alignment: Path | None
    layer: int | None
    pad_to_square: bool
    images: str
    quantize: str | None         # how the run stored the language model ("4bit", "8bit", None)
    info: dict


def _run_parts(run: Path, config: dict, student: str | None) -> _Parts:
    if student is not None and student != config["student"]:
        raise LoadError(f"--student {student!r} differs from the run's student {config['student']!r}; "
                        f"a run is evaluated on the base it was trained from")
    adapter, alignment = run / "adapter", run / "alignment"
    return _Parts(base=_student_dir(config["student"], run, seed=int(config.get("seed", 0))),
                  chat_template=config.get("chat_template"),
                  adapter=adapter if (adapter / "adapter_config.json").is_file() else None,
                  alignment=alignment if alignment.is_dir() else None, layer=config.get("layer"),
                  pad_to_square=run_pad_to_square(run, config), images=config.get("images", "first"),
                  quantize=config.get("quantize"), info={"run": str(run), "student": config["student"]})


def _export_parts(folder: Path, record: dict) -> _Parts:
    adapter, alignment = folder / "adapter", folder / "alignment"
    return _Parts(base=folder / "student", chat_template=record.get("chat_template"),
                  adapter=adapter if (adapter / "adapter_config.json").is_file() else None,
                  alignment=alignment if alignment.is_dir() else None, layer=record.get("layer"),
                  pad_to_square=bool(record["pad_to_square"]), images=record.get("images", "first"),
                  quantize=record.get("quantize"), info={"export": str(folder), "merged": record.get("merged", False),
                        "run": record.get("run", {}).get("path")})


def load_medalign(path=None, *, student: str | None = None, base_only: bool = False, home=None,
                  device: str = "auto", precision: str = "auto", pad_to_square: bool | None = None,
                  quantize: str | None = "run", doing: str = "use it") -> MedAlignModel:
    """A trained model ready to generate (see the module docstring).

    path: a run directory (`medalign-distill run --out`) or an exported folder
      (`medalign-distill export --out`); base_only: its base student, nothing added.
    student (without path): a base student, a local LLaVA folder or "tiny" (built in `home`).
    precision: "auto" (distill.precision: bf16 on GPUs that have it, fp16 on others, fp32 on
    CPU), "bf16", "fp16" or "fp32"; pad_to_square overrides the geometry; quantize: "run"
    stores the language model as the run trained it (none for a base student), or "none" /
    None, "4bit", "8bit" (a quantized run's adapter loads on the unquantized base too).
    A run must have finished (RUN/finished.json; `doing` completes the message that says how)."""
    dev = _device(device)
    precision = resolve_precision(precision, dev)
    if path is not None:
        path = Path(path)
        exported = (path / EXPORT_RECORD).is_file()
        if not exported and not base_only:  # the base needs nothing of the run but its config
            require_finished(path, doing)
        settings = model_settings(path)
        parts = _export_parts(path, settings) if exported else _run_parts(path, settings, student)
    elif student is not None:
        base = _student_dir(student, Path(home) if home is not None else Path("."))
        parts = _Parts(base=base, chat_template=None, adapter=None, alignment=None, layer=None,
                       pad_to_square=bool(student_geometry(str(base))), images="first", quantize=None,
                       info={"student": student})
        base_only = True
    else:
        raise LoadError("give a run directory or exported folder, or --student PATH_OR_tiny (a base model)")
    quantize = parts.quantize if quantize == "run" else (None if quantize == "none" else quantize)
    info = {**parts.info, "student_path": str(parts.base), "quantize": quantize}
    loaded = load_student(str(parts.base), dtype=DTYPES[precision], device=str(dev),
                          chat_template=parts.chat_template, quantize=quantize)
    tap, kind = None, "base"
    if base_only:
        info.update(adapter=None, alignment=None)
    else:
        kind = "trained"
        merged = info.get("merged", False)
        if parts.adapter is None and not merged:
            raise LoadError(f"{path} has no adapter ({path / 'adapter'}): an export must hold adapter/ unless "
                            f"it was merged; export the run again")
        if parts.adapter is not None:
            loaded.model = load_adapter(loaded.model, parts.adapter)
        info["adapter"] = "merged into the weights" if merged else str(parts.adapter)
        info["alignment"] = None
        if parts.alignment is not None:
            transform = load_alignment(parts.alignment).to(dev)
            layer = int(transform.layer if transform.layer is not None else parts.layer)
            tap = DistillTap(loaded, layer, transform, capture_attention=False)
            tap.follow_input_ids(loaded.image_token_id, loaded.num_visual_tokens)
            info["alignment"] = {"path": str(parts.alignment), "layer": layer, "eps": transform.eps,
                                 "rank": transform.rank}
    loaded.model.eval()
    pad = parts.pad_to_square if pad_to_square is None else pad_to_square
    info.update(pad_to_square=pad, images=parts.images, chat_template=loaded.chat_template or "the checkpoint's own")
    return MedAlignModel(loaded, tap, kind, pad, parts.images, dev, precision, info)


# ----------------------------------------------------------------------------- prompts and generation

def left_pad_collate(pad_id: int, image_token_id: int, num_visual_tokens: int):
    """DistillDataset items -> LEFT-padded generation prompts (the answer cut off).

    Never raises for a sample (it may run in a DataLoader worker, whose exceptions
    reach the user wrapped in traceback text): broken items, and prompts whose image
    tokens are not a whole number of images, go to batch["errors"] as {"index", "error"};
    the prompt tensors are there only when a sample is left."""

    def collate(items):
        items, errors = split_errors(items)
        good = []
        for it in items:
            found = it["input_ids"][:it["query_rows"][1]].count(image_token_id)
            expected = num_visual_tokens * len(it["pixel_values"])
            if found == expected:
                good.append(it)
            else:
                errors.append({"index": it["index"], "error": f"expected {expected} image tokens in "
                                                              f"its prompt, found {found}"})
        if not good:
            return {"errors": errors}
        return {**_left_pad(good, pad_id, image_token_id, num_visual_tokens), "errors": errors}

    return collate


def _left_pad(items, pad_id: int, image_token_id: int, num_visual_tokens: int) -> dict:
    """Same-length prompts for generate(): pads on the left, the images' token positions found."""
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
    visual_index, image_rows = visual_layout(input_ids, image_token_id, num_visual_tokens, attention_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "visual_index": visual_index, "image_rows": image_rows, "query_mask": query_mask,
            "index": torch.tensor([it["index"] for it in items])}


@torch.no_grad()
def generate_batch(m: MedAlignModel, batch, *, num_beams: int = 1, max_new_tokens: int = 64,
                   streamer=None) -> torch.Tensor:
    """New token ids [B, <= max_new_tokens] (pad after EOS) for one left-padded batch. The
    alignment transform finds the visual tokens in the (beam-expanded) prompt by itself."""
    s, dev = m.student, m.device
    tok = s.processor.tokenizer
    input_ids = batch["input_ids"].to(dev)
    with autocast(dev, m.precision):
        out = s.model.generate(input_ids=input_ids, attention_mask=batch["attention_mask"].to(dev),
                               pixel_values=batch["pixel_values"].to(dev, dtype=s.model.dtype),
                               max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                               num_return_sequences=1, use_cache=True, pad_token_id=pad_token_id(tok),
                               eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None,
                               suppress_tokens=[s.image_token_id],  # a placeholder, never an answer
                               streamer=streamer)
    return out[:, input_ids.shape[1]:]


@torch.no_grad()
def student_attention(m: MedAlignModel, batch: dict, layer: int) -> torch.Tensor:
    """The prompt rows' attention over each image's tokens at decoder layer `layer`, on the
    prompt alone (with the run's alignment transform in place): [N images, V]."""
    s, dev = m.student, m.device
    tap = DistillTap(s, layer, None, capture_attention=True)
    try:
        tap.set_batch(batch["visual_index"].to(dev), batch["query_mask"].to(dev), batch["image_rows"].to(dev))
        s.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                pixel_values=batch["pixel_values"].to(dev, dtype=s.model.dtype))
        return tap.visual_attention.float().cpu()
    finally:
        tap.remove()


def decode(m: MedAlignModel, new_ids: torch.Tensor) -> list[str]:
    tok = m.student.processor.tokenizer
    return [t.strip() for t in tok.batch_decode(new_ids, skip_special_tokens=True)]


__all__ = ["EXPORT_RECORD", "LoadError", "MedAlignModel", "StudentError", "decode", "generate_batch",
           "left_pad_collate", "load_medalign", "model_settings", "read_run_config", "run_pad_to_square"]
