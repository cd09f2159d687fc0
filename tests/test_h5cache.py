"""The single-file HDF5 cache: `medalign-cache export` and the reader behind open_cache.
The exported file holds exactly what the Zarr group holds, reads through the same
interface (plain h5py too), detects corruption through its checksums, reads in DataLoader
workers, and trains a student to the same losses, step for step, as the Zarr cache."""
import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distill.cli import main as distill_cli
from precompute import open_cache
from precompute.build import BuildConfig, build_cache
from precompute.cache import CacheError, GroupWriter
from precompute.cli import main as cache_cli
from precompute.h5cache import H5Group, export_h5
from precompute.h5images import close_files
from tests.test_cache import META, P, keys_, targets, write_all
from tests.workers import TargetsOf

REPO = Path(__file__).resolve().parents[1]


def cache_cmd(*args):
    return CliRunner().invoke(cache_cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def zarr_and_h5(tmp_path):
    """A Zarr group with done, failed and pending rows (and an appended key), and its export."""
    keys = keys_(10)
    sim, attn = targets(10)
    writer = GroupWriter.open(tmp_path / "cache", "unimed-b16", keys, P, META, shard_size=4)
    write_all(writer, sim, attn, failures={3: "cannot decode: broken.png"})
    writer = GroupWriter.open(tmp_path / "cache", "unimed-b16", keys + ["late/new.png"], P, META)  # pending
    r = cache_cmd("export", "--cache", tmp_path / "cache", "--teacher", "unimed", "--to", tmp_path / "c.h5", "--quiet")
    assert r.exit_code == 0, r.output
    assert "group unimed-b16: 11 samples (9 done, 1 failed, 1 pending)" in r.output and "wrote" in r.output
    return tmp_path / "cache", tmp_path / "c.h5", keys + ["late/new.png"], sim, attn


def test_export_holds_exactly_the_zarr_group(zarr_and_h5):
    cache, h5, keys, sim, attn = zarr_and_h5
    z, h = open_cache(cache)["unimed-b16"], open_cache(h5)["unimed"]          # aliases resolve too
    assert isinstance(h, H5Group) and list(open_cache(h5)) == ["unimed-b16"]
    assert h.keys() == z.keys() == keys and len(h) == 11 and keys[4] in h and "nope" not in h
    assert h.metadata == z.metadata and (h.num_patches, h.native_grid, h.name) == (P, 7, "unimed-b16")
    assert [h.status(k) for k in keys] == [z.status(k) for k in keys]
    assert h.status(keys[3]) == "failed" and h.status(keys[10]) == "pending"
    assert h.missing(keys + ["nope"]) == z.missing(keys + ["nope"]) == [keys[3], keys[10], "nope"]
    for i, key in enumerate(keys[:10]):
        if i == 3:
            continue
        s, a = h.native_packed(key)
        assert s.dtype == np.float16 and a.dtype == np.float32 and s.flags.writeable
        assert np.array_equal(s, sim[i]) and np.array_equal(a, attn[i])
        assert h.native_packed(key, similarity=False)[0] is None and h.native_packed(key, attention=False)[1] is None
        for got, want in zip(h.targets(key, grid=12), z.targets(key, grid=12)):
            assert torch.equal(got, want)
    with pytest.raises(CacheError, match=r"is failed, it has no targets.*c\.h5::/unimed-b16/failures\.jsonl"):
        h.native_packed(keys[3])
    with pytest.raises(CacheError, match="is pending.*export again"):
        h.native_packed(keys[10])
    with pytest.raises(KeyError, match="not in cache group.*then export again"):
        h.native_packed("nope")
    assert 0 < h.stored_bytes() < 11 * (P * (P - 1) + 4 * P)            # compressed, only done rows
    with h5py.File(h5, "r") as f:                                          # what plain h5py sees
        g = f["unimed-b16"]
        log = (cache / "unimed-b16" / "failures.jsonl").read_text().splitlines()
        assert g["failures.jsonl"].asstr()[:].tolist() == log and len(log) == 1
        for name in ("keys", "status", "similarity", "attention", "failures.jsonl"):
            assert g[name].fletcher32 and g[name].compression == "gzip" and g[name].shuffle, name
        assert g["similarity"].chunks == (1, P * (P - 1) // 2) and g["attention"].chunks == (1, P)
        assert np.isnan(g["similarity"][3]).all() and json.loads(g.attrs["preprocessing"]) == META["preprocessing"]
        assert f.attrs["medalign_cache_schema"] == 1 and json.loads(f.attrs["medalign_export"])["source"] == str(cache)


def test_the_plain_h5py_reader_in_cache_schema_md(zarr_and_h5):
    cache, h5, keys, _, _ = zarr_and_h5
    doc = (REPO / "cache_schema.md").read_text()
    code = doc.split("<!-- plain-h5-reader -->\n```python\n", 1)[1].split("```", 1)[0]
    group = open_cache(cache)["unimed-b16"]
    scope = {"h5_path": str(h5), "group": "unimed-b16", "key": keys[6]}
    exec(code, scope)
    S, a = group.native(keys[6])
    assert np.array_equal(scope["S"], S.double().numpy()) and np.array_equal(scope["a"], a.double().numpy())


def test_a_changed_byte_fails_its_checksum(zarr_and_h5):
    cache, h5, keys, _, _ = zarr_and_h5
    with h5py.File(h5, "r") as f:
        info = f["unimed-b16/similarity"].id.get_chunk_info_by_coord((5, 0))
    data = bytearray(h5.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0xFF
    h5.write_bytes(bytes(data))
    group = open_cache(h5)["unimed-b16"]
    with pytest.raises(CacheError, match=rf"{keys[5]}.*row 5 of .*c\.h5::/unimed-b16/similarity cannot be read "
                                         rf".*checksum.*export it again") as e:
        group.native_packed(keys[5])
    assert "\n" not in str(e.value)
    assert group.native_packed(keys[5], similarity=False)[1] is not None   # the other array is intact
    assert group.native_packed(keys[6])[0] is not None                    # and so are the other rows


def test_export_and_open_refuse_what_they_cannot_do(zarr_and_h5, tmp_path):
    cache, h5, _, _, _ = zarr_and_h5
    for args, message in (
            (["--to", h5], "exists; an export never overwrites"),
            (["--to", tmp_path / "c.zarr"], "name the file *.h5 or *.hdf5"),
            (["--to", tmp_path / "x.h5", "--teacher", "nope"], "no teacher group 'nope'"),
            (["--to", tmp_path / "x.h5", "--gzip-level", 11], "gzip level must be 0"),
    ):
        teacher = [] if "--teacher" in args else ["--teacher", "unimed"]
        r = cache_cmd("export", "--cache", cache, *teacher, *args, "--quiet")
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob(".*.partial"))
    r = cache_cmd("export", "--cache", h5, "--teacher", "unimed", "--to", tmp_path / "y.h5")
    assert r.exit_code == 1 and "already a single-file cache" in r.output
    (tmp_path / "text.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    for path, message in ((tmp_path / "text.h5", "not an HDF5 file"), (tmp_path / "other.h5", "not a medalign cache")):
        r = cache_cmd("info", "--cache", path)
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    with h5py.File(tmp_path / "newer.h5", "w") as f:
        f.attrs["medalign_cache_schema"] = 99
    with pytest.raises(CacheError, match="schema 99.*upgrade"):
        open_cache(tmp_path / "newer.h5")
    r = cache_cmd("build", "--teacher", "tiny", "--random-init", "--image-root", tmp_path, "--cache", h5, "--quiet")
    assert r.exit_code == 1 and "is read-only; build into a cache folder, then export it again" in r.output


def test_several_groups_and_an_uncompressed_export(zarr_and_h5, tmp_path):
    cache, h5, keys, sim, attn = zarr_and_h5
    second = GroupWriter.open(cache, "other", keys_(3), P, {**META, "teacher": "other", "aliases": []})
    write_all(second, *targets(3, seed=1))
    export_h5(cache, ["unimed", "other", "unimed-b16"], tmp_path / "both.hdf5", gzip_level=0, progress=False)
    both = open_cache(tmp_path / "both.hdf5")
    assert list(both) == ["other", "unimed-b16"]
    assert np.array_equal(both["other"].native_packed(keys_(3)[2])[0], targets(3, seed=1)[0][2])
    assert np.array_equal(both["unimed"].native_packed(keys[0])[1], attn[0])
    with h5py.File(tmp_path / "both.hdf5", "r") as f:
        assert f["other/similarity"].compression is None and f["other/similarity"].fletcher32


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_two_dataloader_workers_read_the_h5_cache(zarr_and_h5, context):
    _, h5, keys, sim, attn = zarr_and_h5
    group = open_cache(h5)["unimed-b16"]
    done = [k for k in keys if group.status(k) == "done"]
    group.native_packed(done[0])                 # the parent's handle is open when the workers start
    assert pickle.loads(pickle.dumps(group)).native_packed(done[1])[1] is not None
    loader = torch.utils.data.DataLoader(TargetsOf(group, done * 2), batch_size=None, num_workers=2,
                                         multiprocessing_context=context)
    got = list(loader)
    assert len({pid for pid, _, _ in got} - {os.getpid()}) == 2
    index = {k: i for i, k in enumerate(keys)}
    for key, (_, s, a) in zip(done * 2, got, strict=True):
        assert np.array_equal(s.numpy(), sim[index[key]]) and np.array_equal(a.numpy(), attn[index[key]])
    assert np.array_equal(group.native_packed(done[0])[0], sim[0])   # the parent's handle still works
    group.close()
    assert np.array_equal(group.native_packed(done[0])[0], sim[0])   # and reopens after close()


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def h5_dataset(tmp_path_factory):
    """Images with a bright block in one quadrant, as one HDF5 stack [N, H, W] with a CSV of
    questions and answers aligned row by row (the h5 format); a tiny random-init Zarr cache
    built from it, and that cache exported to one HDF5 file."""
    tmp = tmp_path_factory.mktemp("h5cache")
    root = tmp / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    stack = (rng.random((12, 64, 64)) * 60).astype(np.uint8)
    rows = ["question,answer"]
    for i in range(12):
        q = i % 4
        y, x = 8 + 32 * (q // 2), 8 + 32 * (q % 2)
        stack[i, y:y + 16, x:x + 16] = 250
        rows.append(f"Where is the bright spot?,{'top' if q < 2 else 'bottom'}")
    with h5py.File(root / "scans.h5", "w") as f:
        f["scans"] = stack
    (tmp / "qa.csv").write_text("\n".join(rows) + "\n")
    data = tmp / "train.json"
    data.write_text(json.dumps({"images": "scans.h5::scans", "texts": "qa.csv"}))
    cache = tmp / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=data, image_root=root,
                            num_workers=0), progress=False)
    export_h5(cache, ["tiny"], tmp / "cache.h5", progress=False)
    return {"tmp": tmp, "root": root, "data": data, "cache": cache, "h5": tmp / "cache.h5", "stack": stack}


def distill_run(d, out, cache, *extra):
    args = ["run", "--cache", cache, "--teacher", "tiny", "--student", "tiny", "--data", d["data"],
            "--image-root", d["root"], "--out", out, "--layer", "2", "--batch-size", "4", "--grad-accum", "1",
            "--lr", "3e-3", "--beta", "0.5", "--max-steps", "3", "--quiet", *extra]
    return CliRunner().invoke(distill_cli, [str(a) for a in args], catch_exceptions=False)


def test_training_from_the_h5_cache_equals_training_from_zarr(h5_dataset):
    """The same losses step for step; the .h5 run reads targets (and HDF5 images) in 2
    DataLoader workers, the Zarr run in the main process."""
    d = h5_dataset
    from_zarr, from_h5 = d["tmp"] / "run-zarr", d["tmp"] / "run-h5"
    assert distill_run(d, from_zarr, d["cache"], "--workers", "0").exit_code == 0
    r = distill_run(d, from_h5, d["h5"], "--workers", "2")
    assert r.exit_code == 0, r.output
    a = [json.loads(x) for x in (from_zarr / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (from_h5 / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for term in ("ntp", "vis", "att", "loss"):
            assert x[term] == y[term], (x["step"], term)
    assert json.loads((from_h5 / "config.json").read_text())["cache"] == str(d["h5"])
    assert json.loads((from_h5 / "cache_metadata.json").read_text()) == \
        json.loads((from_zarr / "cache_metadata.json").read_text())

    # eval and pictures of that run: HDF5 images, and (pictures) the run's .h5 cache
    r = CliRunner().invoke(distill_cli, ["eval", "--run", str(from_h5), "--data", str(d["data"]), "--image-root",
                                         str(d["root"]), "--max-new-tokens", "4", "--no-meteor", "--workers", "0",
                                         "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    predictions = [json.loads(x) for x in next((from_h5 / "eval").rglob("predictions.jsonl")).read_text().splitlines()]
    assert len(predictions) == 12
    pics = d["tmp"] / "pics"
    r = CliRunner().invoke(distill_cli, ["pictures", "--run", str(from_h5), "--data", str(d["data"]), "--image-root",
                                         str(d["root"]), "--keys", "scans.h5::/scans[0],scans.h5::/scans[3]",
                                         "--out", str(pics), "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((pics / "pictures.json").read_text())
    assert [x["key"] for x in summary["samples"]] == ["scans.h5::/scans[0]", "scans.h5::/scans[3]"]


def test_info_verify_and_show_read_the_h5_cache(h5_dataset):
    d = h5_dataset
    r = cache_cmd("info", "--cache", d["h5"])
    assert r.exit_code == 0 and "samples 12: 12 done, 0 pending, 0 failed" in r.output, r.output
    r = cache_cmd("verify", "--cache", d["h5"], "--teacher", "tiny", "--samples", 4)
    assert r.exit_code == 0 and "recomputed 4" in r.output and r.output.strip().endswith("ok"), r.output
    # the images changed after the build: verify on the exported file notices
    def rewrite(values):
        close_files()  # HDF5 opens no file for writing that this process has open for reading
        with h5py.File(d["root"] / "scans.h5", "r+") as f:
            f["scans"][:] = values
    rewrite(255 - d["stack"])
    try:
        r = cache_cmd("verify", "--cache", d["h5"], "--teacher", "tiny", "--samples", 12)
        assert r.exit_code == 1 and "stale" in r.output, r.output
    finally:
        rewrite(d["stack"])
    out = d["tmp"] / "show.png"
    r = cache_cmd("show", "--cache", d["h5"], "--teacher", "tiny", "--image-root", d["root"], "--n", 2, "--out", out)
    assert r.exit_code == 0 and "2 images" in r.output, r.output
    r = cache_cmd("show", "--cache", d["h5"], "--teacher", "tiny", "--image-root", d["root"], "--out", out,
                  "--key", "scans.h5::scans[07]")                     # any spelling of the key
    assert r.exit_code == 0 and "1 image)" in r.output, r.output
    with Image.open(out) as im:
        assert im.size[0] > 300
