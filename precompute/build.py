"""Stage one: run a teacher once over a dataset's images and store its targets.

    records -> unique image keys -> pending rows of the cache group
      -> DataLoader workers decode + preprocess (overlaps the forward)
      -> batched teacher forward (inference_mode) -> similarity + attention
      -> rows buffered per shard -> background thread writes each shard

Resume is free: the cache's per-row status is the only progress record, written
after the row's targets, so rerunning the same command redoes only what never
reached the status array. Nothing is accumulated per sample beyond one shard.
"""

from __future__ import annotations

import math
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .cache import CacheError, GroupWriter, cache_location, default_group_name, open_cache
from .datasets import cache_keys, load_records, resolve_image
from .h5cache import is_h5_cache
from .images import ImageError, expand2square, load_image
from .targets import pack_upper, patch_similarity
from .teachers import Teacher, load_teacher


class BuildError(RuntimeError):
    """A build stopped on bad input; the message names the sample and the fix."""


@dataclass(frozen=True)
class BuildConfig:
    teacher: str
    cache: Path | str                 # a local folder, or an fsspec URL as a str (cache_schema.md)
    image_root: Path
    data: Path | None = None          # None: every image under image_root
    checkpoint: Path | None = None
    random_init: bool = False
    fmt: str = "auto"
    split: str | None = None
    lang: str = "en"                 # SLAKE question language (datasets.LANGUAGES)
    group: str | None = None          # default: the teacher's canonical name
    pad_to_square: bool = False       # LLaVA-Med's expand2square before the teacher's own transform
    batch_size: int = 32
    num_workers: int = 2
    device: str = "cpu"
    on_error: str = "fail"            # "fail" | "skip"
    shard_size: int | None = None
    seed: int = 0
    part: tuple[int, int] | None = None   # (i, n): this process computes the shards s with s % n == i

    def __post_init__(self):
        if self.part is not None:
            i, n = self.part
            if not (n >= 1 and 0 <= i < n):
                raise ValueError(f"part must be i/n with 0 <= i < n, got {i}/{n}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.random_init and self.checkpoint is not None:
            raise ValueError("give either a checkpoint or random_init, not both")
        if not Path(self.image_root).is_dir():
            raise ValueError(f"image root {self.image_root} is not a directory")
        cache_location(self.cache)  # a URL nobody can open is refused now, not after the teacher loads
        if is_h5_cache(self.cache):
            raise ValueError(f"--cache {self.cache}: a single-file HDF5 cache (`medalign-cache export`) is read-only; "
                             f"build into a cache folder, then export it again")


@dataclass
class BuildReport:
    group: str
    total: int
    computed: int = 0
    failed: int = 0
    already_done: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


class _ImageRows(Dataset):
    """Decodes and preprocesses one cache row in a worker; errors travel as text."""

    def __init__(self, rows, keys, image_root, preprocess, pad_to_square, pad_color):
        self.rows, self.keys = rows, keys
        self.image_root, self.preprocess = Path(image_root), preprocess
        self.pad_to_square, self.pad_color = pad_to_square, pad_color

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        key = self.keys[row]
        try:
            image = load_image(resolve_image(self.image_root, key))
            if self.pad_to_square:
                image = expand2square(image, self.pad_color)
            return row, self.preprocess(image), None
        except (ImageError, ValueError, OSError) as e:
            return row, None, str(e)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n); None -> taken from torchrun's RANK / WORLD_SIZE when set."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part/--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    return i, n


def shard_batches(rows: np.ndarray, shard_size: int, batch_size: int, part: tuple[int, int] | None):
    """Batches of pending rows that never straddle a shard, for the shards of this part.

    A batch's content then depends only on its shard, so a build split into parts runs
    exactly the forwards a single process runs, and writes byte-identical arrays."""
    shards = rows // shard_size
    batches = []
    for shard in np.unique(shards):
        if part is not None and shard % part[1] != part[0]:
            continue
        in_shard = rows[shards == shard]
        batches += [in_shard[i:i + batch_size].tolist() for i in range(0, len(in_shard), batch_size)]
    return batches


def _collate(items):
    ok = [(r, x) for r, x, err in items if err is None]
    bad = [(r, err) for r, _, err in items if err is not None]
    rows = torch.tensor([r for r, _ in ok], dtype=torch.long)
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return rows, pixels, bad


def teacher_targets_on_device(teacher: Teacher, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels -> (packed fp16 similarity [B, M], fp32 CLS attention [B, P]), on the
    teacher's device: what the cache stores for these images."""
    tokens, attention = teacher(pixels)
    return pack_upper(patch_similarity(tokens)).half(), attention.float()


def teacher_targets(teacher: Teacher, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """teacher_targets_on_device, as the numpy arrays the writer stores."""
    sim, attn = teacher_targets_on_device(teacher, pixels)
    return sim.cpu().numpy(), attn.cpu().numpy()


class _ShardBuffer:
    """Collects finished rows per shard; hands a shard to the writer thread once
    no later batch can add to it (rows arrive in ascending order)."""

    def __init__(self, writer: GroupWriter, pool: ThreadPoolExecutor):
        self.writer, self.pool = writer, pool
        self.rows: dict[int, list] = {}
        self.pending: list[Future] = []

    def add(self, row: int, sim: np.ndarray | None, attn: np.ndarray | None, error: str | None):
        self.rows.setdefault(row // self.writer.shard_size, []).append((row, sim, attn, error))

    def flush(self, before_shard: int | None = None):
        for shard in sorted(self.rows):
            if before_shard is not None and shard >= before_shard:
                break
            self._submit(self.rows.pop(shard))
        # Surface writer errors promptly instead of at the very end.
        done = [f for f in self.pending if f.done()]
        for f in done:
            f.result()
            self.pending.remove(f)

    def _submit(self, entries):
        entries.sort(key=lambda e: e[0])
        rows = np.array([e[0] for e in entries], dtype=np.int64)
        P, M = self.writer.num_patches, self.writer.num_patches * (self.writer.num_patches - 1) // 2
        sim = np.full((len(rows), M), np.nan, dtype=np.float16)
        attn = np.full((len(rows), P), np.nan, dtype=np.float32)
        failures = {}
        for i, (row, s, a, err) in enumerate(entries):
            if err is None:
                sim[i], attn[i] = s, a
            else:
                failures[row] = err
        self.pending.append(self.pool.submit(self.writer.write_rows, rows, sim, attn, failures))

    def close(self):
        self.flush()
        for f in self.pending:
            f.result()
        self.pending.clear()


def build_cache(config: BuildConfig, progress: bool = True) -> BuildReport:
    records = load_records(config.data, config.image_root, fmt=config.fmt, split=config.split,
                           lang=config.lang)
    keys = cache_keys(records)
    teacher = load_teacher(config.teacher, str(config.checkpoint) if config.checkpoint else None,
                           random_init=config.random_init, device=config.device, seed=config.seed)
    metadata = dict(teacher.metadata)
    metadata["preprocessing"] = {**metadata["preprocessing"], "pad_to_square": config.pad_to_square}
    group = config.group or default_group_name(teacher.spec.name)
    writer = GroupWriter.open(config.cache, group, keys, teacher.num_patches, metadata,
                              shard_size=config.shard_size, part=config.part,
                              image_root=str(Path(config.image_root).resolve()))
    report = BuildReport(group=group, total=len(keys))  # this dataset's images, not the whole group
    # LLaVA-Med pads with the image mean so padding looks like "nothing" after normalisation.
    pad_color = tuple(int(255 * m) for m in teacher.mean)

    with writer.lock(config.part):
        writer.clean_partials()
        # Failed rows are retried: after fixing an image, rerunning the same command is the fix.
        pending = writer.pending_rows(retry_failed=True)
        batches = shard_batches(pending, writer.shard_size, config.batch_size, config.part)
        todo = sum(map(len, batches))
        report.already_done = report.total - len(pending)
        if todo == 0:
            return report
        # The dataset indexes rows directly; the batch sampler fixes which rows go together.
        loader = DataLoader(
            _ImageRows(np.arange(len(writer.keys)), writer.keys, config.image_root, teacher.preprocess,
                       config.pad_to_square, pad_color),
            batch_sampler=batches, num_workers=config.num_workers, collate_fn=_collate,
            pin_memory=config.device.startswith("cuda"),
            persistent_workers=False, prefetch_factor=4 if config.num_workers > 0 else None,
        )
        label = f"teacher {group}" + (f" part {config.part[0]}/{config.part[1]}" if config.part else "")
        bar = tqdm(total=todo, desc=label, unit="img", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:
            buffer = _ShardBuffer(writer, pool)
            try:
                for rows, pixels, bad in loader:
                    for row, err in bad:
                        key = writer.keys[row]
                        if config.on_error == "fail":
                            where = str(resolve_image(config.image_root, key))
                            raise BuildError(
                                f"{err if err.startswith(where) else f'{where}: {err}'}\n"
                                f"Fix or remove this image, or rerun with --on-error skip to record it as "
                                f"failed and go on (finished rows are kept; the rerun resumes).")
                        buffer.add(row, None, None, err)
                        report.failures[key] = err
                    if pixels is not None:
                        sim, attn = teacher_targets(teacher, pixels.to(config.device, non_blocking=True))
                        for i, row in enumerate(rows.tolist()):
                            buffer.add(row, sim[i], attn[i], None)
                    report.computed += len(rows)
                    report.failed += len(bad)
                    first_row = min([*rows.tolist(), *(r for r, _ in bad)])
                    buffer.flush(before_shard=first_row // writer.shard_size)
                    bar.update(len(rows) + len(bad))
            finally:
                # On success, on bad input and on Ctrl-C alike: what was computed is kept.
                buffer.close()
                bar.close()
        report.seconds = time.perf_counter() - start
    return report


@dataclass
class VerifyReport:
    group: str
    total: int
    done: int
    failed: int
    pending: int
    read_back: int = 0                 # done rows whose stored chunks were all read, checked and decoded
    unchecked_arrays: list[str] = field(default_factory=list)  # arrays without chunk checksums (older caches)
    recomputed: int = 0                # done rows recomputed with the teacher and compared
    max_rel_error: float = 0.0         # of those, the largest error relative to the target's scale
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# A recomputed target is compared relative to its own scale, element by element:
# |stored - fresh| <= VERIFY_RTOL * (|fresh| + 0.1 * max|fresh|). fp16 storage rounds a
# cosine by <= 2^-11 of itself (4.9e-4); forwards on other hardware or thread counts
# differ by less. The floor (a tenth of the largest value) keeps near-zero entries from
# being held to a pure relative bound. An attention value off by 48% (cache_schema.md
# "Checksums" has the story) fails this by 100x; an absolute 2e-3 let it pass.
VERIFY_RTOL = 5e-3


def relative_error(stored: np.ndarray, fresh: np.ndarray) -> float:
    """max |stored - fresh| / (|fresh| + 0.1 max|fresh|): the error in units of the target's scale."""
    stored, fresh = stored.astype(np.float64), fresh.astype(np.float64)
    scale = np.abs(fresh) + 0.1 * np.abs(fresh).max()
    return float((np.abs(stored - fresh) / np.maximum(scale, np.finfo(np.float64).tiny)).max())


def check_integrity(g, report: VerifyReport) -> None:
    """Without the teacher: the group's structure (metadata, array shapes against keys and
    status) and every stored chunk of every done row (checksum, decode, finite values,
    a positive attention map: what the writer promised). Adds to report.problems."""
    md, P = g.metadata, g.num_patches
    for name in ("teacher", "recipe", "num_patches", "shard_size", "preprocessing"):
        if md.get(name) is None:
            report.problems.append(f"metadata: {name!r} is missing from {g.path / 'zarr.json'}")
    if math.isqrt(P) ** 2 != P or P < 2:
        report.problems.append(f"metadata: num_patches {P} is not a square patch grid")
    if report.total == 0:
        report.problems.append(f"group {g.name!r} ({g.path}) holds no keys: nothing to train on; rebuild it")
    report.problems += g.structure_problems()
    report.unchecked_arrays = g.unchecked_arrays
    if report.problems:
        return  # reading rows of a mis-shaped group would only repeat the problem
    bad = 0
    for key in g.keys():
        if g.status(key) != "done":
            continue
        try:
            sim, attn = g.native_packed(key)
        except CacheError as e:
            report.problems.append(str(e))
            bad += 1
        else:
            if not (np.isfinite(sim).all() and np.isfinite(attn).all() and attn.max() > 0):
                report.problems.append(f"{key!r}: stored targets hold NaN/inf or an all-zero attention map; "
                                       f"rebuild the group")
                bad += 1
        report.read_back += 1
        if bad >= 20:  # enough to know; a gutted shard would otherwise list thousands
            report.problems.append(f"stopped after {bad} damaged rows; rebuild the group")
            break


def verify_cache(cache_path, teacher_name: str | None = None, image_root: Path | None = None,
                 checkpoint: Path | None = None, random_init: bool = False, samples: int | None = 0,
                 seed: int | None = None, device: str = "cpu", group: str | None = None) -> VerifyReport:
    """Check one group: always its integrity without the teacher (`check_integrity`:
    structure, and every chunk of every done row against its checksum); with samples
    (a number, or None for every done row) also recompute that many random done
    samples with the teacher and compare (`VERIFY_RTOL`).

    teacher_name / group: the group (its name or a teacher alias). For the recomputation,
    what is not given comes from the group's metadata, i.e. from the build that made it:
    the teacher, image_root (the last build's), the checkpoint (or random init and its seed)."""
    if group is None and teacher_name is None:
        raise CacheError("name the group to verify: --teacher NAME or --group NAME")
    cache = open_cache(cache_path)
    g = cache[group or (teacher_name if teacher_name in cache else default_group_name(teacher_name))]
    keys = g.keys()
    status = [g.status(k) for k in keys]
    report = VerifyReport(group=g.name, total=len(keys), done=status.count("done"),
                          failed=status.count("failed"), pending=status.count("pending"))
    if report.pending:
        report.problems.append(f"{report.pending} of {report.total} samples were never computed: "
                               f"rerun the same `medalign-cache build` command to finish them")
    before = len(report.problems)
    check_integrity(g, report)
    if samples == 0 or len(report.problems) > before:  # a damaged group: recomputing proves nothing more
        return report
    _recompute(g, report, teacher_name or g.metadata.get("teacher", g.name), image_root, checkpoint,
               random_init, samples, seed, device, [k for k, s in zip(keys, status) if s == "done"])
    return report


def _recompute(g, report: VerifyReport, teacher_name: str, image_root, checkpoint, random_init: bool,
               samples: int | None, seed, device: str, done_keys: list[str]) -> None:
    """Recompute random done samples with the teacher and compare them to the stored ones."""
    image_root = _recorded_image_root(g) if image_root is None else Path(image_root)
    checkpoint, random_init, seed = _recorded_teacher(g, checkpoint, random_init, seed)
    teacher = load_teacher(teacher_name, str(checkpoint) if checkpoint else None,
                           random_init=random_init, device=device, seed=seed)
    for field_name in ("arch", "checkpoint_sha256", "random_init", "recipe", "num_patches"):
        stored, now = g.metadata.get(field_name), teacher.metadata.get(field_name)
        if stored != now:
            report.problems.append(f"metadata {field_name!r}: cache has {stored!r}, this teacher has {now!r}")
    if any(p.startswith("metadata") for p in report.problems):
        return  # recomputing with another teacher would only repeat the mismatch

    n = len(done_keys) if samples is None else min(samples, len(done_keys))
    chosen = random.Random(seed).sample(done_keys, n)
    pad = g.metadata.get("preprocessing", {}).get("pad_to_square", False)
    pad_color = tuple(int(255 * m) for m in teacher.mean)
    for key in chosen:
        image = load_image(resolve_image(image_root, key))
        if pad:
            image = expand2square(image, pad_color)
        sim, attn = teacher_targets(teacher, teacher.preprocess(image)[None].to(device))
        stored_sim, stored_attn = g.native_packed(key)
        err = max(relative_error(stored_sim, sim[0]), relative_error(stored_attn, attn[0]))
        report.max_rel_error = max(report.max_rel_error, err)
        report.recomputed += 1
        if err > VERIFY_RTOL:
            report.problems.append(f"{key}: stored targets differ from a fresh teacher run by {err:.1e} of their "
                                   f"scale (> {VERIFY_RTOL:.0e}): the image changed or the cache is stale; "
                                   f"rebuild this group")


def _recorded_image_root(g) -> Path:
    """The image folder of the group's last build (its `image_root` attribute)."""
    root = g.metadata.get("image_root")
    if root is None:
        raise CacheError(f"cache group {g.name!r} ({g.path}) does not record its image folder (built by an older "
                         f"medalign); pass --image-root")
    if not Path(root).is_dir():
        raise CacheError(f"cache group {g.name!r} was last built from images under {root}, which no longer "
                         f"exists; pass --image-root <the folder its keys are relative to>")
    return Path(root)


def _recorded_teacher(g, checkpoint, random_init: bool, seed: int | None):
    """(checkpoint, random_init, seed) for verify: what was given, else what built the group."""
    md = g.metadata
    if checkpoint is None and not random_init:
        if md.get("random_init"):
            random_init = True
        elif md.get("checkpoint"):
            checkpoint = Path(md["checkpoint"])
            if not checkpoint.exists():
                raise CacheError(f"cache group {g.name!r} was built from checkpoint {checkpoint}, which no longer "
                                 f"exists; pass --checkpoint <the same weights>")
    if seed is None:
        seed = md.get("seed") if random_init and md.get("seed") is not None else 0
    return checkpoint, random_init, seed


__all__ = ["BuildConfig", "BuildError", "BuildReport", "build_cache", "verify_cache", "VerifyReport",
           "teacher_targets", "CacheError"]
