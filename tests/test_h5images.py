"""Images inside HDF5 files: the "<file>::<dataset>[<index>]" key, layouts and dtypes
against the same pixels saved as PNG and against an independent computation, every
kind of bad input as one ImageError line, one handle per file per process (DataLoader
workers included), the h5 dataset format and the folder scan, and a cache build from an
HDF5 container bit-identical to one from the same images as PNG files."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from precompute import h5images, open_cache
from precompute.cli import main as cache_cli
from precompute.datasets import DatasetError, cache_keys, load_records, missing_images, normalize_key, resolve_image
from precompute.h5images import H5Image
from precompute.images import ImageError, load_image
from tests.test_images import gray_rgb
from tests.workers import ImagesIn

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (5, 40, 56), dtype=np.uint8)           # [N, H, W]
RGB = RNG.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)         # [N, H, W, C]
RGBA = RNG.integers(0, 256, (5, 40, 56, 4), dtype=np.uint8)


def write_h5(path, attrs=None, **datasets):
    """An HDF5 file holding `datasets` (name -> array); attrs: {"": root attrs, name: dataset attrs}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, values in datasets.items():
            f.create_dataset(name, data=values)
        for name, values in (attrs or {}).items():
            f[name or "/"].attrs.update(values)
    return path


def pixels(ref) -> np.ndarray:
    return np.asarray(load_image(ref))


def png_pixels(tmp_path, array, name="x.png") -> np.ndarray:
    """What load_image makes of the same array saved as a PNG file."""
    Image.fromarray(array).save(tmp_path / name)
    return np.asarray(load_image(tmp_path / name))


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("raw,key", [
    ("cxr.h5::cxr[17]", "cxr.h5::/cxr[17]"),
    ("./data\\cxr.h5::/cxr[017]", "data/cxr.h5::/cxr[17]"),
    ("scans/f1.h5::reconstruction_rss[ 3 ]", "scans/f1.h5::/reconstruction_rss[3]"),
    ("a.hdf5::/grp//./data/[0]", "a.hdf5::/grp/data[0]"),
    ("vol.mat::x[2]", "vol.mat::/x[2]"),                       # any HDF5 file (MATLAB v7.3), not only .h5
])
def test_keys_are_canonical(raw, key):
    assert normalize_key(raw) == key
    assert normalize_key(key) == key                             # canonical keys stay as they are


@pytest.mark.parametrize("raw,message", [
    ("cxr.h5::cxr", "lacks its index"),
    ("cxr.h5::cxr[-1]", "not a non-negative integer"),
    ("cxr.h5::cxr[1.5]", "not a non-negative integer"),
    ("cxr.h5::[3]", "no dataset"),
    ("::cxr[3]", "no file"),
    ("cxr.h5::a/../b[0]", "'..' in the dataset path"),
    ("../cxr.h5::cxr[0]", "leaves the image root"),
    ("/elsewhere/cxr.h5::cxr[0]", "not under the image root"),
])
def test_malformed_keys_say_why(raw, message):
    with pytest.raises(ValueError, match=message):
        normalize_key(raw, "/data")


def test_resolve_and_missing(tmp_path):
    write_h5(tmp_path / "sub" / "cxr.h5", cxr=GRAY)
    ref = resolve_image(tmp_path, "sub/cxr.h5::cxr[2]")
    assert ref == H5Image(tmp_path / "sub" / "cxr.h5", "/cxr", 2) and ref.is_file()
    assert str(ref) == f"{tmp_path}/sub/cxr.h5::/cxr[2]"
    assert np.array_equal(pixels(ref), pixels(str(ref)))         # load_image takes the string too
    records = load_records(None, tmp_path)
    assert missing_images(records, tmp_path) == []
    (tmp_path / "sub" / "cxr.h5").rename(tmp_path / "moved.h5")
    assert missing_images(records, tmp_path) == cache_keys(records)   # a missing container is a missing image


# ----------------------------------------------------------------------------- layouts and dtypes

@pytest.mark.parametrize("stack,layout,png", [
    (GRAY, None, GRAY),
    (GRAY[..., None], None, GRAY),                               # [N, H, W, 1]
    (GRAY[:, None], None, GRAY),                                 # [N, 1, H, W]
    (RGB, None, RGB),                                            # [N, H, W, 3]
    (np.moveaxis(RGB, -1, 1), None, RGB),                        # [N, 3, H, W]
    (RGBA, None, RGBA),                                          # composited on black like an RGBA PNG
    (np.moveaxis(RGBA, -1, 1), None, RGBA),
    (RGB[:, :3, :3], "NHWC", RGB[:, :3, :3]),                    # [N, 3, 3, 3]: only the attribute can tell
    (np.moveaxis(RGB[:, :4, :3], -1, 1), "NCHW", RGB[:, :4, :3]),   # [N, 3, 4, 3]
])
def test_uint8_layouts_give_the_png_pixels(tmp_path, stack, layout, png):
    write_h5(tmp_path / "s.h5", {"x": {"layout": layout}} if layout else None, x=stack)
    for i in (0, 4):
        assert np.array_equal(pixels(H5Image(tmp_path / "s.h5", "/x", i)), png_pixels(tmp_path, png[i])), i


def stretched(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The documented rule, computed independently: lo..hi -> 0..255 linearly, clipped, rounded
    to the nearest integer (ties to even)."""
    lo, hi = float(lo), float(hi)
    out = np.empty(values.shape, dtype=np.uint8)
    for index, v in np.ndenumerate(values):
        out[index] = int(np.rint(min(max((float(v) - lo) / (hi - lo), 0.0), 1.0) * 255.0))
    return out


def test_uint16_is_stretched_exactly_like_a_16bit_png(tmp_path):
    stack = RNG.integers(100, 3000, (3, 40, 56), dtype=np.uint16)   # 12-bit data in 16 bits
    write_h5(tmp_path / "s.h5", x=stack)
    for i in range(3):
        got = pixels(H5Image(tmp_path / "s.h5", "/x", i))
        assert np.array_equal(got, png_pixels(tmp_path, stack[i]))
        assert np.array_equal(got, gray_rgb(stretched(stack[i], stack[i].min(), stack[i].max())))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16])
def test_other_dtypes_follow_the_documented_rule(tmp_path, dtype):
    values = (RNG.normal(0, 1, (4, 30, 20)) * 900).astype(dtype)    # negative too (CT in HU as int16)
    values[0] = values[0] - values[0].min()                          # a non-negative one as well
    write_h5(tmp_path / "minmax.h5", x=values)
    # fastMRI: the volume maximum in the file's root attribute `max`; a dataset's own `max` wins
    write_h5(tmp_path / "fastmri.h5", {"": {"max": 1500.0}}, x=values)
    write_h5(tmp_path / "own.h5", {"": {"max": 1500.0}, "x": {"max": 700}}, x=values)
    for i in range(4):
        v = values[i]
        assert np.array_equal(pixels(H5Image(tmp_path / "minmax.h5", "/x", i)),
                              gray_rgb(stretched(v, v.min(), v.max())))
        assert np.array_equal(pixels(H5Image(tmp_path / "fastmri.h5", "/x", i)), gray_rgb(stretched(v, 0, 1500)))
        assert np.array_equal(pixels(H5Image(tmp_path / "own.h5", "/x", i)), gray_rgb(stretched(v, 0, 700)))


def test_float_colour_keeps_one_range_for_all_channels(tmp_path):
    rgb = RNG.random((2, 16, 16, 3)).astype(np.float32) * np.array([1.0, 0.5, 0.25], np.float32)
    write_h5(tmp_path / "s.h5", x=rgb)
    got = pixels(H5Image(tmp_path / "s.h5", "/x", 1))
    assert np.array_equal(got, stretched(rgb[1], rgb[1].min(), rgb[1].max()))
    assert got[..., 0].mean() > 1.5 * got[..., 1].mean()           # red stays redder than green


def test_constant_image_is_black_and_uint8_ignores_max(tmp_path):
    seven = np.full((1, 8, 8), 7.0, np.float32)
    write_h5(tmp_path / "s.h5", {"m": {"max": 10}, "y": {"max": 10}}, x=seven, m=seven,
             y=np.full((1, 8, 8), 7, np.uint8))
    assert not pixels(H5Image(tmp_path / "s.h5", "/x", 0)).any()       # min..max of a constant: black
    assert (pixels(H5Image(tmp_path / "s.h5", "/m", 0)) == stretched(seven[0, :1, :1], 0, 10)[0, 0]).all()
    assert (pixels(H5Image(tmp_path / "s.h5", "/y", 0)) == 7).all()  # uint8: as stored


# ----------------------------------------------------------------------------- bad input

def corrupt(tmp_path, kind):
    """-> (key relative to tmp_path, words the one-line message must contain)."""
    f = tmp_path / "s.h5"
    if kind == "missing dataset":
        write_h5(f, cxr=GRAY)
        return "s.h5::/nope[0]", ["no dataset /nope", "image stacks there: /cxr"]
    if kind == "index out of range":
        write_h5(f, cxr=GRAY)
        return "s.h5::/cxr[5]", ["index 5 is out of range", "holds 5 images (0..4)"]
    if kind == "rank 2":
        write_h5(f, one=GRAY[0])
        return "s.h5::/one[0]", ["shape (40, 56)", "[N,H,W]"]
    if kind == "rank 5":
        write_h5(f, vol=np.zeros((2, 3, 8, 8, 8), np.uint8))
        return "s.h5::/vol[0]", ["shape (2, 3, 8, 8, 8)"]
    if kind == "no channel axis":
        write_h5(f, coils=np.zeros((2, 15, 8, 8), np.float32))
        return "s.h5::/coils[1]", ["shape (2, 15, 8, 8)", "C = 1, 3 or 4"]
    if kind == "ambiguous layout":
        write_h5(f, x=np.zeros((2, 3, 4, 3), np.uint8))
        return "s.h5::/x[0]", ["cannot tell", "'layout' attribute"]
    if kind == "bad layout attribute":
        write_h5(f, {"x": {"layout": "NCHW"}}, x=GRAY)
        return "s.h5::/x[0]", ["layout attribute", "NCHW"]
    if kind == "complex":
        write_h5(f, kspace=np.zeros((2, 8, 8), np.complex64))
        return "s.h5::/kspace[0]", ["complex64", "magnitude"]
    if kind == "group":
        with h5py.File(f, "w") as h:
            h.create_group("grp").create_dataset("x", data=GRAY)
        return "s.h5::/grp[0]", ["/grp is a group"]
    if kind == "NaN":
        values = np.ones((2, 8, 8), np.float32)
        values[1, 2, 3] = np.nan
        values[1, 4, 4] = np.inf
        write_h5(f, x=values)
        return "s.h5::/x[1]", ["2 of 64 values are NaN or infinite"]
    if kind == "bad max attribute":
        write_h5(f, {"": {"max": -1.0}}, x=np.ones((2, 8, 8), np.float32))
        return "s.h5::/x[0]", ["'max' attribute of the file is -1.0"]
    if kind == "missing file":
        return "s.h5::/x[0]", ["no such file"]
    if kind == "not HDF5":
        f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
        return "s.h5::/x[0]", ["not an HDF5 file", "PNG"]
    if kind == "empty file":
        f.write_bytes(b"")
        return "s.h5::/x[0]", ["not an HDF5 file (empty)"]
    if kind == "truncated":
        write_h5(f, cxr=GRAY)
        data = f.read_bytes()
        f.write_bytes(data[:len(data) // 2])
        return "s.h5::/cxr[0]", ["truncated HDF5 file", f"{len(data) // 2} of {len(data)} bytes"]
    raise AssertionError(kind)


BAD = ["missing dataset", "index out of range", "rank 2", "rank 5", "no channel axis", "ambiguous layout",
       "bad layout attribute", "complex", "group", "NaN", "bad max attribute", "missing file", "not HDF5",
       "empty file", "truncated"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_naming_file_dataset_and_index(tmp_path, kind):
    key, words = corrupt(tmp_path, kind)
    with pytest.raises(ImageError) as info:
        load_image(resolve_image(tmp_path, key))
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/{key}: "), message       # file, dataset and index, first
    assert "\n" not in message and "Traceback" not in message and "h5py" not in message, message
    assert info.value.__suppress_context__ or info.value.__context__ is None
    for word in words:
        assert word in message, (word, message)


HOLD_OPEN = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "a")          # a writer: HDF5 locks the file
print("holding", flush=True)
time.sleep(60)
"""


def test_a_file_locked_by_a_writer_is_one_line(tmp_path):
    write_h5(tmp_path / "s.h5", cxr=GRAY)
    writer = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(tmp_path / "s.h5")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "holding"
        with pytest.raises(ImageError, match=r"s\.h5::/cxr\[1\]: locked by a writer"):
            load_image(resolve_image(tmp_path, "s.h5::cxr[1]"))
    finally:
        writer.kill()
        writer.wait()
    # its writer was killed, never closed the file: readable again (no consistency flags in this format)
    assert np.array_equal(pixels(resolve_image(tmp_path, "s.h5::cxr[1]")), gray_rgb(GRAY[1]))


# ----------------------------------------------------------------------------- handles

def test_one_handle_per_file_reopened_when_the_file_changes(tmp_path, monkeypatch):
    opened = []
    real = h5images.read_only
    monkeypatch.setattr(h5images, "read_only", lambda p: opened.append(p) or real(p))
    monkeypatch.setattr(h5images, "_handles", h5images._Handles())
    write_h5(tmp_path / "a.h5", x=GRAY)
    write_h5(tmp_path / "b.h5", x=GRAY[::-1])
    for _ in range(3):
        for i in range(5):
            pixels(H5Image(tmp_path / "a.h5", "/x", i))
            pixels(H5Image(tmp_path / "b.h5", "/x", i))
    assert len(opened) == 2                                      # 30 reads, one open per file
    os.replace(write_h5(tmp_path / "new.h5", x=255 - GRAY), tmp_path / "a.h5")   # replaced: reopened
    assert np.array_equal(pixels(H5Image(tmp_path / "a.h5", "/x", 0)), gray_rgb(255 - GRAY[0]))
    assert len(opened) == 3
    files = h5images._handles.files
    assert len(files) == 2 and all(o.h5.mode == "r" for o in files.values())     # read-only
    h5images.close_files()                                       # e.g. before rewriting a file in place
    assert not files
    write_h5(tmp_path / "b.h5", x=GRAY)
    assert np.array_equal(pixels(H5Image(tmp_path / "b.h5", "/x", 0)), gray_rgb(GRAY[0]))


def test_dataset_checks_are_kept_with_the_handle_failures_never(tmp_path):
    """What a dataset passed (type, layout, `max`) is kept with its file's handle; a failed
    check is reported on every read; a replaced file is checked anew."""
    values = (RNG.random((3, 6, 7)) * 1000).astype(np.float32)
    ref = H5Image(write_h5(tmp_path / "s.h5", {"": {"max": -1.0}}, x=values), "/x", 1)
    for _ in range(2):
        with pytest.raises(ImageError, match="'max' attribute of the file is -1.0"):
            load_image(ref)
    for limit in (1000.0, 500.0):
        os.replace(write_h5(tmp_path / "new.h5", {"": {"max": limit}}, x=values), tmp_path / "s.h5")
        for _ in range(2):
            assert np.array_equal(pixels(ref), gray_rgb(stretched(values[1], 0, limit)))
    os.replace(write_h5(tmp_path / "new.h5", x=values[:, None].repeat(2, axis=1)), tmp_path / "s.h5")
    for _ in range(2):
        with pytest.raises(ImageError, match=r"has shape \(3, 2, 6, 7\); an image stack is"):
            load_image(ref)


def test_two_dataloader_workers_read_with_their_own_handles(tmp_path):
    """The parent reads first (its handle is open when the workers start): the forked
    workers must not use it, and read the right pixels. (Spawned workers start without
    any handle; test_h5cache.py runs a spawn DataLoader over an HDF5 cache.)"""
    write_h5(tmp_path / "s.h5", x=RGB)
    refs = [H5Image(tmp_path / "s.h5", "/x", i % 5) for i in range(12)]
    expected = [pixels(r) for r in refs]
    loader = torch.utils.data.DataLoader(ImagesIn(refs), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = list(loader)
    assert len({pid for pid, _ in got} - {os.getpid()}) == 2
    for (_, x), want in zip(got, expected, strict=True):
        assert np.array_equal(x.numpy(), want)
    assert np.array_equal(pixels(refs[3]), expected[3])           # the parent's handle still works


def test_forked_child_opens_its_own_handle(tmp_path, monkeypatch):
    """What the pid check does, observed directly: after a fork the child's first read opens
    the file anew and leaves the inherited handle alone (neither used nor closed)."""
    monkeypatch.setattr(h5images, "_handles", h5images._Handles())
    monkeypatch.setattr(h5images, "_inherited", [])
    write_h5(tmp_path / "s.h5", x=GRAY)
    ref = H5Image(tmp_path / "s.h5", "/x", 1)
    pixels(ref)
    parent = h5images._handles
    pid = os.fork()
    if pid == 0:  # the child: report by exit code, never return into pytest
        code = 1
        try:
            ok = np.array_equal(pixels(ref), gray_rgb(GRAY[1]))
            fresh = h5images._handles is not parent and h5images._inherited == [parent]
            code = 0 if ok and fresh and len(h5images._handles.files) == 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert h5images._handles is parent and len(parent.files) == 1
    assert np.array_equal(pixels(ref), gray_rgb(GRAY[1]))          # the parent's handle was left working


# ----------------------------------------------------------------------------- dataset formats

def test_folder_scan_finds_image_stacks_only(tmp_path):
    Image.fromarray(GRAY[0]).save(tmp_path / "a.png")
    # fastMRI-like: a float volume with the file's max, complex k-space and a 1-D mask (not images)
    write_h5(tmp_path / "mri" / "file1.h5", {"": {"max": 2.0}}, reconstruction_rss=np.ones((3, 8, 8), np.float32),
             kspace=np.zeros((3, 4, 8, 8), np.complex64), mask=np.zeros(8),
             coil_maps=np.zeros((3, 15, 8, 8), np.float32), flags=np.zeros((3, 8, 8), bool))
    write_h5(tmp_path / "stacks.hdf5", rgb=np.moveaxis(RGB[:2], -1, 1))
    write_h5(tmp_path / ".hidden.h5", x=GRAY)
    keys = [r.images[0] for r in load_records(None, tmp_path)]
    assert keys == ["a.png", "mri/file1.h5::/reconstruction_rss[0]", "mri/file1.h5::/reconstruction_rss[1]",
                    "mri/file1.h5::/reconstruction_rss[2]", "stacks.hdf5::/rgb[0]", "stacks.hdf5::/rgb[1]"]
    assert [load_image(resolve_image(tmp_path, k)).size for k in keys] == [(56, 40)] + [(8, 8)] * 3 + [(56, 40)] * 2
    # --data x.h5: that file's images
    assert [r.images[0] for r in load_records(tmp_path / "stacks.hdf5", tmp_path)] == keys[-2:]
    assert load_records(tmp_path / "stacks.hdf5", tmp_path, fmt="h5") == load_records(tmp_path / "stacks.hdf5",
                                                                                      tmp_path)
    Image.fromarray(GRAY[0]).save(tmp_path / "odd::name.png")
    with pytest.raises(DatasetError, match=r"odd::name\.png: '::' in a file name .*rename the file"):
        load_records(None, tmp_path)
    (tmp_path / "odd::name.png").unlink()
    (tmp_path / "broken.h5").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"broken\.h5: not an HDF5 file .*move it out of the image folder"):
        load_records(None, tmp_path)
    with pytest.raises(DatasetError, match="not inside the image root"):
        load_records(tmp_path / "stacks.hdf5", tmp_path / "mri")


def chexzero(tmp_path, n=6):
    """CheXzero's layout: cxr.h5 with one dataset `cxr` [N, 320, 320] (float32 0..255, as its
    preprocessing writes it; small here) and a CSV of impressions, row-aligned."""
    write_h5(tmp_path / "data" / "cxr.h5", cxr=GRAY[np.arange(n) % 5].astype(np.float32))
    rows = "".join(f"s{i}.txt,impression {i}\n" for i in range(n))
    (tmp_path / "data" / "mimic_impressions.csv").write_text("filename,impression\n" + rows)
    (tmp_path / "data" / "chexzero.json").write_text(json.dumps({"images": "cxr.h5::cxr",
                                                                "texts": "mimic_impressions.csv"}))
    return tmp_path / "data" / "chexzero.json"


def test_aligned_texts_chexzero_layout(tmp_path):
    manifest = chexzero(tmp_path)
    records = load_records(manifest, tmp_path / "data")
    assert records == load_records(manifest, tmp_path / "data", fmt="h5")
    assert [r.images[0] for r in records] == [f"cxr.h5::/cxr[{i}]" for i in range(6)]
    assert [r.answer for r in records] == [f"impression {i}" for i in range(6)]   # the filename column is ignored
    assert {r.task for r in records} == {"report"}
    # one image stack in the file: the dataset may be left out; no texts: images only
    manifest.write_text(json.dumps({"images": "./cxr.h5"}))
    assert [r.task for r in load_records(manifest, tmp_path / "data")] == ["image"] * 6
    # texts as JSON: questions and answers with a split; a list of strings is a list of reports
    qa = [{"question": f"q{i}?", "answer": f"a{i}", "split": "test" if i < 2 else "train"} for i in range(6)]
    (tmp_path / "data" / "qa.json").write_text(json.dumps(qa))
    manifest.write_text(json.dumps({"images": "cxr.h5::/cxr", "texts": "qa.json"}))
    test = load_records(manifest, tmp_path / "data", split="test")
    assert [(r.images[0], r.prompt, r.task) for r in test] == [("cxr.h5::/cxr[0]", "q0?", "vqa"),
                                                              ("cxr.h5::/cxr[1]", "q1?", "vqa")]
    (tmp_path / "data" / "reports.json").write_text(json.dumps([f"r{i}" for i in range(6)]))
    manifest.write_text(json.dumps({"images": "cxr.h5::cxr", "texts": "reports.json"}))
    assert [r.answer for r in load_records(manifest, tmp_path / "data")] == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("content,message", [
    ({"images": "cxr.h5::cxr", "texts": "short.csv"}, r"short\.csv: 5 rows, but cxr\.h5::/cxr holds 6 images"),
    ({"images": "cxr.h5::nope"}, r"'images' 'cxr.h5::nope': .*no dataset /nope"),
    ({"images": "two.h5"}, r"holds 2 image stacks \(/a, /b\); name one"),
    ({"images": "../cxr.h5::cxr"}, "leaves the image root"),
    ({"images": "cxr.h5::cxr", "text": "x.csv"}, r"unknown fields \['text'\]"),
    ({"images": "gone.h5::cxr"}, "no such file"),
])
def test_aligned_texts_errors_name_the_file(tmp_path, content, message):
    manifest = chexzero(tmp_path)
    (tmp_path / "data" / "short.csv").write_text("impression\n" + "x\n" * 5)
    write_h5(tmp_path / "data" / "two.h5", a=GRAY, b=RGB)
    manifest.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=message) as info:
        load_records(manifest, tmp_path / "data", fmt="h5" if "text" in content else "auto")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- a build from HDF5

def build(*args):
    return CliRunner().invoke(cache_cli, ["build", "--teacher", "tiny", "--random-init", "--batch-size", "4",
                                          "--quiet", *map(str, args)], catch_exceptions=False)


def group_arrays(cache):
    g = zarr.open_group(f"{cache}/tiny", mode="r")
    keys = g["keys"][:].tolist()
    return {k: (g["similarity"][i], g["attention"][i], int(g["status"][i])) for i, k in enumerate(keys)}


def test_build_from_hdf5_is_bit_identical_to_png(tmp_path):
    """The same uint8 images as PNG files and in an HDF5 container ([N,H,W], [N,H,W,C] and
    [N,C,H,W]) give bit-identical targets; the HDF5 build decodes in 2 DataLoader workers.
    File names sort like the keys, so both builds batch the same images together.
    (`show` on HDF5 images: test_h5cache.py.)"""
    pngs, h5 = tmp_path / "png", tmp_path / "h5"
    pngs.mkdir()
    stacks = {"a_gray": (GRAY, GRAY), "b_rgb": (RGB, RGB), "c_chw": (np.moveaxis(RGB, -1, 1)[::-1], RGB[::-1])}
    pairs = {}
    for name, (stored, png) in stacks.items():
        for i in range(3):
            Image.fromarray(png[i]).save(pngs / f"{name}_{i}.png")
            pairs[f"{name}_{i}.png"] = f"all.h5::/{name}[{i}]"
    write_h5(h5 / "all.h5", **{name: stored[:3] for name, (stored, _) in stacks.items()})
    assert build("--image-root", pngs, "--cache", tmp_path / "c_png", "--workers", 0).exit_code == 0
    r = build("--image-root", h5, "--cache", tmp_path / "c_h5", "--workers", 2)
    assert r.exit_code == 0 and "9 computed" in r.output, r.output
    from_png, from_h5 = group_arrays(tmp_path / "c_png"), group_arrays(tmp_path / "c_h5")
    assert sorted(from_h5) == sorted(pairs.values())
    for png_key, h5_key in pairs.items():
        (s1, a1, st1), (s2, a2, st2) = from_png[png_key], from_h5[h5_key]
        assert st1 == st2 == 1 and np.array_equal(s1, s2) and np.array_equal(a1, a2), (png_key, h5_key)


def test_on_error_fail_and_skip_for_hdf5_images(tmp_path):
    root = tmp_path / "images"
    write_h5(root / "cxr.h5", cxr=GRAY)
    keys = ["cxr.h5::cxr[0]", "cxr.h5::cxr[1]", "cxr.h5::cxr[9]", "cxr.h5::nope[0]"]
    (tmp_path / "t.json").write_text(json.dumps([{"id": str(i), "image": k, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]} for i, k in enumerate(keys)]))
    args = ["--data", tmp_path / "t.json", "--image-root", root, "--cache", tmp_path / "c", "--workers", 0]
    r = build(*args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{root}/cxr.h5::/cxr[9]: index 9 is out of range" in r.output and "--on-error skip" in r.output
    r = build(*args, "--on-error", "skip")
    assert r.exit_code == 0 and "2 failed" in r.output, r.output
    group = open_cache(tmp_path / "c")["tiny"]
    assert [group.status(k) for k in sorted(normalize_key(k) for k in keys)] == ["done", "done", "failed", "failed"]
    failures = [json.loads(x) for x in (tmp_path / "c" / "tiny" / "failures.jsonl").read_text().splitlines()]
    assert {f["key"]: f["error"].split(": ", 1)[1] for f in failures} == {
        "cxr.h5::/cxr[9]": "index 9 is out of range: /cxr holds 5 images (0..4)",
        "cxr.h5::/nope[0]": "no dataset /nope in " + str(root / "cxr.h5") + "; image stacks there: /cxr"}
