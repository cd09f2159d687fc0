"""Cache build speed against its physical limit, side by side in one run.

    .venv/bin/python bench/bench_build.py [--n 64] [--teacher unimed] [--batch-size 32] [--repeats 3]

1. bare forward: the teacher's batched forward alone over images already decoded,
   preprocessed and stacked in memory (no decoding, no targets, no storage);
2. full build:   `build_cache` over the same images as PNG files (decode in
   DataLoader workers, forward, similarity + packing, Zarr shard writes).
Prints images/s for both and the ratio (goal: >= 0.90). Also prints the peak RSS
of builds over N and 4N images of the tiny teacher (memory must stay flat).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.build import BuildConfig, build_cache  # noqa: E402
from precompute.images import load_image  # noqa: E402
from precompute.teachers import load_teacher  # noqa: E402


def make_dataset(root: Path, n: int, size: int = 256) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        base = rng.random((16, 16))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        key = f"img_{i:05d}.png"
        img.save(root / key)
        items.append({"id": str(i), "image": key, "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]})
    data = root.parent / f"{root.name}.json"
    data.write_text(json.dumps(items))
    return data


def bare_forward(teacher, root: Path, n: int, batch_size: int) -> float:
    pixels = torch.stack([teacher.preprocess(load_image(root / f"img_{i:05d}.png")) for i in range(n)])
    teacher(pixels[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        teacher(pixels[i:i + batch_size])
    return n / (time.perf_counter() - t0)


def rss_growth_mb_of_build(root: Path, data: Path, cache: Path) -> float:
    """RSS high-water mark during a build minus RSS just before it (imports and the
    teacher already loaded), sampled every millisecond in a fresh process."""
    code = (
        "import sys, threading, time, psutil; sys.path.insert(0, %r)\n"
        "from precompute.build import BuildConfig, build_cache\n"
        "from precompute.teachers import load_teacher\n"
        "load_teacher('tiny', random_init=True)\n"
        "proc = psutil.Process(); base = proc.memory_info().rss; peak = [base]; done = []\n"
        "def watch():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.001)\n"
        "t = threading.Thread(target=watch); t.start()\n"
        "build_cache(BuildConfig(teacher='tiny', random_init=True, cache=%r, data=%r, image_root=%r,"
        " num_workers=0, shard_size=64), progress=False)\n"
        "done.append(1); t.join(); print((peak[0] - base) / 2**20)\n"
    ) % (str(Path(__file__).resolve().parents[1]), str(cache), str(data), str(root))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--teacher", default="unimed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "images"
        root.mkdir()
        data = make_dataset(root, args.n)
        teacher = load_teacher(args.teacher, random_init=True)
        # Interleaved repeats, medians: the machine's load drifts between measurements.
        bares, fulls = [], []
        for rep in range(args.repeats):
            bares.append(bare_forward(teacher, root, args.n, args.batch_size))
            t0 = time.perf_counter()
            report = build_cache(BuildConfig(teacher=args.teacher, random_init=True, cache=tmp / f"cache{rep}",
                                             data=data, image_root=root, batch_size=args.batch_size,
                                             num_workers=args.workers), progress=False)
            fulls.append(report.computed / (time.perf_counter() - t0))
        bare, full = float(np.median(bares)), float(np.median(fulls))
        print(f"teacher {args.teacher}, {args.n} images, batch {args.batch_size}, "
              f"{args.workers} decode worker(s), {torch.get_num_threads()} torch threads, "
              f"median of {args.repeats} interleaved repeats")
        print(f"  bare batched forward : {bare:8.2f} img/s   {[round(x, 2) for x in bares]}")
        print(f"  full build           : {full:8.2f} img/s   {[round(x, 2) for x in fulls]}"
              f"  (incl. teacher load, decode, targets, writes)")
        print(f"  ratio build / bare   : {full / bare:8.3f}   (goal >= 0.90)")

        small_root, big_root = tmp / "s", tmp / "b"
        small_root.mkdir(), big_root.mkdir()
        d_small, d_big = make_dataset(small_root, 200, 128), make_dataset(big_root, 800, 128)
        rss_small = rss_growth_mb_of_build(small_root, d_small, tmp / "c_small")
        rss_big = rss_growth_mb_of_build(big_root, d_big, tmp / "c_big")
        print(f"  RSS growth during a build, tiny teacher: 200 images {rss_small:.1f} MB, "
              f"800 images {rss_big:.1f} MB (flat: no per-sample accumulation)")


if __name__ == "__main__":
    main()
