"""How fast and how small is the teacher-target cache?

For a B/16 teacher (14x14 = 196 patches) and an L/14-336 teacher (24x24 = 576 patches)
this writes a cache of realistic fp16 cosine matrices with GroupWriter, then measures
per-sample random-access reads (page cache warm, random order, one sample at a time as
a DataLoader worker does):

    memmap          raw numpy memmap of the same packed fp16 data + fp32 attention (baseline)
    zarr-python     zarr.open_array(...)[i] on the same store
    native_packed   our reader (shard index parsed once, one pread + blosc decode a row)
    targets(24)     native_packed + unpack + exact resize to a 24x24 student grid

and prints bytes per sample on disk against the reference's 576x576 float32 matrix, and
the error of the stored (fp16) + resized targets against the reference recipe in fp32.

    python bench/bench_cache_read.py [--n-b16 4000] [--n-l14 1500]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from precompute.cache import GroupWriter, open_cache  # noqa: E402
from precompute.targets import pack_upper, patch_similarity, reference_targets  # noqa: E402

REFERENCE_BYTES = 576 * 576 * 4  # the reference's per-image float32 matrix
STUDENT_GRID = 24                # LLaVA-Med


def teacher_like(n: int, grid: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and CLS attention shaped like a CLIP ViT's last block: a shared component
    (cosines mostly positive), a smooth spatial field and per-patch noise; attention a
    softmax over smooth logits."""
    shared = torch.randn(n, dim, 1, 1, generator=gen)
    field = F.interpolate(torch.randn(n, dim, 4, 4, generator=gen), size=(grid, grid), mode="bicubic",
                          align_corners=False)
    tokens = (shared + field + 0.5 * torch.randn(n, dim, grid, grid, generator=gen)).flatten(2).transpose(1, 2)
    logits = F.interpolate(torch.randn(n, 1, 3, 3, generator=gen), size=(grid, grid), mode="bilinear",
                           align_corners=False).flatten(1)
    return tokens, torch.softmax(3 * logits, dim=-1)


def rate(fn, items) -> float:
    start = time.perf_counter()
    for it in items:
        fn(it)
    return len(items) / (time.perf_counter() - start)


def bench(label: str, grid: int, n: int, unique: int, workdir: Path, seed: int = 0) -> dict:
    P = grid * grid
    gen = torch.Generator().manual_seed(seed)
    tokens, attn = teacher_like(unique, grid, 256, gen)
    packed = pack_upper(patch_similarity(tokens)).half().numpy()
    attn = attn.numpy()
    # n samples cycling through `unique` distinct ones: every row is still compressed
    # and stored on its own, so sizes and read costs are those of n distinct samples.
    keys = [f"study_{i // 8:05d}/img_{i:06d}.png" for i in range(n)]
    src = np.arange(n) % unique

    cache = workdir / f"cache_{label}"
    writer = GroupWriter.open(cache, "teacher", keys, P, {"teacher": label, "num_patches": P})
    t0 = time.perf_counter()
    with writer.lock():
        for lo in range(0, n, writer.shard_size):
            rows = np.arange(lo, min(lo + writer.shard_size, n))
            writer.write_rows(rows, packed[src[rows]], attn[src[rows]], {})
    write_s = time.perf_counter() - t0

    mm_sim = np.lib.format.open_memmap(workdir / f"{label}_sim.npy", "w+", np.float16, (n, packed.shape[1]))
    mm_att = np.lib.format.open_memmap(workdir / f"{label}_att.npy", "w+", np.float32, (n, P))
    mm_sim[:], mm_att[:] = packed[src], attn[src]
    mm_sim.flush(), mm_att.flush()
    del mm_sim, mm_att
    mm_sim = np.load(workdir / f"{label}_sim.npy", mmap_mode="r")
    mm_att = np.load(workdir / f"{label}_att.npy", mmap_mode="r")

    group = open_cache(cache)["teacher"]
    z_sim = zarr.open_array(str(cache / "teacher" / "similarity"), mode="r")
    z_att = zarr.open_array(str(cache / "teacher" / "attention"), mode="r")
    order = np.random.default_rng(seed).permutation(n)
    order_keys = [keys[i] for i in order]

    def read_memmap(i):
        return np.array(mm_sim[i]), np.array(mm_att[i])

    # warm pass: page cache, memmap page tables, shard indexes (steady state of epoch 2+)
    rate(read_memmap, order)
    rate(group.native_packed, order_keys)
    res = {
        "n": n, "write_s": write_s,
        "memmap": rate(read_memmap, order),
        "zarr": rate(lambda i: (z_sim[i], z_att[i]), order[:200]),
        "native_packed": rate(group.native_packed, order_keys),
        "targets": rate(lambda k: group.targets(k, STUDENT_GRID), order_keys[:200]),
    }
    # exactness: our reader returns what zarr-python returns
    for i in order[:20]:
        s, a = group.native_packed(keys[i])
        assert np.array_equal(s, z_sim[i]) and np.array_equal(a, z_att[i])
    disk = sum(f.stat().st_size for f in (cache / "teacher").rglob("*") if f.is_file())
    res["bytes"] = disk / n
    # stored fp16 + exact resize vs the reference recipe done directly in fp32
    sim_ref, att_ref = reference_targets(tokens, torch.from_numpy(attn), STUDENT_GRID)
    res["err_sim"] = max(float((group.targets(keys[u], STUDENT_GRID)[0] - sim_ref[u]).abs().max())
                         for u in range(min(unique, 16)))
    res["err_att"] = max(float((group.targets(keys[u], STUDENT_GRID)[1] - att_ref[u]).abs().max())
                         for u in range(min(unique, 16)))
    group.close()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-b16", type=int, default=4000)
    ap.add_argument("--n-l14", type=int, default=1500)
    ap.add_argument("--unique", type=int, default=64, help="distinct matrices the samples cycle through")
    ap.add_argument("--dir", type=Path, default=None, help="work folder [a temp dir, removed after]")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker, where per-sample reads happen
    workdir = Path(tempfile.mkdtemp(prefix="medalign_bench_", dir=args.dir))
    try:
        cols = {"B/16 (P=196)": bench("b16", 14, args.n_b16, args.unique, workdir),
                "L/14-336 (P=576)": bench("l14", 24, args.n_l14, args.unique, workdir)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    names = list(cols)
    print(f"teacher-target cache, per-sample random reads ({os.cpu_count()} CPU cores, page cache warm)")
    print(f"{'':34s}" + "".join(f"{n:>28s}" for n in names))

    def row(label, fmt):
        print(f"{label:34s}" + "".join(f"{fmt(cols[n]):>28s}" for n in names))

    row("samples", lambda r: f"{r['n']}")
    row("write (GroupWriter), samples/s", lambda r: f"{r['n'] / r['write_s']:,.0f}")
    for key, label in (("memmap", "raw memmap (baseline)"), ("zarr", "zarr-python arr[i]"),
                       ("native_packed", "ours: native_packed"), ("targets", f"ours: targets(grid={STUDENT_GRID})")):
        row(label + ", samples/s", lambda r, k=key: f"{r[k]:>10,.0f}  ({r[k] / r['memmap']:.3f}x)")
    row("bytes/sample on disk", lambda r: f"{r['bytes']:>10,.0f}  ({REFERENCE_BYTES / r['bytes']:.1f}x smaller)")
    row("max |S_t - reference| (fp16 stored)", lambda r: f"{r['err_sim']:.2e}")
    row("max |a_t - reference|", lambda r: f"{r['err_att']:.2e}")
    print(f"(reference: 576x576 float32 = {REFERENCE_BYTES:,} B per image; errors vs reference_targets in fp32; "
          f"ratios vs memmap)")


if __name__ == "__main__":
    main()
