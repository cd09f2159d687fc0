"""Stage two: LoRA fine-tuning of a LLaVA-style student with MedAlign's losses.

    L = L_ntp + alpha * L_vis + beta * L_att        (docs/method.md)

The teacher is never loaded: its targets stream from the cache at their native
grid and are resized to the student's grid on the device. A run directory holds
everything needed to read, resume or reuse the run:

    run.lock  config.json  cache_metadata.json  versions.json  student.json  train.log  metrics.jsonl
    checkpoints/step-0000100/   (adapter/, alignment/, optimizer.pt, scheduler.pt, rng-RANK.pt, state.json,
                                 scaler.pt with fp16)
    adapter/  alignment/        (final: plain peft format + the alignment transform)
    loss_curves.png
    tensorboard/  wandb/ wandb_id.txt   (with --report-to: distill.tracking)
    finished.json               (written last: only a run holding it is finished; rundir.py)

One `train` at a time writes a run directory (run.lock, taken before anything is
written); a NaN/inf loss or gradient stops the run before its update reaches the
weights (`check_finite`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import transformers.modeling_utils
from torch.utils.data import DataLoader
from tqdm import tqdm

from precompute.cache import default_group_name, open_cache
from precompute.h5cache import is_h5_cache
from precompute.datasets import load_records
from precompute.targets import RECIPE, bilinear_matrix, resize_attention, resize_similarity, unpack_upper

from .config import RunConfig
from .data import DistillDataset, SampleError, make_collate, record_images
from .extras import require
from .losses import attention_distill_loss, learned_positions, next_token_loss, visual_alignment_loss
from .precision import DTYPES, LossScaler, autocast, prepare_for_kbit_training, resolve_precision
from .rundir import (DISK_FULL, STUDENT_RECORD, ensure_tiny_student, mark_finished, os_error_line, run_lock,
                     unmark_finished)
from .student import (AlignmentTransform, DistillTap, apply_lora, conversion_record, load_alignment,
                      load_student, save_alignment, student_geometry)
from .tracking import Tracker, check_available

log = logging.getLogger("medalign.distill")
# transformers versions with `slice_logits_to_keep` take a [B, T] bool mask as
# `logits_to_keep`: the LM head then projects only the positions the next-token loss
# reads (learned_positions). Older ones would misread the mask: they get every position.
LOGITS_BY_MASK = hasattr(transformers.modeling_utils, "slice_logits_to_keep")


@dataclass
class TrainResult:
    """What `train` leaves in memory besides the run directory (for notebooks, eval, tests)."""
    out: Path
    student: object          # distill.student.Student, model peft-wrapped
    transform: AlignmentTransform | None
    tap: DistillTap | None


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def check_finite(values: dict[str, float], step: int, sample_ids) -> None:
    """RunError if a loss term (or the gradient norm) of optimiser step `step` is NaN or
    inf. Called before the step's update: the weights, and so every checkpoint, stay
    those of the last good step. (One mechanism for every precision.)"""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    ids = list(sample_ids)
    shown = ", ".join(map(repr, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    raise RunError(f"non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())} at step {step} (samples {shown}); "
                   f"its update was not applied. Check those samples and their targets, or lower --lr")


# ----------------------------------------------------------------------------- run directory

class _LogFile(logging.FileHandler):
    def handleError(self, record):
        pass  # a full disk must not print a logging traceback beside the run's one error line


def _setup_logging(out: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    fh = _LogFile(out / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    log.propagate = False


def _versions() -> dict:
    import peft
    import transformers
    import zarr
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "zarr": zarr.__version__}


def _device(config: RunConfig) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch_dist.barrier()

    def sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        return t.tolist()


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size())


def all_reduce_grads(params, dist: Dist) -> None:
    """DDP's gradient sum, done once per optimiser step on the few trainable tensors
    (LoRA + W), flattened into one buffer: no model wrapper around peft and the tap."""
    if dist.world == 1:
        return
    for p in params:
        if p.grad is None:  # a rank that had no sample in this step still takes part
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch_dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- preflight

# The target recipes whose numbers these losses were written for. A new recipe means
# new numbers: it must be added here deliberately, never trained on by accident.
TRAINABLE_RECIPES = (RECIPE,)


def preflight(config: RunConfig, records, group, student_pad: bool | None = None) -> list[str]:
    """Everything that would make the run train on wrong or missing targets, checked
    before step one and before the student is loaded (a 7B load takes minutes).
    Returns warnings; raises RunError on problems. `student_pad`: the geometry the
    student declares (distill.student.student_geometry), None for one that says nothing.

    What the cache cannot tell: whether an image changed after its target was built.
    Targets are used as built; `medalign-cache verify` recomputes a few samples with
    the teacher and compares (the run's log names the command)."""
    warnings = []
    unusable = [r.id for r in records if not r.turns]
    if unusable:
        raise RunError(f"{len(unusable)} records have no question/answer (e.g. {unusable[:3]}): a folder of "
                       f"images can feed a cache build, but training needs a dataset with conversations")
    multi = sum(len(r.images) > 1 for r in records)
    if multi and config.images == "first":
        warnings.append(f"{multi} records name several images; the student sees the first of each "
                        f"(--images all shows it every image, each with its own targets)")
    if group is None:
        return warnings
    _check_complete(config, records, group)
    _check_recipe(group)
    image_geometry(config, group, student_pad)
    return warnings + teacher_warnings(group)


def check_student(config: RunConfig, student) -> None:
    """The part of the preflight that needs the loaded student."""
    if student.num_layers <= config.layer:
        raise RunError(f"--layer {config.layer} needs a student with more than {config.layer} decoder "
                       f"layers; this one has {student.num_layers}")


def _check_complete(config: RunConfig, records, group) -> None:
    keys = sorted({k for r in records for k in record_images(r, config.images)})
    missing = group.missing(keys)
    if not missing:
        return
    shown = "\n  ".join(missing[:10])
    failed = [k for k in missing if k in group and group.status(k) == "failed"]
    failed_note = (f"{len(failed)} of them failed when the cache was built (reasons in "
                   f"{group.path / 'failures.jsonl'}): fix those images or drop their records.\n"
                   if failed else "")
    raise RunError(
        f"{len(missing)} of {len(keys)} training images have no finished target in cache group "
        f"{group.name!r} ({group.path}):\n  {shown}{' ...' if len(missing) > 10 else ''}\n{failed_note}"
        f"Run `{rebuild_command(config, group)}` (it resumes: only what is missing is computed)"
        + (f", then `medalign-cache export --cache {Path(config.cache).with_suffix('')} --teacher {group.name} "
           f"--to NEW.h5` (an exported .h5 cache is read-only)." if is_h5_cache(config.cache) else "."))


def _check_recipe(group) -> None:
    recipe = group.metadata.get("recipe")
    if recipe in TRAINABLE_RECIPES:
        return
    found = "no target recipe in its metadata" if recipe is None else f"target recipe {recipe!r}"
    raise RunError(f"cache group {group.name!r} ({group.path}) has {found}; this medalign-distill trains on "
                   f"{' or '.join(map(repr, TRAINABLE_RECIPES))} only. Build the targets with this version's "
                   f"`medalign-cache build` into a new group (--group NAME), or train with the medalign "
                   f"version that built these.")


def cache_pads_to_square(group) -> bool:
    """Whether the teacher saw its images padded to square (the student must see the same)."""
    return bool((group.metadata.get("preprocessing") or {}).get("pad_to_square"))


def image_geometry(config: RunConfig, group, student_pad: bool | None) -> bool:
    """Whether the student sees its images padded to square: --pad-to-square/--no-pad-to-square
    if given, else the geometry the student was trained with, else (a student that says
    nothing, e.g. tiny) the cache teacher's. The teacher's targets must describe the same
    pixels, so a cache built with the other geometry is refused with the build command
    that fixes it."""
    cached = cache_pads_to_square(group) if group is not None else None
    if config.pad_to_square is not None:
        want, why = config.pad_to_square, ("--pad-to-square" if config.pad_to_square else "--no-pad-to-square")
    elif student_pad is not None:
        want, why = student_pad, (f"the student {config.student} (trained on images "
                                  f"{'padded to square' if student_pad else 'resized and centre-cropped'})")
    else:
        return bool(cached)
    if group is None or want == cached:
        return want
    name = f"{group.name}-{'pad' if want else 'crop'}"
    raise RunError(
        f"{why} needs teacher targets of images {'padded' if want else 'not padded'} to square, but cache group "
        f"{group.name!r} ({group.path}) was built {'with' if cached else 'without'} --pad-to-square "
        f"(preprocessing.pad_to_square={cached}): the targets would describe other pixels than the student sees. "
        f"Build matching targets with `{rebuild_command(config, group, pad=want, group_name=name)}` and train "
        f"with --teacher {name}"
        + (f", or drop {why} to follow the cache." if config.pad_to_square is not None else "."))


def teacher_warnings(group) -> list[str]:
    """What the run's targets are worth, from how the teacher was built."""
    md = group.metadata
    if md.get("random_init"):
        return [f"cache group {group.name!r} holds targets of a randomly initialised teacher (built with "
                f"--random-init): fine for tests and demos, meaningless for research"]
    if md.get("tiny"):  # trained tiny teachers are legitimate (examples/grounding trains one)
        return [f"cache group {group.name!r} comes from the tiny teacher, a toy architecture "
                f"(weights: {md.get('checkpoint') or 'unknown'})"]
    return []


def _teacher_args(group, group_name: str | None = None) -> list[str]:
    """The flags that name a cache group's teacher to `medalign-cache`, from its metadata."""
    md = group.metadata
    teacher = md.get("teacher", group.name)
    parts = [f"--teacher {teacher}"]
    if md.get("random_init"):
        parts.append(f"--random-init --seed {md.get('seed', 0)}")
    else:
        parts.append(f"--checkpoint {md.get('checkpoint') or 'CHECKPOINT'}")
    group_name = group_name or group.name
    if group_name != default_group_name(teacher):
        parts.append(f"--group {group_name}")
    return parts


def rebuild_command(config: RunConfig, group, pad: bool | None = None, group_name: str | None = None) -> str:
    """The `medalign-cache build` command that completes this run's targets, from the
    cache's own record of how the group was built (`pad`, `group_name`: build them with
    that geometry into that group instead). An exported .h5 cache is read-only: the
    command then builds into a Zarr cache beside it, to export again."""
    cache = config.cache
    if is_h5_cache(cache):
        cache = Path(cache).with_suffix("")
    parts = ["medalign-cache build", *_teacher_args(group, group_name),
             f"--data {config.data}", f"--image-root {config.image_root}", f"--cache {cache}"]
    if config.format != "auto":
        parts.append(f"--format {config.format}")
    if config.split:
        parts.append(f"--split {config.split}")
    if config.lang != "en":
        parts.append(f"--lang {config.lang}")
    if (cache_pads_to_square(group) if pad is None else pad):
        parts.append("--pad-to-square")
    return " ".join(parts)


def verify_command(config: RunConfig, group) -> str:
    """The `medalign-cache verify` command that spot-checks this run's targets against the images."""
    return " ".join(["medalign-cache verify", f"--cache {config.cache}", *_teacher_args(group),
                     f"--image-root {config.image_root}", "--samples 8"])


# ----------------------------------------------------------------------------- batches

def micro_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The sample order of an epoch: a seeded permutation, so a resumed run sees
    exactly the batches the uninterrupted one would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def batch_stream(dataset, collate, config: RunConfig, start_micro: int, pin: bool, dist: Dist = Dist()):
    """Yields this rank's micro-batches forever (epoch after epoch) from `start_micro` on.

    A global micro-batch has batch_size * world samples; rank r takes every world-th
    of them, so N ranks together see exactly what one process with N times the batch
    sees. A rank whose share is empty (an epoch's last, short batch) gets None."""
    global_size = config.batch_size * dist.world
    per_epoch = math.ceil(len(dataset) / global_size)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        mine = [b[dist.rank::dist.world] for b in micro_batches(len(dataset), global_size, config.seed, epoch)[skip:]]
        # Own generator: a DataLoader otherwise draws its worker seed from the global RNG,
        # which LoRA dropout also uses, and a resumed run would drift from the original.
        loader = iter(DataLoader(dataset, batch_sampler=[b for b in mine if b], collate_fn=collate,
                                 num_workers=config.num_workers, pin_memory=pin,
                                 generator=torch.Generator().manual_seed(config.seed + epoch)))
        for b in mine:
            yield next(loader) if b else None
        epoch, skip = epoch + 1, 0


def teacher_targets_on_device(batch, grid: int, native_grid: int, device, need_sim: bool, need_attn: bool):
    """Native-grid cache targets -> docs/method.md's S_t [B,V,V], a_t [B,V] at the student grid."""
    R = bilinear_matrix(native_grid, grid).to(device)
    sim = attn = None
    if need_sim:
        packed = batch["teacher_sim"].to(device, non_blocking=True).float()
        sim = resize_similarity(unpack_upper(packed, native_grid * native_grid), R)
    if need_attn:
        attn = resize_attention(batch["teacher_attn"].to(device, non_blocking=True).float(), R)
    return sim, attn


# ----------------------------------------------------------------------------- checkpoints

def _trainable(model, transform):
    params = [p for p in model.parameters() if p.requires_grad]
    if transform is not None:
        params += list(transform.parameters())
    return params


def rng_state() -> dict:
    """Every random stream a training step draws from: LoRA dropout uses torch's CPU or
    CUDA generator. (The sample order and the DataLoader have their own seeded generators;
    nothing in a step uses Python's or numpy's.)"""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model, transform, config, optimizer, scheduler, rng: dict,
                    dist: Dist = Dist(), scaler: LossScaler | None = None):
    """The state at the end of optimiser step `step`. Rank 0 writes the (replicated)
    weights and optimiser (and fp16's loss scaler); every rank its own `rng`, the RNG state
    at the end of that step (not the current one: a step interrupted mid-forward has drawn
    dropout masks)."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before (only complete ones are renamed)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        torch.save(rng, tmp / f"rng-{dist.rank}.pt")
        if dist.main:
            model.save_pretrained(tmp / "adapter")
            if transform is not None:
                save_alignment(transform, tmp / "alignment", layer=config.layer)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None and scaler.enabled:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "world": dist.world}))
    except BaseException:
        if dist.main:  # e.g. a full disk: give its space back; the previous checkpoints stay
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if dist.main:
        tmp.rename(final)  # a checkpoint directory exists only once complete
        for old in sorted((out / "checkpoints").glob("step-???????"))[:-2]:
            shutil.rmtree(old)
        log.info("checkpoint %s", final)
    dist.barrier()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps 1..step: a resumed run redoes the steps after its
    checkpoint (all of them without one), so each step is in metrics.jsonl once.
    A half-written last line (the process killed mid-write) goes too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted((out / "checkpoints").glob("step-???????"))
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model, transform, optimizer, scheduler, dist: Dist = Dist(),
                    scaler: LossScaler | None = None) -> int:
    """Restores what save_checkpoint wrote, RNG included; returns the step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter" / "adapter_model.safetensors"))
    if transform is not None:
        transform.load_state_dict(load_alignment(ckpt / "alignment").state_dict())
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("world", 1) != dist.world:
        raise RunError(f"{ckpt} was written by {state.get('world', 1)} processes; resume with the same number "
                       f"(now {dist.world}) so every rank continues its own sample stream")
    set_rng_state(torch.load(ckpt / f"rng-{dist.rank}.pt", weights_only=True))
    return state["step"]


# ----------------------------------------------------------------------------- the run

# Settings a --resume may change: they do not change what is trained.
RESUME_MAY_CHANGE = ("resume", "report_to")


def train(config: RunConfig, progress: bool = True) -> TrainResult:
    device = _device(config)
    dist = init_distributed(device)
    try:
        # One writer per run directory, locked before anything is written; rank 0 holds it
        # for the job (the other ranks write only their RNG state into rank 0's checkpoints).
        with run_lock(config.out) if dist.main else contextlib.nullcontext():
            return _train(config, device, dist, progress and dist.main)
    except OSError as e:  # a full disk outside the training loop (which says where it stopped)
        if e.errno not in DISK_FULL:
            raise
        log.error("%s", os_error_line(e))
        raise RunError(f"{os_error_line(e)}, then rerun the same command with --resume") from e


def _train(config: RunConfig, device: torch.device, dist: Dist, progress: bool) -> TrainResult:
    from transformers import get_cosine_schedule_with_warmup

    out = config.out
    if out.exists() and (out / "config.json").exists() and not config.resume:
        raise RunError(f"run directory {out} already holds a run: pass --resume to continue it, "
                       f"or choose another --out")
    if config.resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        now = config.to_dict()
        diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]}
        if diff:
            raise RunError(f"--resume with a different config than the run in {out}: "
                           + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        unmark_finished(out)  # a resumed run is unfinished until it writes its final files again
        _setup_logging(out)
    torch.manual_seed(config.seed)  # the same initial LoRA weights on every rank
    precision = resolve_precision(config.precision, device)

    # ---- data and cache, checked before the (slow) student load
    records = load_records(config.data, config.image_root, fmt=config.format, split=config.split,
                           lang=config.lang)
    group = open_cache(config.cache)[config.teacher] if config.distill else None
    student_pad = student_geometry(config.student)
    notes = preflight(config, records, group, student_pad)  # every rank checks; one tells
    check_available(config.report_to if dist.main else ())
    if config.quantize:  # before the (slow) student load, like the checks above
        require("bitsandbytes", f"--quantize {config.quantize}")
    for w in notes if dist.main else ():
        log.warning(w)
        tqdm.write(f"warning: {w}")
    if group is not None:
        log.info("targets are used as built; if images changed after the cache build, spot-check them with "
                 "`%s`", verify_command(config, group))
    # ---- student
    student_path = config.student
    if student_path == "tiny":
        student_path = out / "tiny-student"
        if dist.main:
            ensure_tiny_student(student_path, seed=config.seed)
        dist.barrier()
    student = load_student(str(student_path), dtype=DTYPES[precision], device=str(device),
                           chat_template=config.chat_template, quantize=config.quantize)
    check_student(config, student)
    pad = image_geometry(config, group, student_pad)  # the preflight has refused a mismatch
    if dist.main:  # only a run that passed its preflight is a run (a refused one can simply be rerun)
        config.save(out / "config.json")
        (out / "versions.json").write_text(json.dumps({**_versions(), "world_size": dist.world}, indent=2) + "\n")
        write_student_record(out, student, str(student_path), pad)
    native_grid = group.native_grid if group is not None else None
    if group is not None and dist.main:
        (out / "cache_metadata.json").write_text(json.dumps(group.metadata, indent=2, default=str) + "\n")

    if config.quantize:
        student.model = prepare_for_kbit_training(student.model, DTYPES[precision])
    apply_lora(student, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
               target_modules=list(config.lora_targets) if config.lora_targets else None)
    model = student.model
    transform = None
    if config.alpha > 0:
        transform = AlignmentTransform(student.hidden_size, eps=config.eps, rank=config.align_rank).to(device)
    tap = DistillTap(student, config.layer, transform, capture_attention=config.beta > 0) \
        if config.distill else None
    use_ckpt = config.gradient_checkpointing if config.gradient_checkpointing is not None \
        else device.type == "cuda"
    if use_ckpt:
        enable_gradient_checkpointing(model)
    model.train()

    # A removed loss costs nothing: its target is never read from the cache.
    dataset = DistillDataset(records, config.image_root, student.processor, student.num_visual_tokens,
                             config.max_length, group, pad, need_sim=config.alpha > 0, need_attn=config.beta > 0,
                             images=config.images)
    pad_id = student.processor.tokenizer.pad_token_id
    collate = make_collate(pad_id if pad_id is not None else 0, student.image_token_id,
                           student.num_visual_tokens)
    micro_per_epoch = math.ceil(len(dataset) / (config.batch_size * dist.world))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))

    params = _trainable(model, transform)
    if dist.world > 1:  # as DDP does: every rank starts from rank 0's weights
        for p in params:
            torch_dist.broadcast(p.data, 0)
    torch.manual_seed(config.seed + dist.rank)  # but each rank draws its own dropout masks, as in DDP
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps),
                                                total_steps)
    scaler = LossScaler(device, precision)
    step = 0
    if config.resume and (ckpt := latest_checkpoint(out)) is not None:
        step = load_checkpoint(ckpt, model, transform, optimizer, scheduler, dist, scaler)
        log.info("resumed from %s at step %d", ckpt, step)
    elif config.resume:
        log.info("no checkpoint in %s: starting again at step 0", out / "checkpoints")
    if dist.main:
        truncate_metrics(out / "metrics.jsonl", step)
    log.info("run %s: %d samples, %d optimiser steps, effective batch %d (%d processes), student grid %d, %s, "
             "device %s, %s%s, gradient checkpointing %s", out, len(dataset), total_steps,
             config.batch_size * config.grad_accum * dist.world, dist.world, student.grid,
             "distill (alpha=%g, beta=%g, layer %d)" % (config.alpha, config.beta, config.layer)
             if config.distill else "plain LoRA", device, precision,
             f", language model {config.quantize}" if config.quantize else "", "on" if use_ckpt else "off")

    def forward_losses(batch, n_tokens: float, n_images: float):
        """One micro-batch: its share of the step's losses, normalised by the step's
        GLOBAL token and image counts, so that accumulation and ranks add up exactly
        to one big batch (next-token loss per answer token, L_vis/L_att per image: each
        image of a multi-image record against its own targets)."""
        if tap is not None:
            tap.set_batch(batch["visual_index"].to(device), batch["query_mask"].to(device),
                          batch["image_rows"].to(device))
        labels = batch["labels"].to(device)
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device),
                           pixel_values=batch["pixel_values"].to(device, dtype=model.dtype),
                           logits_to_keep=learned_positions(labels) if LOGITS_BY_MASK else 0).logits
        ntp = next_token_loss(logits, labels, never=student.image_token_id)
        N = batch["visual_index"].shape[0]
        sums = {"ntp": ntp}
        loss = ntp / n_tokens
        if tap is not None:
            sim_t, attn_t = teacher_targets_on_device(batch, student.grid, native_grid, device,
                                                      config.alpha > 0, config.beta > 0)
            if config.alpha > 0:
                sums["vis"] = visual_alignment_loss(tap.aligned_visual.float(), sim_t) * N
                loss = loss + config.alpha * sums["vis"] / n_images
            if config.beta > 0:
                sums["att"] = attention_distill_loss(tap.visual_attention.float(), attn_t, mode=config.attn_loss,
                                                     temperature=config.attn_temperature) * N
                loss = loss + config.beta * sums["att"] / n_images
        scaler.scale(loss).backward()
        return {k: v.item() for k, v in sums.items()}

    stream = batch_stream(dataset, collate, config, step * config.grad_accum, pin=device.type == "cuda", dist=dist)
    metrics_file = (out / "metrics.jsonl").open("a") if dist.main else None
    tracker = Tracker(config.report_to if dist.main else (), out, config.to_dict(), step)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    saved = step
    # The state at the end of the last finished step is what a crash checkpoint holds.
    # Weights, optimiser and scheduler change only in the update at a step's end; the
    # RNG changes all through the forward (dropout), so its end-of-step state is kept.
    committed_rng = rng_state()
    updating = False  # from the optimiser update until the step is recorded
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batches = [next(stream) for _ in range(config.grad_accum)]
            mine = [b for b in batches if b is not None]
            broken = [e for b in mine for e in b.get("errors", ())]
            if broken:
                raise SampleError("; ".join(f"sample {e['id']!r} ({e['key']}): {e['error']}" for e in broken))
            local = [sum(float((b["labels"][:, 1:] != -100).sum()) for b in mine),
                     sum(b["input_ids"].shape[0] for b in mine),
                     sum(b["visual_index"].shape[0] for b in mine),
                     sum(float(b["attention_mask"].sum()) for b in mine)]
            n_tokens, n_samples, n_images, n_seen = dist.sum(local, device)
            sums = {"ntp": 0.0, "vis": 0.0, "att": 0.0}
            for batch in mine:
                for k, v in forward_losses(batch, max(n_tokens, 1.0), n_images).items():
                    sums[k] += v
            # Summed over ranks before the update, so every rank stops at the same step.
            ntp, vis, att = dist.sum([sums["ntp"], sums["vis"], sums["att"]], device)
            ntp, vis, att = ntp / max(n_tokens, 1.0), vis / n_images, att / n_images
            ids = [dataset.records[i].id for b in mine for i in b["index"].tolist()]
            check_finite({"ntp": ntp, "vis": vis, "att": att}, step + 1, ids)
            all_reduce_grads(params, dist)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if not scaler.enabled:  # fp16's scaler skips a step whose gradients overflowed itself (and counts it)
                check_finite({"grad_norm": float(grad_norm)}, step + 1, ids)
            updating = True
            if scaler.step(optimizer):
                scheduler.step()  # a skipped update leaves the schedule where it was
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": ntp + config.alpha * vis + config.beta * att, "ntp": ntp,
                      "vis": vis, "att": att, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": n_seen / dt, "samples_per_s": n_samples / dt, "images_per_s": n_images / dt,
                      "step_time_s": dt, "peak_memory_mb": _peak_memory_mb(device)}
            if scaler.enabled:
                record.update(loss_scale=scaler.scale_value, skipped_steps=scaler.skipped)
            if not config.alpha:
                record.pop("vis")
            if not config.beta:
                record.pop("att")
            if dist.main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                tracker.log(record)
            committed_rng = rng_state()
            updating = False
            if dist.main and (step % config.log_every == 0 or step == total_steps):
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{n_seen / dt:.0f}")
            if step % config.save_every == 0 and step < total_steps:
                save_checkpoint(out, step, model, transform, config, optimizer, scheduler, committed_rng, dist, scaler)
                saved = step
    except (Exception, KeyboardInterrupt) as e:
        # Nothing computed is lost: keep the last finished step, then say how to go on.
        # (With several processes the others are stuck in a collective: torchrun ends them.)
        bar.close()
        tracker.close()
        if metrics_file is not None:
            metrics_file.close()
        if step > saved and dist.world == 1 and not updating:
            try:
                save_checkpoint(out, step, model, transform, config, optimizer, scheduler, committed_rng,
                                scaler=scaler)
                saved = step
            except OSError as save_error:  # a full disk: the earlier checkpoint is what there is
                log.error("could not save a checkpoint of step %d: %s", step, os_error_line(save_error))
        elif updating:  # stopped inside an update: weights and records may disagree, so keep the last checkpoint
            log.error("stopped during the update of step %d: not checkpointed; a resume continues from step %d",
                      step, saved)
        if isinstance(e, KeyboardInterrupt):
            log.error("stopped at step %d: interrupted", step)
            raise
        why = os_error_line(e) if isinstance(e, OSError) else str(e)
        kept = (f"The last good checkpoint is {latest_checkpoint(out)} (step {saved})" if saved
                else "No checkpoint was saved")
        message = (f"training stopped at step {step}: {why}\n{kept}; fix the cause and rerun the same command "
                   f"with --resume.")
        log.error("%s", message)
        raise RunError(message) from e
    bar.close()
    tracker.close()
    if dist.main:
        metrics_file.close()
        model.save_pretrained(out / "adapter")
        if transform is not None:
            save_alignment(transform, out / "alignment", layer=config.layer)
        plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png")
        # Last, atomically: eval and pictures use only a run that has it (rundir.require_finished).
        mark_finished(out, {"step": step, "adapter": "adapter",
                            "alignment": "alignment" if transform is not None else None})
        log.info("done: adapter in %s", out / "adapter")
    dist.barrier()
    return TrainResult(out, student, transform, tap)


def write_student_record(out: Path, student, path: str, pad: bool) -> None:
    """How this run shows the student its inputs: the prompt template and the image
    geometry it used (eval, pictures and compare read them back), how its language model
    was stored (quantize), and where the student came from (the conversion record of a
    converted one)."""
    record = {"path": path, "chat_template": student.chat_template or "the checkpoint's own",
              "template_text": student.processor.chat_template, "pad_to_square": pad,
              "grid": student.grid, "num_visual_tokens": student.num_visual_tokens,
              "image_token_id": student.image_token_id, "quantize": student.quantize,
              "conversion": conversion_record(path) or None}
    (out / STUDENT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing: the reentrant variant runs the layers
    without autograd, so the attention the tap captures inside layer l is a constant
    and L_att silently trains nothing (tests/test_student.py shows it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def plot_loss_curves(metrics_path: Path, png: Path) -> None:
    """One panel per loss term, so a small term is not flattened by a large one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    terms = [t for t in ("loss", "ntp", "vis", "att") if any(t in r for r in rows)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    names = {"loss": "total", "ntp": "next-token", "vis": "visual alignment (L_vis)",
             "att": "attention distillation (L_att)"}
    for ax, t in zip(axes[0], terms):
        xs = [r["step"] for r in rows if t in r]
        ax.plot(xs, [r[t] for r in rows if t in r], lw=1)
        ax.set_title(names[t], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
