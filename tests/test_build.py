"""Stage one end to end: the real CLI over real files, checked against an
independent computation of docs/method.md's recipe, killed and resumed."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from PIL import Image

from precompute import open_cache
from precompute.build import BuildConfig, BuildError, _recorded_teacher, build_cache
from precompute.cache import CacheError
from precompute.cli import main as cache_cli
from precompute.teachers import load_teacher

BIN = Path(sys.executable).parent


def make_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """Smooth random images of assorted sizes and modes (what a dataset folder holds)."""
    rng = np.random.default_rng(seed)
    keys = []
    for i in range(n):
        h, w = rng.integers(60, 140, size=2)
        base = rng.random((8, 8, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((int(w), int(h)), Image.BILINEAR)
        if i % 3 == 1:
            img = img.convert("L")
        key = f"case_{i // 4:02d}/img_{i:03d}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / key)
        keys.append(key)
    return keys


def llava_json(path: Path, keys: list[str]) -> Path:
    data = [{"id": f"s{i}", "image": k,
             "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                               {"from": "gpt", "value": f"finding {i}"}]} for i, k in enumerate(keys)]
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "images"
    keys = make_images(root, 10)
    return root, llava_json(tmp_path / "train.json", keys), keys


def run_cli(*args):
    result = CliRunner().invoke(cache_cli, [str(a) for a in args], catch_exceptions=False)
    return result


def independent_targets(teacher, pixels: torch.Tensor, grid: int):
    """docs/method.md's reference recipe, computed without our target code: blocks run
    one by one, the last block's attention taken from nn.MultiheadAttention itself,
    the token grid resized directly (the reference's way, not our matrix way)."""
    visual = teacher.model if hasattr(teacher, "model") else teacher.visual
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    h = last.ln_1(x)
    _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)
    tokens = last(x)[:, 1:]
    attn = weights[:, 0, 1:]
    g = int(tokens.shape[1] ** 0.5)
    fmap = F.normalize(tokens, dim=-1).transpose(1, 2).reshape(-1, tokens.shape[2], g, g)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    feats = F.normalize(fmap.flatten(2).transpose(1, 2), dim=-1)
    sim = feats @ feats.transpose(1, 2)
    amap = (attn / attn.amax(-1, keepdim=True)).reshape(-1, 1, g, g)
    amap = F.interpolate(amap, size=(grid, grid), mode="bilinear", align_corners=False).flatten(1)
    return sim, amap


@pytest.mark.parametrize("teacher,grid", [("tiny", 5), ("unimed", 24)])
def test_cli_build_matches_independent_recipe(tmp_path, dataset, teacher, grid):
    root, data, keys = dataset
    cache = tmp_path / "cache"
    r = run_cli("build", "--teacher", teacher, "--random-init", "--data", data, "--image-root", root,
                "--cache", cache, "--batch-size", 4, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert "10 computed" in r.output

    group = open_cache(cache)[teacher]
    assert sorted(group.keys()) == sorted(keys)
    md = group.metadata
    assert md["random_init"] is True and md["checkpoint_sha256"] is None

    t = load_teacher(teacher, random_init=True)
    from precompute.images import load_image
    with torch.no_grad():
        for key in keys[:3]:
            pixels = t.preprocess(load_image(root / key))[None]
            sim_ref, attn_ref = independent_targets(t, pixels, grid)
            sim, attn = group.targets(key, grid=grid)
            assert sim.shape == (grid * grid, grid * grid) and attn.shape == (grid * grid,)
            # fp16 storage of the native matrix is the only loss (docs/method.md: ~3e-4)
            assert torch.allclose(sim, sim_ref[0], atol=2e-3), (sim - sim_ref[0]).abs().max()
            assert torch.allclose(attn, attn_ref[0], atol=1e-5, rtol=1e-4)


def test_info_verify_and_second_teacher_group(tmp_path, dataset):
    root, data, _ = dataset
    cache = tmp_path / "cache"
    for teacher in ("tiny", "unimed"):
        r = run_cli("build", "--teacher", teacher, "--random-init", "--data", data, "--image-root", root,
                    "--cache", cache, "--workers", 0, "--quiet")
        assert r.exit_code == 0, r.output
    r = run_cli("info", "--cache", cache)
    assert r.exit_code == 0
    assert "tiny" in r.output and "unimed-b16" in r.output and "NOT real targets" in r.output
    r = run_cli("verify", "--cache", cache, "--teacher", "unimed", "--random-init", "--image-root", root,
                "--samples", 3)
    assert r.exit_code == 0, r.output
    assert "recomputed 3" in r.output
    # a rerun computes nothing: resume finds every row done
    r = run_cli("build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
                "--cache", cache, "--workers", 0, "--quiet")
    assert "0 computed" in r.output and "10 already done" in r.output
    # verify with a different teacher seed (= different weights) must fail
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny", "--random-init", "--seed", 1,
                "--image-root", root, "--samples", 2)
    assert r.exit_code != 0 and "differ" in r.output


def test_verify_detects_a_changed_image(tmp_path, dataset):
    root, data, keys = dataset
    cache = tmp_path / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=data, image_root=root,
                            num_workers=0), progress=False)
    Image.new("RGB", (90, 90), (200, 10, 10)).save(root / keys[0])  # the image changed after the build
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny", "--random-init", "--image-root", root,
                "--samples", 10)
    assert r.exit_code != 0 and keys[0] in r.output and "stale" in r.output


def test_on_error_fail_and_skip(tmp_path, dataset):
    root, data, keys = dataset
    (root / keys[5]).write_bytes(b"not a png at all")
    cache = tmp_path / "cache"
    args = ["build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
            "--cache", cache, "--workers", 0, "--batch-size", 2, "--shard-size", 4, "--quiet"]
    r = run_cli(*args)
    assert r.exit_code == 1
    assert keys[5] in r.output and "--on-error skip" in r.output
    assert "Traceback" not in r.output
    group = open_cache(cache)["tiny"]
    assert group.status(keys[0]) == "done"      # finished work before the bad image is kept
    assert group.status(keys[5]) == "pending"

    r = run_cli(*args, "--on-error", "skip")
    assert r.exit_code == 0, r.output
    group = open_cache(cache)["tiny"]
    assert group.status(keys[5]) == "failed"
    assert all(group.status(k) == "done" for k in keys if k != keys[5])
    lines = [json.loads(x) for x in (cache / "tiny" / "failures.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [keys[5]]
    with pytest.raises(Exception, match="failed"):
        group.targets(keys[5], grid=7)


def test_missing_image_is_named(tmp_path, dataset):
    root, data, keys = dataset
    (root / keys[2]).unlink()
    with pytest.raises(BuildError, match=keys[2].split("/")[-1]):
        build_cache(BuildConfig(teacher="tiny", random_init=True, cache=tmp_path / "c", data=data,
                                image_root=root, num_workers=0), progress=False)


def test_missing_checkpoint_names_the_download(tmp_path, dataset):
    root, data, _ = dataset
    r = run_cli("build", "--teacher", "unimed", "--checkpoint", tmp_path / "nope.pt", "--data", data,
                "--image-root", root, "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 1
    assert "unimed_clip_vit_b16.pt" in r.output and "Traceback" not in r.output


def cache_arrays(cache, group: str = "tiny"):
    """Every array of a group, as numpy (a folder or a URL)."""
    g = zarr.open_group(f"{cache}/{group}", mode="r")   # a folder or a URL
    return {name: g[name][:] for name in ("keys", "status", "similarity", "attention")}


# The real CLI in a child process whose writer thread stops for good in its second shard's
# commit: that shard's targets are written, its status is not. The test SIGKILLs it there,
# mid-build, at the one point where dying could do harm.
STOP_IN_SECOND_COMMIT = """
import sys, threading
from precompute.cache import GroupWriter
from precompute.cli import main
commit, calls = GroupWriter._commit, []
def stopping_commit(self, rows, status):
    calls.append(rows)
    if len(calls) == 2:
        print("stopped in the commit of rows", rows[0], "..", rows[-1], flush=True)
        threading.Event().wait()
    return commit(self, rows, status)
GroupWriter._commit = stopping_commit
main(sys.argv[1:])
"""
# One thread, as the in-process builds here (conftest): bit-identical forwards.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def kill_9_mid_build(args: list[str]) -> str:
    """Run `medalign-cache build ...args` in a child and SIGKILL it inside its second
    shard commit; returns what it printed on stopping."""
    proc = subprocess.Popen([sys.executable, "-c", STOP_IN_SECOND_COMMIT, *map(str, args)], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("stopped") and proc.poll() is None, \
            f"the build did not stop mid-way: {line!r} {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL
    return line


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, dataset):
    root, data, keys = dataset
    common = ["build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
              "--batch-size", 2, "--shard-size", 4, "--workers", 0, "--quiet"]
    assert run_cli(*common, "--cache", tmp_path / "ref").exit_code == 0
    cache = tmp_path / "cache"
    assert "rows 4 .. 7" in kill_9_mid_build(common + ["--cache", cache])

    partial = cache_arrays(cache, "tiny")
    assert (partial["status"][:4] == 1).all() and (partial["status"][4:] == 0).all()
    assert (cache / "tiny" / "similarity" / "c" / "1" / "0").is_file()   # written, never committed

    r = run_cli(*common, "--cache", cache)
    assert r.exit_code == 0 and "6 computed" in r.output, r.output
    resumed, reference = cache_arrays(cache, "tiny"), cache_arrays(tmp_path / "ref", "tiny")
    for name in reference:
        assert np.array_equal(resumed[name], reference[name]), name
    assert not list(cache.rglob("*.partial"))


def test_verify_needs_only_the_cache_and_the_teacher(tmp_path, dataset):
    """The issue's `medalign-cache verify --cache ./cache --teacher unimed`: the image folder,
    weights (here: random init and its seed) come from the build."""
    root, data, _ = dataset
    cache = tmp_path / "cache"
    r = run_cli("build", "--teacher", "tiny", "--random-init", "--seed", 2, "--data", data, "--image-root", root,
                "--cache", cache, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert open_cache(cache)["tiny"].metadata["image_root"] == str(root.resolve())
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny", "--samples", 2)
    assert r.exit_code == 0 and "recomputed 2" in r.output, r.output
    moved = root.rename(tmp_path / "moved")
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny", "--samples", 2)
    assert r.exit_code == 1 and f"under {root.resolve()}, which no longer exists; pass --image-root" in r.output
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny", "--samples", 2, "--image-root", moved)
    assert r.exit_code == 0, r.output

    class Built:   # a group built from weights that have since been deleted
        name, metadata = "g", {"checkpoint": str(tmp_path / "gone.pt"), "random_init": False, "seed": None}
    with pytest.raises(CacheError, match=r"checkpoint .*gone\.pt, which no longer exists; pass --checkpoint"):
        _recorded_teacher(Built, None, False, None)


def test_caches_at_urls_through_the_cli(tmp_path, dataset, memory_url, monkeypatch):
    """file:// is the local folder; memory:// goes through fsspec (writes via zarr's
    FsspecStore, reads via range reads): both hold what a local build holds. A URL that
    cannot work is one error line, and never a local folder named like it."""
    root, data, _ = dataset
    common = ["build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
              "--batch-size", 4, "--shard-size", 4, "--workers", 0, "--quiet"]
    for where in (tmp_path / "local", f"file://{tmp_path}/file-url", memory_url):
        r = run_cli(*common, "--cache", where)
        assert r.exit_code == 0 and "10 computed" in r.output, r.output
    reference = cache_arrays(tmp_path / "local", "tiny")
    for where in (tmp_path / "file-url", memory_url):
        got = cache_arrays(where, "tiny")
        for name in reference:
            assert np.array_equal(got[name], reference[name]), (where, name)
    r = run_cli("info", "--cache", memory_url)
    assert r.exit_code == 0 and "samples 10: 10 done" in r.output, r.output
    r = run_cli("verify", "--cache", memory_url, "--teacher", "tiny", "--samples", 3)
    assert r.exit_code == 0 and "recomputed 3" in r.output, r.output

    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    for url, why in (("s3://bucket/x", "Install s3fs"), ("nosuch://x/y", "Protocol not known")):
        r = run_cli(*common, "--cache", url)
        assert r.exit_code == 1 and f"cannot use cache URL '{url}': {why}" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert sorted(tmp_path.iterdir()) == before


def test_a_file_system_without_locks_is_one_error_line(tmp_path, dataset, monkeypatch):
    root, data, _ = dataset

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    r = run_cli("build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
                "--cache", tmp_path / "c", "--workers", 0, "--quiet")
    assert r.exit_code == 1 and "does not support file locks" in r.output and "-o flock" in r.output
    assert "Traceback" not in r.output


def test_second_concurrent_build_refuses(tmp_path, dataset):
    import fcntl
    root, data, _ = dataset
    cache = tmp_path / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=data, image_root=root,
                            num_workers=0), progress=False)
    lock = cache / "tiny" / "build.lock"
    with open(lock, "a") as f:     # another process holding the group's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run([str(BIN / "medalign-cache"), "build", "--teacher", "tiny", "--random-init",
                            "--data", str(data), "--image-root", str(root), "--cache", str(cache), "--quiet"],
                           capture_output=True, text=True)
    assert r.returncode == 1
    assert "another build" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- verify: integrity, tolerance


def test_verify_checks_every_stored_chunk_without_the_teacher(tmp_path, dataset, monkeypatch):
    from tests.test_cache import chunk_span, flip
    root, data, keys = dataset
    cache = tmp_path / "cache"
    r = run_cli("build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
                "--cache", cache, "--shard-size", 4, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    monkeypatch.setattr("precompute.build.load_teacher", lambda *a, **k: pytest.fail("verify loaded the teacher"))
    r = run_cli("verify", "--cache", cache)                     # every group; no teacher, no images
    assert r.exit_code == 0 and "tiny: 10/10 done" in r.output and "read back 10 done rows" in r.output, r.output
    assert r.output.endswith("ok\n") and "note" not in r.output

    rows = {k: i for i, k in enumerate(open_cache(cache)["tiny"].keys())}
    damaged = {}
    for key, array, mask in ((keys[1], "similarity", 0xFF), (keys[6], "attention", 0x04)):   # a byte, a bit
        shard, offset, nbytes = chunk_span(cache, array, rows[key], group="tiny")
        flip(shard, offset + nbytes // 2, mask)
        damaged[key] = shard
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny")
    assert r.exit_code == 1 and "verify failed" in r.output and "read back 10 done rows" in r.output
    for key, shard in damaged.items():
        assert f"{key!r} (row {rows[key]}) in {shard} fails its checksum" in r.output
    assert "Traceback" not in r.output


def test_verify_tolerance_is_relative_to_the_target_scale():
    from precompute.build import VERIFY_RTOL, relative_error
    rng = np.random.default_rng(0)
    attn = rng.dirichlet(np.ones(196)).astype(np.float32)        # a B/16 map: values ~5e-3
    moved = attn.copy()
    j = int(np.abs(attn - 3e-3).argmin())                         # a patch of typical weight
    moved[j] *= 1.48                                             # off by 48%
    assert np.abs(moved - attn).max() < 2e-3                     # what the old absolute 2e-3 let through
    assert relative_error(moved, attn) > 10 * VERIFY_RTOL
    cos = rng.uniform(-0.2, 1.0, 19110).astype(np.float32)      # cosines, stored in fp16
    assert relative_error(cos.astype(np.float16), cos) < VERIFY_RTOL / 5
    assert relative_error(attn * (1 + 1e-4), attn) < VERIFY_RTOL / 10   # another machine's rounding


def test_verify_recomputation_catches_a_stale_value_below_the_old_tolerance(tmp_path, dataset):
    root, data, keys = dataset
    cache = tmp_path / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=data, image_root=root,
                            num_workers=0), progress=False)
    group = open_cache(cache)["tiny"]
    row = group.index(keys[3])
    attn = zarr.open_array(str(cache / "tiny" / "attention"), mode="r+")
    stale = attn[row]
    stale[stale.argmin()] += 1.5e-3                  # rewritten through zarr: its checksum is valid
    attn[row] = stale
    r = run_cli("verify", "--cache", cache, "--teacher", "tiny")        # integrity alone cannot know
    assert r.exit_code == 0, r.output
    for samples in ("10", "all"):
        r = run_cli("verify", "--cache", cache, "--teacher", "tiny", "--samples", samples)
        assert r.exit_code == 1 and "recomputed 10" in r.output, r.output
        assert f"{keys[3]}: stored targets differ from a fresh teacher run" in r.output and "stale" in r.output
        assert sum("differ from a fresh teacher run" in line for line in r.output.splitlines()) == 1
