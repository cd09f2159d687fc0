"""examples/formats/: one dataset per format over the demo images. They load, they
agree on cache keys, they are what make_formats.py writes, and the README's
commands build one cache in which every image is computed once."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from precompute import open_cache
from precompute.cli import main as cache_cli
from precompute.datasets import FORMATS, _read, cache_keys, detect_format, load_records

REPO = Path(__file__).resolve().parent.parent
FORMATS_DIR = REPO / "examples" / "formats"
IMAGES = REPO / "examples" / "demo" / "images"


def _make_formats():
    spec = importlib.util.spec_from_file_location("make_formats", REPO / "examples" / "make_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_formats = _make_formats()


def test_committed_files_are_what_the_script_writes(tmp_path):
    make_formats.main(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(make_formats.FILES)
    for name in written:
        assert (tmp_path / name).read_bytes() == (FORMATS_DIR / name).read_bytes(), name


def test_every_format_has_an_example():
    # folder and h5 have no text file here: an image folder is the input itself, and an HDF5
    # example is binary (tests/test_h5images.py builds and reads them; docs/formats.md shows one)
    covered = {fmt for fmt, _ in make_formats.FILES.values()} | {"folder", "h5"}
    assert covered == set(FORMATS)


@pytest.mark.parametrize("name", sorted(make_formats.FILES))
def test_example_is_detected_and_loads(name):
    path = FORMATS_DIR / name
    fmt = make_formats.FILES[name][0]
    data, _, kind = _read(path)
    assert detect_format(data, kind, path) == fmt
    records = load_records(path, IMAGES)
    assert records == load_records(path, IMAGES, fmt=fmt)
    assert all((IMAGES / key).is_file() for key in cache_keys(records))


def test_same_image_same_key_in_every_format():
    ct = make_formats.CT
    seen = {}
    for name in make_formats.FILES:
        split = "test" if make_formats.FILES[name][0] == "r2gen" else None   # the CT is R2Gen's test study
        keys = cache_keys(load_records(FORMATS_DIR / name, IMAGES, split=split))
        seen[name] = [k for k in keys if k.endswith(ct)]
    assert all(found == [ct] for found in seen.values()), seen
    assert "./" + ct in (FORMATS_DIR / "table.csv").read_text()           # spelled differently, same key


def test_format_specifics():
    slake = load_records(FORMATS_DIR / "slake.json", IMAGES)
    assert [r.id for r in slake] == ["101", "103", "201"]                   # the Chinese question is skipped
    assert [r.id for r in load_records(FORMATS_DIR / "slake.json", IMAGES, lang="zh")] == ["102"]
    r2gen = load_records(FORMATS_DIR / "r2gen_annotation.json", IMAGES)
    assert [len(r.images) for r in r2gen] == [2, 2] and {r.task for r in r2gen} == {"report"}
    val = load_records(FORMATS_DIR / "r2gen_annotation.json", IMAGES, split="val")
    assert [r.id for r in val] == ["mni152_z30_y-40"]
    vqa = load_records(FORMATS_DIR / "vqa_rad.json", IMAGES)
    assert [r.answer_type for r in vqa] == ["closed", "open", "open", "closed"]
    test = load_records(FORMATS_DIR / "vqa_rad.json", IMAGES, split="test")   # phrase_type test_freeform
    assert [r.id for r in test] == ["3"] and [r.split for r in vqa] == ["train"] * 3 + ["test"]


def readme_commands() -> list[list[str]]:
    text = (FORMATS_DIR / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith(".venv/bin/medalign-cache")]


def test_readme_commands_build_one_cache_computing_each_image_once(tmp_path, monkeypatch):
    commands = readme_commands()
    builds = [c for c in commands if c[1] == "build"]
    assert len(builds) == len(make_formats.FILES) + 2                         # + R2Gen test split + folder
    monkeypatch.chdir(REPO)                                                   # the README's relative paths
    cache = tmp_path / "formats-cache"
    cached: set[str] = set()
    for command in commands:
        args = command[1:]
        args[args.index("--cache") + 1] = str(cache)
        if args[0] == "build":
            args += ["--workers", "0", "--quiet"]
        r = CliRunner().invoke(cache_cli, args)
        assert r.exit_code == 0, (command, r.output)
        if args[0] != "build":
            continue
        data = args[args.index("--data") + 1] if "--data" in args else None
        split = args[args.index("--split") + 1] if "--split" in args else None
        keys = set(cache_keys(load_records(data, IMAGES, split=split)))
        new = keys - cached
        assert f" {len(new)} computed" in r.output, (command, r.output)
        cached |= keys
    group = open_cache(cache)["tiny"]
    assert sorted(group.keys()) == sorted(p.name for p in IMAGES.glob("*.png")) == sorted(cached)
    assert group.missing(sorted(cached)) == []


def test_second_format_reports_its_own_images(tmp_path):
    cache = tmp_path / "cache"
    common = ["build", "--teacher", "tiny", "--random-init", "--image-root", str(IMAGES), "--cache", str(cache),
              "--workers", "0", "--quiet"]
    CliRunner().invoke(cache_cli, common + ["--data", str(FORMATS_DIR / "llava_instruct.json")])
    r = CliRunner().invoke(cache_cli, common + ["--data", str(FORMATS_DIR / "vqa_rad.json")])
    # vqa_rad.json names 3 images; the CT and the axial MNI slice were cached by the first build
    assert "3 samples, 1 computed" in r.output and "2 already done" in r.output, r.output


# examples/paper/: one config per published MedAlign script, the values of the table in
# examples/paper/README.md (read off Aofei-Chang/MedAlign@fbefd179 */scripts/unimed_distill.sh).
PAPER = {
    "llava-med_vqa-rad.yaml": ("unimed-b16", "vicuna_v1", 20, 1.0, 0.06, 32, 9),
    "llava-med_iu-xray.yaml": ("unimed-b16", "vicuna_v1", 20, 1.0, 0.03, 64, 12),
    "huatuo_iu-xray.yaml": ("unimed-l14-336", "huatuo_v1", 20, 1.0, 0.03, 64, 12),
    "huatuo_slake.yaml": ("unimed-b16", "huatuo_v1", 16, 1.0, 0.03, 32, 6),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_load_and_say_what_the_readme_says(name, tmp_path):
    from distill.config import RunConfig, load_config_file

    settings = load_config_file(REPO / "examples" / "paper" / name)
    config = RunConfig.from_dict({**settings, "cache": tmp_path, "student": "s", "data": tmp_path / "d.json",
                                  "image_root": tmp_path, "out": tmp_path / "run"})
    assert (config.teacher, config.chat_template, config.layer, config.alpha, config.beta, config.lora_r,
            config.epochs) == PAPER[name]
    # common to every published script
    assert (config.pad_to_square, config.lora_alpha, config.lora_dropout, config.lr, config.weight_decay,
            config.warmup_ratio, config.batch_size * config.grad_accum * 4, config.max_length,
            config.precision) == (True, 16, 0.05, 2e-4, 0.0, 0.03, 32, 1024, "bf16")
    assert name in (REPO / "examples" / "paper" / "README.md").read_text()


def test_every_paper_config_is_tested():
    assert sorted(p.name for p in (REPO / "examples" / "paper").glob("*.yaml")) == sorted(PAPER)
