"""How fast and how small is the teacher-target cache?

For a B/16 teacher (14x14 = 196 patches) and an L/14-336 teacher (24x24 = 576 patches)
this writes a cache of realistic fp16 cosine matrices with GroupWriter, then measures
per-sample random-access reads (page cache warm, random order, one sample at a time as
a DataLoader worker does):

    memmap          raw numpy memmap of the same packed fp16 data + fp32 attention (baseline)
    zarr-python     zarr.open_array(...)[i] on the same store
    native_packed   our reader (shard index parsed once, one pread + crc32c check + blosc decode a row)
    no checksums    the same reader on a cache written without chunk checksums (the layout
                    before they were added): the cost of checking every read
    --against REF   also the reader of git ref REF (precompute/cache.py as it was there,
                    loaded beside this one) on that checksum-less cache: e.g. the commit
                    before checksums, to compare with the read rate before the change. It
                    is timed twice: as it ran in a main process (numcodecs then let blosc
                    use its thread pool there; ours no longer does) and without the pool,
                    as every reader runs in a DataLoader worker, where training reads
    targets(24)     native_packed + unpack + exact resize to a 24x24 student grid
    HDF5            the same group exported to one file (`medalign-cache export`: one sample
                    per chunk, shuffle + gzip level 1 + fletcher32; and with --gzip-level 0),
                    read through open_cache's H5Group.native_packed

The checked / unchecked / REF readers take turns: --rounds short rounds, each over a
quarter of the keys, the readers in a rotating order. Their rates are per-round
medians; a ratio is the median (and quartiles) of the per-round ratios of readers that
ran milliseconds apart, so a neighbour's burst on a shared machine spoils a round, not
the comparison.

then the same random reads through a torch DataLoader with 2 worker processes (batches of
16, steady state: a second pass over persistent workers) for memmap, Zarr and HDF5, and
prints bytes per sample on disk against the reference's 576x576 float32 matrix, and
the error of the stored (fp16) + resized targets against the reference recipe in fp32.

    python bench/bench_cache_read.py [--n-b16 4000] [--n-l14 1500] [--workers 2] [--rounds 80] [--against REF]
"""

import argparse
import importlib.util
import os
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numcodecs.blosc
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import precompute.cache as cache_module  # noqa: E402
from precompute.cache import GroupWriter, open_cache  # noqa: E402
from precompute.h5cache import export_h5  # noqa: E402
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


class MemmapRows(Dataset):
    """Rows of the two .npy files, memory-mapped in the process that reads (a memmap
    pickled into a worker would be copied whole)."""

    def __init__(self, sim_path, att_path):
        self.paths, self.arrays = (sim_path, att_path), None

    def __len__(self):
        return len(np.load(self.paths[1], mmap_mode="r"))

    def __getitem__(self, i):
        if self.arrays is None:
            self.arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        return torch.from_numpy(np.array(self.arrays[0][i])), torch.from_numpy(np.array(self.arrays[1][i]))


class GroupRows(Dataset):
    """Rows of a cache group (Zarr or HDF5) by row number, as DistillDataset reads them."""

    def __init__(self, group):
        self.group, self.keys = group, group.keys()

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        s, a = self.group.native_packed(self.keys[i])
        return torch.from_numpy(s), torch.from_numpy(a)


def loader_rate(dataset, order, workers: int) -> float:
    """Samples/s through a DataLoader with `workers` processes, random order, batches of 16;
    the second pass (workers started, page cache and handles warm) is timed."""
    batches = [order[i:i + 16].tolist() for i in range(0, len(order), 16)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, persistent_workers=True,
                        prefetch_factor=4)
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    seconds = time.perf_counter() - start
    del loader
    return len(order) / seconds




def open_cache_at(ref: str, workdir: Path):
    """`open_cache` of precompute/cache.py as it is at git ref `ref`, loaded beside this one."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{ref}:precompute/cache.py"], check=True,
                         capture_output=True, text=True).stdout
    path = workdir / "cache_at_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("precompute._cache_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "precompute"  # its `from .targets import ...` finds this package's
    spec.loader.exec_module(module)
    return module.open_cache


def write_cache(cache: Path, keys, P: int, label: str, packed, attn, src, checksums: bool = True) -> float:
    """Seconds GroupWriter takes to write every row (chunk checksums on, or the old layout)."""
    cache_module.CHUNK_CHECKSUMS = checksums
    try:
        writer = GroupWriter.open(cache, "teacher", keys, P, {"teacher": label, "num_patches": P})
    finally:
        cache_module.CHUNK_CHECKSUMS = True
    t0 = time.perf_counter()
    with writer.lock():
        for lo in range(0, len(keys), writer.shard_size):
            rows = np.arange(lo, min(lo + writer.shard_size, len(keys)))
            writer.write_rows(rows, packed[src[rows]], attn[src[rows]], {})
    return time.perf_counter() - t0


def bench(label: str, grid: int, n: int, unique: int, workdir: Path, workers: int = 2, seed: int = 0,
          rounds: int = 80, against: str | None = None) -> dict:
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
    write_s = write_cache(cache, keys, P, label, packed, attn, src)
    legacy_cache = workdir / f"cache_{label}_no_checksums"
    write_cache(legacy_cache, keys, P, label, packed, attn, src, checksums=False)

    mm_sim = np.lib.format.open_memmap(workdir / f"{label}_sim.npy", "w+", np.float16, (n, packed.shape[1]))
    mm_att = np.lib.format.open_memmap(workdir / f"{label}_att.npy", "w+", np.float32, (n, P))
    mm_sim[:], mm_att[:] = packed[src], attn[src]
    mm_sim.flush(), mm_att.flush()
    del mm_sim, mm_att
    mm_sim = np.load(workdir / f"{label}_sim.npy", mmap_mode="r")
    mm_att = np.load(workdir / f"{label}_att.npy", mmap_mode="r")

    t0 = time.perf_counter()
    export_h5(cache, ["teacher"], workdir / f"{label}.h5", progress=False)
    export_s = time.perf_counter() - t0
    export_h5(cache, ["teacher"], workdir / f"{label}_plain.h5", gzip_level=0, progress=False)
    h5 = open_cache(workdir / f"{label}.h5")["teacher"]
    h5_plain = open_cache(workdir / f"{label}_plain.h5")["teacher"]

    group = open_cache(cache)["teacher"]
    legacy = open_cache(legacy_cache)["teacher"]
    assert not group.unchecked_arrays and legacy.unchecked_arrays == ["similarity", "attention"]
    z_sim = zarr.open_array(str(cache / "teacher" / "similarity"), mode="r")
    z_att = zarr.open_array(str(cache / "teacher" / "attention"), mode="r")
    order = np.random.default_rng(seed).permutation(n)
    order_keys = [keys[i] for i in order]

    def read_memmap(i):
        return np.array(mm_sim[i]), np.array(mm_att[i])

    # warm pass: page cache, memmap page tables, shard indexes (steady state of epoch 2+)
    rate(read_memmap, order)
    rate(h5.native_packed, order_keys)
    rate(h5_plain.native_packed, order_keys)
    # name -> (read, numcodecs.blosc.use_threads while it reads: None = numcodecs' default,
    # the pool in a main thread; False = none, what precompute.cache sets and what any
    # reader gets in a DataLoader worker)
    readers = {"checked": (group.native_packed, False), "unchecked": (legacy.native_packed, False)}
    if against:
        ref_read = open_cache_at(against, workdir)(legacy_cache)["teacher"].native_packed
        readers["ref"] = (ref_read, None)
        readers["ref_no_pool"] = (ref_read, False)

    def timed(name, keys_r):
        read, threads = readers[name]
        numcodecs.blosc.use_threads = threads
        try:
            return rate(read, keys_r)
        finally:
            numcodecs.blosc.use_threads = False

    for name in readers:
        timed(name, order_keys)
    names, part = list(readers), max(len(order_keys) // 4, 1)
    rates = {name: [] for name in names}
    for r in range(rounds):
        keys_r = order_keys[(r % 4) * part:(r % 4 + 1) * part]
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(timed(name, keys_r))
    rates = {name: np.array(v) for name, v in rates.items()}

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        return tuple(float(q) for q in np.percentile(rates[a] / rates[b], [50, 25, 75]))

    res = {
        "n": n, "write_s": write_s, "export_s": export_s,
        "memmap": rate(read_memmap, order),
        "zarr": rate(lambda i: (z_sim[i], z_att[i]), order[:200]),
        "native_packed": float(np.median(rates["checked"])),
        "no_checksums": float(np.median(rates["unchecked"])),
        "crc_ratio": ratio("checked", "unchecked"),
        "targets": rate(lambda k: group.targets(k, STUDENT_GRID), order_keys[:200]),
        "h5": rate(h5.native_packed, order_keys),
        "h5_plain": rate(h5_plain.native_packed, order_keys),
    }
    if against:
        res["ref"] = float(np.median(rates["ref"]))
        res["ref_no_pool"] = float(np.median(rates["ref_no_pool"]))
        res["ref_ratio"] = ratio("checked", "ref")
        res["ref_no_pool_ratio"] = ratio("checked", "ref_no_pool")
    # exactness: our readers return what zarr-python returns
    for i in order[:20]:
        s, a = group.native_packed(keys[i])
        assert np.array_equal(s, z_sim[i]) and np.array_equal(a, z_att[i])
        for other in (h5, h5_plain):
            s, a = other.native_packed(keys[i])
            assert np.array_equal(s, z_sim[i]) and np.array_equal(a, z_att[i])
    res["w_memmap"] = loader_rate(MemmapRows(workdir / f"{label}_sim.npy", workdir / f"{label}_att.npy"), order,
                                  workers)
    res["w_zarr"] = loader_rate(GroupRows(group), order, workers)
    res["w_h5"] = loader_rate(GroupRows(h5), order, workers)
    disk = sum(f.stat().st_size for f in (cache / "teacher").rglob("*") if f.is_file())
    res["bytes"] = disk / n
    res["bytes_h5"] = (workdir / f"{label}.h5").stat().st_size / n
    res["bytes_h5_plain"] = (workdir / f"{label}_plain.h5").stat().st_size / n
    # stored fp16 + exact resize vs the reference recipe done directly in fp32
    sim_ref, att_ref = reference_targets(tokens, torch.from_numpy(attn), STUDENT_GRID)
    res["err_sim"] = max(float((group.targets(keys[u], STUDENT_GRID)[0] - sim_ref[u]).abs().max())
                         for u in range(min(unique, 16)))
    res["err_att"] = max(float((group.targets(keys[u], STUDENT_GRID)[1] - att_ref[u]).abs().max())
                         for u in range(min(unique, 16)))
    for g in (group, legacy, h5, h5_plain):
        g.close()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-b16", type=int, default=4000)
    ap.add_argument("--n-l14", type=int, default=1500)
    ap.add_argument("--unique", type=int, default=64, help="distinct matrices the samples cycle through")
    ap.add_argument("--dir", type=Path, default=None, help="work folder [a temp dir, removed after]")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--rounds", type=int, default=80, help="rounds of checked / unchecked / REF reads")
    ap.add_argument("--against", default=None, metavar="REF",
                    help="also time the reader of this git ref on the checksum-less cache")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker, where per-sample reads happen
    workdir = Path(tempfile.mkdtemp(prefix="medalign_bench_", dir=args.dir))
    try:
        cols = {"B/16 (P=196)": bench("b16", 14, args.n_b16, args.unique, workdir, args.workers, rounds=args.rounds,
                                      against=args.against),
                "L/14-336 (P=576)": bench("l14", 24, args.n_l14, args.unique, workdir, args.workers, rounds=args.rounds,
                                          against=args.against)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    names = list(cols)
    print(f"teacher-target cache, per-sample random reads ({os.cpu_count()} CPU cores, page cache warm)")
    print(f"{'':40s}" + "".join(f"{n:>28s}" for n in names))

    def row(label, fmt):
        print(f"{label:40s}" + "".join(f"{fmt(cols[n]):>28s}" for n in names))

    row("samples", lambda r: f"{r['n']}")
    row("write (GroupWriter), samples/s", lambda r: f"{r['n'] / r['write_s']:,.0f}")
    row("export to HDF5 (gzip 1), samples/s", lambda r: f"{r['n'] / r['export_s']:,.0f}")
    print("one process:")
    for key, label in (("memmap", "raw memmap (baseline)"), ("zarr", "zarr-python arr[i]"),
                       ("native_packed", "ours: native_packed"), ("no_checksums", "ours, no chunk checksums"),
                       ("targets", f"ours: targets(grid={STUDENT_GRID})"),
                       ("h5", "HDF5 gzip 1: native_packed"), ("h5_plain", "HDF5 no gzip: native_packed")):
        row(label + ", samples/s", lambda r, k=key: f"{r[k]:>10,.0f}  ({r[k] / r['memmap']:.3f}x)")
    if args.against:
        row(f"reader at {args.against}, no checksums, samples/s", lambda r: f"{r['ref']:>10,.0f}  "
                                                                        f"({r['ref'] / r['memmap']:.3f}x)")
        row("  the same, blosc without its pool", lambda r: f"{r['ref_no_pool']:>10,.0f}  "
                                                           f"({r['ref_no_pool'] / r['memmap']:.3f}x)")
    quartiles = lambda q: f"{q[0]:.3f}  [{q[1]:.3f}, {q[2]:.3f}]"  # noqa: E731
    row("checked / unchecked, same reader", lambda r: quartiles(r["crc_ratio"]))
    if args.against:
        row(f"checked / reader at {args.against}", lambda r: quartiles(r["ref_ratio"]))
        row("  the same, both without blosc's pool", lambda r: quartiles(r["ref_no_pool_ratio"]))
    print("(checked / ...: median [quartiles] of per-round ratios)")
    print(f"DataLoader, {args.workers} workers, batches of 16:")
    for key, label in (("w_memmap", "raw memmap (baseline)"), ("w_zarr", "ours: Zarr native_packed"),
                       ("w_h5", "HDF5 gzip 1: native_packed")):
        row(label + ", samples/s", lambda r, k=key: f"{r[k]:>10,.0f}  ({r[k] / r['w_memmap']:.3f}x)")
    row("bytes/sample on disk, Zarr", lambda r: f"{r['bytes']:>10,.0f}  ({REFERENCE_BYTES / r['bytes']:.1f}x smaller)")
    row("bytes/sample, HDF5 gzip 1", lambda r: f"{r['bytes_h5']:>10,.0f}  ({r['bytes_h5'] / r['bytes']:.3f}x Zarr)")
    row("bytes/sample, HDF5 no gzip", lambda r: f"{r['bytes_h5_plain']:>10,.0f}  "
                                                f"({r['bytes_h5_plain'] / r['bytes']:.3f}x Zarr)")
    row("max |S_t - reference| (fp16 stored)", lambda r: f"{r['err_sim']:.2e}")
    row("max |a_t - reference|", lambda r: f"{r['err_att']:.2e}")
    print(f"(reference: 576x576 float32 = {REFERENCE_BYTES:,} B per image; errors vs reference_targets in fp32; "
          f"read ratios vs memmap in the same setting; HDF5 sizes are whole files)")


if __name__ == "__main__":
    main()
