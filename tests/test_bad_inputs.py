"""A corpus of broken inputs through the real CLIs (`medalign-cache build`,
`medalign-distill run`): every one ends in one line naming the file or record,
never a traceback, and nothing broken reaches a training batch.

- per-image problems (truncated PNG/JPEG/DICOM, empty, text named .png, missing,
  decompression bomb): `--on-error fail` stops naming the image; `--on-error skip`
  finishes, records it as failed (status and failures.jsonl), and the cache never
  hands out a target for it;
- dataset-level problems (malformed or wrongly shaped JSON, missing fields,
  duplicate ids, empty, a path leaving the image root): refused before any work,
  whatever --on-error says;
- training on a dataset that names a skipped image is refused before step one.
"""

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from distill.cli import main as distill_cli
from precompute import open_cache
from precompute.cache import CacheError
from precompute.cli import main as cache_cli

GOOD = ["good_0.png", "good_1.png", "good_2.png"]


def _png_bytes(seed: int, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (48, 64) if mode == "L" else (48, 64, 3)
    buf = io.BytesIO()
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR announcing width x height, and almost no pixel
    data: what a corrupt header or a hostile file looks like to a decoder."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _truncated_dicom() -> bytes:
    from pydicom.data import get_testdata_file
    return Path(get_testdata_file("MR_truncated.dcm")).read_bytes()   # pydicom's short pixel data


def _dicom_cut_in_its_header() -> bytes:
    from pydicom.data import get_testdata_file
    return Path(get_testdata_file("CT_small.dcm")).read_bytes()[:1000]   # a copy interrupted early


# name in the image root -> (file content or None for "absent", key phrase of its error)
BROKEN_IMAGES = {
    "truncated.png": (_png_bytes(1)[:300], "image file is truncated"),
    "truncated.jpg": (_truncated_jpeg(), "image file is truncated"),
    "empty.png": (b"", "empty file (0 bytes)"),
    "notes.png": (b"patient list, not a picture\n", "not a readable image"),
    "scans/truncated.dcm": (_truncated_dicom(), "cannot decode DICOM pixel data"),
    "scans/cut_header.dcm": (_dicom_cut_in_its_header(), "truncated DICOM (1000 bytes)"),
    "missing.png": (None, "no such file"),
    "huge.png": (_png_claiming(100_000, 100_000), "decompression bomb"),
}


def llava(images, ids=None) -> list[dict]:
    return [{"id": ids[i] if ids else f"r{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhich imaging modality is this?"},
        {"from": "gpt", "value": "MRI."}]} for i, image in enumerate(images)]


def write_json(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def build(data, root, cache, *extra):
    return invoke(cache_cli, "build", "--teacher", "tiny", "--random-init", "--data", data, "--image-root", root,
                  "--cache", cache, "--workers", 0, "--quiet", *extra)


def error_line(result) -> str:
    """The one "Error: ..." line of a failed command (a hint may follow it); no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[0] == errors[0], result.output
    assert len(lines) <= 2, result.output        # the error, and at most one line saying what to do
    return errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    root = tmp / "images"
    root.mkdir()
    for i, name in enumerate(GOOD):
        (root / name).write_bytes(_png_bytes(10 + i, "RGB" if i % 2 else "L"))
    for name, (content, _) in BROKEN_IMAGES.items():
        if content is not None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
    return {"tmp": tmp, "root": root}


# ----------------------------------------------------------------------------- per-image problems

@pytest.fixture(scope="module")
def fail_results(corpus):
    """`build --on-error fail` once per broken image, on [good, broken, good]."""
    results = {}
    for name in BROKEN_IMAGES:
        data = write_json(corpus["tmp"] / f"fail_{name.replace('/', '_')}.json", llava([GOOD[0], name, GOOD[1]]))
        results[name] = build(data, corpus["root"], corpus["tmp"] / f"cache_fail_{name.replace('/', '_')}")
    return results


@pytest.mark.parametrize("name", list(BROKEN_IMAGES))
def test_fail_stops_with_one_line_naming_the_image(corpus, fail_results, name):
    line = error_line(fail_results[name])
    assert str(corpus["root"] / name) in line
    assert BROKEN_IMAGES[name][1] in line
    assert "--on-error skip" in fail_results[name].output


def test_fail_line_names_the_path_once(corpus, fail_results):
    for name, result in fail_results.items():
        assert error_line(result).count(str(corpus["root"] / name)) == 1, result.output


@pytest.fixture(scope="module")
def skipped(corpus):
    """One `build --on-error skip` over the good images and every broken one."""
    data = write_json(corpus["tmp"] / "all.json", llava(GOOD + list(BROKEN_IMAGES)))
    cache = corpus["tmp"] / "cache_skip"
    result = build(data, corpus["root"], cache, "--on-error", "skip", "--batch-size", 4)
    return {"result": result, "cache": cache, "data": data}


def test_skip_finishes_and_lists_every_broken_image(skipped):
    r = skipped["result"]
    assert r.exit_code == 0, r.output
    n = len(GOOD) + len(BROKEN_IMAGES)
    assert f"{n} samples, {len(GOOD)} computed" in r.output and f"{len(BROKEN_IMAGES)} failed" in r.output
    assert str(skipped["cache"] / "tiny" / "failures.jsonl") in r.output
    group = open_cache(skipped["cache"])["tiny"]
    assert all(group.status(k) == "done" for k in GOOD)
    assert group.missing(GOOD) == []


@pytest.mark.parametrize("name", list(BROKEN_IMAGES))
def test_skip_records_the_image_as_failed_and_never_serves_it(skipped, name):
    failures = [json.loads(line) for line in
                (skipped["cache"] / "tiny" / "failures.jsonl").read_text().splitlines()]
    errors = {f["key"]: f["error"] for f in failures}
    assert len(errors) == len(failures) == len(BROKEN_IMAGES)          # one line per broken image
    assert BROKEN_IMAGES[name][1] in errors[name] and name in errors[name]
    group = open_cache(skipped["cache"])["tiny"]
    assert group.status(name) == "failed"
    assert group.missing([name]) == [name]
    for read in (group.native_packed, group.native, lambda k: group.targets(k, grid=5)):
        with pytest.raises(CacheError, match=r"is failed, it has no targets.*failures\.jsonl"):
            read(name)


def test_fixed_image_is_recomputed_by_the_same_command(corpus, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(corpus["root"], root)
    data = write_json(tmp_path / "d.json", llava([GOOD[0], "notes.png"]))
    cache = tmp_path / "cache"
    assert build(data, root, cache, "--on-error", "skip").exit_code == 0
    (root / "notes.png").write_bytes(_png_bytes(99))                 # the user fixes the file
    r = build(data, root, cache, "--on-error", "skip")
    assert r.exit_code == 0 and "1 computed" in r.output, r.output
    assert open_cache(cache)["tiny"].status("notes.png") == "done"


# ----------------------------------------------------------------------------- dataset-level problems

def _conversation():
    return llava([GOOD[0]])[0]["conversations"]


# name -> (file name, content, what the error line must name, key phrase)
BROKEN_DATASETS = {
    "malformed json": ("train.json", '[{"id": "a", "image": "good_0.png", "conversations": [}]',
                       None, "invalid JSON at line 1, column"),
    "malformed jsonl line": ("qa.jsonl", '{"question_id": 1, "image": "good_0.png", "text": "q"}\n'
                                         '{"question_id": 2, "image": \n', None, "line 2, column"),
    "one record, not a list": ("train.json", {"id": "a", "image": "good_0.png", "conversations": _conversation()},
                               None, "wrap it in [ ]"),
    "records under a key": ("train.json", {"data": llava(GOOD)}, None, "under 'data'"),
    "missing conversations": ("train.json", [*llava(GOOD[:2]), {"id": "c", "image": GOOD[2]}],
                              "record 2 (id 'c')", "missing or empty 'conversations'"),
    "duplicate ids": ("train.json", llava(GOOD, ids=["a", "b", "a"]), "duplicate id 'a'",
                      "record 0 and record 2"),
    "empty list": ("train.json", [], None, "no records"),
    "empty file": ("train.json", "", None, "empty file"),
    "path leaves the image root": ("train.json", llava([GOOD[0], "../x.png"]), "record 1 (id 'r1')",
                                   "leaves the image root"),
    "absolute path elsewhere": ("train.json", llava(["/etc/hosts.png"]), "record 0 (id 'r0')",
                                "is not under the image root"),
}


@pytest.mark.parametrize("name", list(BROKEN_DATASETS))
def test_dataset_problems_fail_before_any_work(corpus, skipped, tmp_path, name):
    filename, content, names, phrase = BROKEN_DATASETS[name]
    data = write_json(tmp_path / filename, content)
    for on_error in ("fail", "skip"):
        cache = tmp_path / f"cache_{on_error}"
        line = error_line(build(data, corpus["root"], cache, "--on-error", on_error))
        assert str(data) in line and phrase in line
        assert names is None or names in line
        assert not cache.exists()                           # refused before the teacher or the cache
    out = tmp_path / "run"
    line = error_line(invoke(distill_cli, "run", "--cache", skipped["cache"], "--teacher", "tiny",
                             "--student", "tiny", "--layer", 2, "--max-steps", 2, "--workers", 0,
                             "--data", data, "--image-root", corpus["root"], "--out", out, "--quiet"))
    assert str(data) in line and phrase in line
    assert not (out / "metrics.jsonl").exists() and not (out / "tiny-student").exists()


# ----------------------------------------------------------------------------- nothing broken reaches training

def distill(skipped, corpus, data, out):
    return invoke(distill_cli, "run", "--cache", skipped["cache"], "--teacher", "tiny", "--student", "tiny",
                  "--layer", 2, "--max-steps", 2, "--workers", 0, "--data", data, "--image-root", corpus["root"],
                  "--out", out, "--quiet")


def test_training_refuses_a_dataset_naming_a_skipped_image(corpus, skipped, tmp_path):
    data = write_json(tmp_path / "train.json", llava([GOOD[0], "notes.png", GOOD[1], "scans/truncated.dcm"]))
    out = tmp_path / "run"
    r = distill(skipped, corpus, data, out)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert "2 of 4 training images have no finished target in cache group 'tiny'" in r.output
    assert "notes.png" in r.output and "scans/truncated.dcm" in r.output
    assert "good_0.png" not in r.output
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()

    # The run directory a refusal leaves behind must not block the same command once fixed.
    r = distill(skipped, corpus, data, out)
    assert "already holds a run" not in r.output
    assert "no finished target" in r.output
