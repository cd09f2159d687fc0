"""Past one process: a cache build split into parts (job arrays, torchrun) writes
exactly what one process writes; distributed training matches one process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from precompute.cli import main as cache_cli

from tests.test_build import CHILD_ENV as ENV  # one thread everywhere: bit-identical forwards
from tests.test_build import cache_arrays as arrays
from tests.test_build import kill_9_mid_build, llava_json, make_images

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    keys = make_images(tmp / "images", 22, seed=5)
    return tmp, llava_json(tmp / "train.json", keys)


def build_args(tmp, data, cache, *extra):
    return ["build", "--teacher", "tiny", "--random-init", "--data", str(data), "--image-root",
            str(tmp / "images"), "--cache", str(cache), "--batch-size", "3", "--shard-size", "4",
            "--workers", "0", "--quiet", *extra]


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli_in_process(args):
    return CliRunner().invoke(cache_cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def reference(dataset):
    tmp, data = dataset
    cache = tmp / "single"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_in_process(build_args(tmp, data, cache)).exit_code == 0
    finally:
        torch.set_num_threads(n)
    return arrays(cache)


def test_parts_as_job_array_equal_single_process(dataset, reference, one_thread):
    tmp, data = dataset
    cache = tmp / "parts"
    cli = [str(BIN / "medalign-cache")]
    # part 0 alone: only its shards (0, 2, 4) are done, the others wait for their part
    r = cli_in_process(build_args(tmp, data, cache, "--part", "0/2"))
    assert r.exit_code == 0, r.output
    status = arrays(cache)["status"]
    shard_of_row = np.arange(len(status)) // 4
    assert (status[shard_of_row % 2 == 0] == 1).all() and (status[shard_of_row % 2 == 1] == 0).all()
    # parts 1/2 and 0/2 (nothing left to do) running at the same time on the same cache
    procs = [subprocess.Popen(cli + build_args(tmp, data, cache, "--part", p), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in ("1/2", "0/2")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    result = arrays(cache)
    for name in reference:
        assert np.array_equal(result[name], reference[name]), name


def test_a_stopped_part_resumes_on_its_own(dataset, reference, one_thread):
    """Part 1 stops mid-way (a broken image in its second shard); part 0 is unaffected;
    rerunning part 1 after the fix completes it, and the cache equals a single build."""
    tmp, data = dataset
    cache = tmp / "resume-part"
    keys = [json.loads(data.read_text())[i]["image"] for i in range(22)]
    victim = tmp / "images" / sorted(keys)[3 * 4 + 1]       # row 13: shard 3, owned by part 1
    good = victim.read_bytes()
    victim.write_bytes(b"broken")
    try:
        r = cli_in_process(build_args(tmp, data, cache, "--part", "1/2"))
        assert r.exit_code == 1 and victim.name in r.output
        status = arrays(cache)["status"]
        assert (status[4:8] == 1).all() and (status[12:16] == 0).all()   # shard 1 kept, shard 3 pending
    finally:
        victim.write_bytes(good)
    assert cli_in_process(build_args(tmp, data, cache, "--part", "0/2")).exit_code == 0
    r = cli_in_process(build_args(tmp, data, cache, "--part", "1/2"))
    assert r.exit_code == 0 and "6 computed" in r.output, r.output  # shards 3 and 5: 4 + 2 rows
    result = arrays(cache)
    for name in reference:
        assert np.array_equal(result[name], reference[name]), name


def test_a_killed_part_resumes_on_its_own(dataset, reference, one_thread):
    """Part 1 is SIGKILLed mid-build (in shard 3's commit: its targets written, its status
    not); rerunning part 1 (as --shard, the same option) finishes exactly its pending
    shards, part 0 runs as if nothing happened, and the cache equals a single build."""
    tmp, data = dataset
    cache = tmp / "killed-part"
    assert "rows 12 .. 15" in kill_9_mid_build(build_args(tmp, data, cache, "--part", "1/2"))
    status = arrays(cache)["status"]
    assert (status[4:8] == 1).all() and (np.delete(status, range(4, 8)) == 0).all()
    assert (cache / "tiny" / "similarity" / "c" / "3" / "0").is_file()
    r = cli_in_process(build_args(tmp, data, cache, "--shard", "1/2"))
    assert r.exit_code == 0 and "6 computed" in r.output, r.output     # shards 3 and 5: 4 + 2 rows
    assert cli_in_process(build_args(tmp, data, cache, "--shard", "0/2")).exit_code == 0
    result = arrays(cache)
    for name in reference:
        assert np.array_equal(result[name], reference[name]), name
    assert "--shard" in cli_in_process(["build", "--help"]).output


def test_parts_on_a_url_cache_equal_single_process(dataset, reference, one_thread, memory_url):
    tmp, data = dataset
    for part in ("0/2", "1/2"):
        r = cli_in_process(build_args(tmp, data, memory_url, "--part", part))
        assert r.exit_code == 0, r.output
    result = arrays(memory_url)
    for name in reference:
        assert np.array_equal(result[name], reference[name]), name


def test_torchrun_build_equals_single_process(dataset, reference):
    tmp, data = dataset
    cache = tmp / "torchrun"
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                        "precompute.cli", *build_args(tmp, data, cache)], env=ENV, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    result = arrays(cache)
    for name in reference:
        assert np.array_equal(result[name], reference[name]), name


def test_a_whole_build_refuses_while_a_part_runs(dataset):
    import fcntl
    tmp, data = dataset
    cache = tmp / "locks"
    assert cli_in_process(build_args(tmp, data, cache, "--part", "0/2")).exit_code == 0
    # flock locks belong to open files, so this holder conflicts even within one process
    with open(cache / "tiny" / "build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)       # a part holding its share of the group lock
        whole = CliRunner().invoke(cache_cli, build_args(tmp, data, cache))
        other_part = CliRunner().invoke(cache_cli, build_args(tmp, data, cache, "--part", "1/2"))
    assert whole.exit_code == 1 and "another build" in whole.output
    assert other_part.exit_code == 0, other_part.output


TRAIN = """
import json, sys
from distill.config import RunConfig
from distill.train import train
args = json.loads(sys.argv[1])
train(RunConfig(**args), progress=False)
"""


@pytest.fixture(scope="module")
def train_data(dataset):
    tmp, data = dataset
    cache = tmp / "train-cache"
    assert cli_in_process(build_args(tmp, data, cache)).exit_code == 0
    return tmp, data, cache


def run_training(tmp, data, cache, out, world: int, batch_size: int, **extra):
    args = dict(cache=str(cache), teacher="tiny", student="tiny", data=str(data), image_root=str(tmp / "images"),
                out=str(out), layer=2, max_steps=6, batch_size=batch_size, grad_accum=2, lr=3e-3, lora_dropout=0.0,
                num_workers=0, save_every=3, **extra)
    # --standalone: a free port each time, so parallel test runs cannot collide
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(world)] if world > 1 \
        else [sys.executable]
    cmd = launcher + (["-c", TRAIN] if world == 1 else [str(tmp / "train_script.py")]) + [json.dumps(args)]
    (tmp / "train_script.py").write_text(TRAIN)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_with_twice_the_batch(train_data):
    """gloo on CPU: 2 ranks x batch 2 == 1 process x batch 4 (same samples per step,
    gradients summed over ranks, losses normalised by the step's global counts)."""
    from safetensors.torch import load_file
    tmp, data, cache = train_data
    one = run_training(tmp, data, cache, tmp / "run-1x4", world=1, batch_size=4)
    two = run_training(tmp, data, cache, tmp / "run-2x2", world=2, batch_size=2, report_to=["tensorboard"])
    for key in ("loss", "ntp", "vis", "att"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-6), key
    a = load_file(tmp / "run-1x4" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp / "run-2x2" / "adapter" / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert json.loads((tmp / "run-2x2" / "versions.json").read_text())["world_size"] == 2
    # each rank checkpointed its own RNG stream
    assert sorted(p.name for p in (tmp / "run-2x2" / "checkpoints").glob("*/rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    # only rank 0 reports: one event file, each step once
    assert len(list((tmp / "run-2x2" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    from tests.test_tracking import read_tensorboard
    assert [s for s, _ in read_tensorboard(tmp / "run-2x2" / "tensorboard")["train/loss"]] == [1, 2, 3, 4, 5, 6]
