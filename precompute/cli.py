"""`medalign-cache`: build, inspect and verify teacher-target caches.

A thin layer: each command builds a config and calls one function. Errors that
a user can fix become one line and exit code 1, not a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .build import BuildConfig, BuildError, build_cache, parse_part, verify_cache
from .cache import CacheError, cache_location, open_cache
from .datasets import LANGUAGES, DatasetError, normalize_key
from .h5cache import GZIP_LEVEL, export_h5
from .images import ImageError
from .teachers import TeacherError, teacher_names

USER_ERRORS = (BuildError, CacheError, DatasetError, ImageError, TeacherError, KeyError, ValueError)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _fail(e: Exception):
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise click.ClickException(str(msg)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Compute an expert medical CLIP's targets once and store them for every training run.

    \b
    medalign-cache build  --teacher unimed --checkpoint unimed_clip_vit_b16.pt \\
                          --data train.json --image-root images/ --cache ./cache
    medalign-cache info   --cache ./cache
    medalign-cache verify --cache ./cache --teacher unimed
    medalign-cache export --cache ./cache --teacher unimed --to cache.h5

    Targets are stored at the teacher's native patch grid and resized exactly to
    any student's grid when read (see cache_schema.md).
    """


@main.command()
@click.option("--teacher", required=True, metavar="NAME",
              help=f"Teacher name ({', '.join(teacher_names())}) or open_clip:ARCH for any open_clip "
                   "architecture.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local teacher weights (file, or directory for biomedclip). Loaded weights_only.")
@click.option("--random-init", is_flag=True,
              help="Random weights instead of a checkpoint: for tests and demos only; marked in the "
                   "cache metadata.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Dataset file (LLaVA JSON, ...). Omit to take every image under --image-root.")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder the dataset's image paths are relative to; cache keys are these relative paths.")
@click.option("--cache", required=True, metavar="DIR|URL",
              help="Cache folder (created if missing; other teachers' groups are left alone), or an fsspec URL "
                   "(e.g. s3://bucket/cache; see cache_schema.md, \"Caches at URLs\").")
@click.option("--format", "fmt", default="auto", show_default=True, help="Dataset format.")
@click.option("--split", default=None, help="Split to read for files that hold several (R2Gen).")
@click.option("--lang", type=click.Choice(LANGUAGES), default="en", show_default=True,
              help="SLAKE question language (q_lang); all: both.")
@click.option("--group", default=None, help="Group name in the cache [default: the teacher's name].")
@click.option("--pad-to-square", is_flag=True,
              help="Pad images to square (LLaVA-Med's expand2square) before the teacher's transform.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", "num_workers", default=min(4, os.cpu_count() or 1), show_default=True,
              help="DataLoader workers decoding images while the teacher runs.")
@click.option("--device", default="cuda" if _has_cuda() else "cpu", show_default=True)
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at the first broken image (finished work is kept); skip: record it as "
                   "failed in the cache and failures.jsonl, and go on.")
@click.option("--shard-size", type=int, default=None, help="Samples per shard file [default: ~32 MB].")
@click.option("--seed", default=0, show_default=True, help="Seed for --random-init weights.")
@click.option("--part", "--shard", "part", default=None, metavar="I/N",
              help="Compute only part I of N (shards s with s % N == I), e.g. one task of a SLURM array; "
                   "parts write disjoint files of the same cache and resume on their own. Under torchrun "
                   "it is taken from RANK/WORLD_SIZE. --shard is another name for it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(quiet, **kw):
    """Run a teacher over a dataset's images and store its targets (resumable).

    \b
    Many GPUs / machines: every process runs the same command and takes its part:
      torchrun --nproc_per_node 4 -m precompute.cli build ...        (or: medalign-cache build ... --part $I/$N)
    """
    try:
        kw["part"] = parse_part(kw["part"])
        local_rank = os.environ.get("LOCAL_RANK")
        if kw["device"] == "cuda" and local_rank is not None:
            kw["device"] = f"cuda:{local_rank}"
        if kw["part"] is not None and "LOCAL_RANK" in os.environ and kw["part"][0] != 0:
            quiet = True  # one progress bar per torchrun job, not one per process
        report = build_cache(BuildConfig(**kw), progress=not quiet)
    except USER_ERRORS as e:
        _fail(e)
    rate = f", {report.images_per_s:.1f} img/s" if report.computed else ""
    part = f" (part {kw['part'][0]}/{kw['part'][1]})" if kw["part"] else ""
    click.echo(f"group {report.group}{part}: {report.total} samples, {report.computed} computed{rate}, "
               f"{report.already_done} already done, {report.failed} failed")
    if report.failed:
        click.echo(f"failed samples are listed in {cache_location(kw['cache']) / report.group / 'failures.jsonl'}")


@main.command()
@click.option("--cache", "cache_path", required=True, metavar="DIR|URL")
@click.option("--json", "as_json", is_flag=True, help="Print the full metadata as JSON.")
def info(cache_path, as_json):
    """Show the teacher groups of a cache, their completeness and size."""
    try:
        out = _summaries(open_cache(cache_path))
    except USER_ERRORS as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for name, s in out.items():
        md = s["metadata"]
        # Random weights make targets meaningless; the tiny architecture with trained weights
        # is a toy, not a fake (the same rule as training's warnings and the pictures).
        note = (" [random_init: NOT real targets]" if md.get("random_init")
                else " [tiny: toy architecture]" if md.get("tiny") else "")
        click.echo(f"{name}: {md.get('arch')} grid {md.get('native_grid')} ({md['num_patches']} patches){note}")
        click.echo(f"  samples {s['samples']}: {s['done']} done, {s['pending']} pending, "
                   f"{s['failed']} failed; {s['bytes'] / 1e6:.1f} MB on disk"
                   f" ({s['bytes'] / max(s['done'], 1) / 1e3:.1f} KB per done sample)")
        click.echo(f"  checkpoint sha256 {md.get('checkpoint_sha256')}")


def _summaries(cache) -> dict:
    """Per group: sample counts by status, bytes stored, metadata (what `info` shows)."""
    out = {}
    for name in cache:
        g = cache[name]
        counts = {"done": 0, "pending": 0, "failed": 0}
        for k in g.keys():
            counts[g.status(k)] += 1
        out[name] = {"samples": len(g), **counts, "bytes": g.stored_bytes(), "metadata": g.metadata}
    return out


def _samples(ctx, param, value) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"a number >= 0 or 'all', got {value!r}")
    return n


@main.command()
@click.option("--cache", "cache_path", required=True, metavar="DIR|URL")
@click.option("--teacher", default=None,
              help="The group to check (teacher name or alias) [default: every group of the cache].")
@click.option("--group", default=None, help="The group to check, by its exact name.")
@click.option("--samples", default="0", show_default=True, callback=_samples, metavar="N|all",
              help="Also recompute N random done samples (or all) with the teacher and compare them to the "
                   "stored targets: needs the teacher's weights and the images.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="With --samples: teacher weights [default: the checkpoint the group was built from, or "
                   "random init].")
@click.option("--random-init", is_flag=True,
              help="With --samples: the cache was built with --random-init (same --seed).")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --samples: folder the keys are relative to [default: the one of the group's last build].")
@click.option("--seed", type=int, default=None,
              help="Picks the samples; also the --random-init seed [default: the build's seed, else 0].")
@click.option("--device", default="cpu", show_default=True)
def verify(cache_path, teacher, group, **kw):
    """Check a cache's integrity (no teacher needed), optionally against a fresh teacher run.

    \b
    Always: the group's structure (metadata, keys vs arrays vs status) and every stored
    chunk of every done row against its checksum. With --samples N: also recompute N
    random samples with the teacher (the images may have changed since the build).
    """
    reports = []
    try:
        names = [None] if teacher or group else list(open_cache(cache_path))
        if not names:
            raise CacheError(f"cache {cache_path} holds no teacher group")
        for name in names:
            reports.append(verify_cache(cache_path, teacher, group=group or name, **kw))
    except USER_ERRORS as e:
        _fail(e)
    for r in reports:
        line = (f"group {r.group}: {r.done}/{r.total} done, {r.failed} failed, {r.pending} pending; "
                f"read back {r.read_back} done rows")
        if r.recomputed:
            line += f"; recomputed {r.recomputed}, max error {r.max_rel_error:.1e} of the target scale"
        click.echo(line)
        if r.unchecked_arrays:
            click.echo(f"  note: {', '.join(r.unchecked_arrays)} of group {r.group} have no chunk checksums (written "
                       f"by an older medalign): damage there is caught only when it breaks decoding; rebuild the "
                       f"group (delete its folder, rerun its build) to add them")
    problems = [f"{r.group}: {p}" for r in reports for p in r.problems]
    if problems:
        raise click.ClickException("verify failed:\n  " + "\n  ".join(problems))
    click.echo("ok")


@main.command()
@click.option("--cache", "cache_path", required=True, metavar="DIR|URL")
@click.option("--teacher", required=True, help="Teacher group (name or alias).")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", "keys", multiple=True,
              help="Image key (repeat for several; one row each) [default: the first --n done keys].")
@click.option("--n", default=3, show_default=True, help="How many keys to show when no --key is given.")
@click.option("--patch", type=int, default=None,
              help="Patch whose similarity row is shown (row-major index on the shown grid) "
                   "[default: the most attended patch of each image].")
@click.option("--patch-xy", default=None, metavar="X,Y", help="The same as column X, row Y (0-based).")
@click.option("--grid", type=int, default=None,
              help="Show the targets resized to a student grid G [default: the teacher's native grid].")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
def show(cache_path, teacher, image_root, keys, n, patch, patch_xy, grid, out):
    """Draw a teacher's attention map and one patch's similarity row over the images."""
    from .show import show_targets

    try:
        keys = [normalize_key(k) for k in keys]   # as the cache spells them: "./a.png" -> "a.png"
        if not keys:
            group = open_cache(cache_path)[teacher]
            keys = [k for k in group.keys() if group.status(k) == "done"][:n]
            if not keys:
                raise CacheError(f"cache group {group.name!r} has no finished samples to show")
        result = show_targets(cache_path, teacher, image_root, keys, out, patch=patch, patch_xy=patch_xy,
                              grid=grid)
    except USER_ERRORS as e:
        _fail(e)
    click.echo(f"wrote {result.out} ({result.size[0]}x{result.size[1]} px, grid {result.grid}, "
               f"{len(keys)} image{'s' if len(keys) != 1 else ''})")


@main.command()
@click.option("--cache", "cache_path", required=True, metavar="DIR|URL", help="The cache folder (Zarr) to export.")
@click.option("--teacher", "teachers", required=True, multiple=True,
              help="Teacher group (name or alias); repeat it to put several groups in the file.")
@click.option("--to", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HDF5 file to write (*.h5 or *.hdf5; must not exist).")
@click.option("--gzip-level", default=GZIP_LEVEL, show_default=True,
              help="Deflate level, 0 (none: larger, reads ~4x faster) .. 9.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(cache_path, teachers, out, gzip_level, quiet):
    """Write cache groups into one HDF5 file (read-only; any HDF5 reader reads it).

    \b
    medalign-cache export --cache ./cache --teacher unimed --to cache.h5
    medalign-distill run --cache cache.h5 ...          # every command reads it like the folder
    """
    try:
        reports = export_h5(cache_path, teachers, out, gzip_level=gzip_level, progress=not quiet)
    except USER_ERRORS as e:
        _fail(e)
    for r in reports:
        click.echo(f"group {r.group}: {r.samples} samples ({r.done} done, {r.failed} failed, {r.pending} pending), "
                   f"{r.bytes / 1e6:.1f} MB")
    click.echo(f"wrote {out}")


if __name__ == "__main__":  # `python -m precompute.cli` / `torchrun -m precompute.cli`
    main()
