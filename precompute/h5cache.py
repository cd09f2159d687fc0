"""A cache as one HDF5 file: `medalign-cache export` writes it, `open_cache` reads it.

    cache.h5                          root attributes: medalign_cache_schema = 1, medalign_export (JSON)
    cache.h5::/<group>                one HDF5 group per teacher group; its attributes are the Zarr
                                      group's, each stored as JSON text
    cache.h5::/<group>/keys           UTF-8 strings [N]   sample keys, as in the Zarr cache (fixed length)
    cache.h5::/<group>/status         uint8 [N]           0 pending, 1 done, 2 failed
    cache.h5::/<group>/similarity     float16 [N, M]      chunks (1, M): one sample per chunk
    cache.h5::/<group>/attention      float32 [N, P]      chunks (1, P)
    cache.h5::/<group>/failures.jsonl UTF-8 strings [F]   the lines of the group's failures.jsonl

Every dataset goes through shuffle + gzip (deflate, both built into every HDF5 library:
h5py, MATLAB, Julia, h5dump read it without plugins) and the fletcher32 checksum filter,
so HDF5 checks every chunk it reads; rows that are not done are never written (they read
as the NaN fill value). cache_schema.md ("Single-file HDF5 cache") is the full
description. Why a second container: a Zarr cache of a million images is thousands of
shard files, and HPC inode quotas, MATLAB/Julia users and plain h5py want one file.

The file is read-only to medalign: builds write Zarr; export again after a build. The
reader (`H5Group`) is a TeacherGroup: same keys, status, targets and errors. Its h5py
handle is opened lazily in the process that reads (a DataLoader worker never uses one
its parent opened), and a group pickles without it (spawn-started workers).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cache import (DONE, FAILED, KEYS_CHUNK, PENDING, ROOT_ATTR, SCHEMA_VERSION, Cache, CacheError, TeacherGroup,
                    _check_group_schema, open_cache)
from .h5images import H5_SUFFIXES, H5OpenError, _one_line, is_hdf5, read_only

EXPORT_ATTR = "medalign_export"
GZIP_LEVEL = 1      # level 4 stores ~3% less, writes ~25% slower, reads the same (bench/bench_cache_read.py)
BLOCK = 256         # rows read from the source and written per h5py call
_inherited: list = []   # handles a forked child got from its parent: kept, never used or closed


def is_h5_cache(path) -> bool:
    """Whether --cache names a single-file HDF5 cache (an HDF5 file, or an .h5/.hdf5 name)."""
    if not isinstance(path, (str, os.PathLike)) or "://" in os.fspath(path):
        return False
    path = Path(path).expanduser()
    if path.is_dir():  # a cache folder, whatever its name
        return False
    return path.suffix.lower() in H5_SUFFIXES or is_hdf5(path)


def _open(path: Path):
    try:
        return read_only(path)
    except H5OpenError as e:
        raise CacheError(f"{path}: {e}; --cache takes a cache folder or a single-file cache written by "
                         f"`medalign-cache export`") from None


def _storage_size(h) -> int:
    """Bytes the datasets of HDF5 group `h` take in the file (compressed chunks)."""
    return sum(h[name].id.get_storage_size() for name in h)


# ----------------------------------------------------------------------------- reader

class H5Path:
    """Where something lives in an HDF5 cache, for messages: "cache.h5::/group/name"."""

    def __init__(self, file: Path, inner: str):
        self.file, self.inner = Path(file), inner

    def __truediv__(self, name: str) -> "H5Path":
        return H5Path(self.file, f"{self.inner.rstrip('/')}/{name}")

    def __str__(self):
        return f"{self.file}::{self.inner}"

    def __repr__(self):
        return f"H5Path({str(self)!r})"

    @property
    def name(self) -> str:
        return self.inner.rsplit("/", 1)[-1]


class H5Group(TeacherGroup):
    """One teacher group of an HDF5 cache, with TeacherGroup's interface (keys, status,
    missing, native_packed, native, targets, metadata, ...). Keys and status are read
    when it is opened; target rows when asked for, through one handle per process."""

    def __init__(self, file: Path, name: str, metadata: dict):  # no super().__init__: it opens Zarr arrays
        self.name, self.cache_path, self.path = name, Path(file), H5Path(file, f"/{name}")
        self.metadata = metadata
        self.num_patches = int(metadata["num_patches"])
        self.native_grid = math.isqrt(self.num_patches)
        self.shard_size = int(metadata.get("shard_size") or 1)
        self._h5 = self._pid = self._sim = self._attn = None
        M, P = self.num_patches * (self.num_patches - 1) // 2, self.num_patches
        try:
            with _open(self.cache_path) as f:
                h = f[name]
                self._keys = h["keys"].asstr()[:].tolist()
                self._status = h["status"][:]
                shapes = {n: h[n].shape for n in ("similarity", "attention")}
        except CacheError:
            raise
        except (KeyError, OSError, ValueError) as e:
            raise CacheError(f"cache group {self.path} is damaged ({type(e).__name__}: {_one_line(e)}); export it "
                             f"again with `medalign-cache export`") from None
        n = len(self._keys)
        if len(self._status) != n or shapes != {"similarity": (n, M), "attention": (n, P)}:
            raise CacheError(f"cache group {self.path} is damaged ({n} keys, {len(self._status)} status rows, "
                             f"arrays {shapes} for {P} patches); export it again with `medalign-cache export`")
        self._rows = {k: i for i, k in enumerate(self._keys)}

    def __repr__(self):
        return f"H5Group({self.name!r}, {len(self)} samples, grid {self.native_grid}, {self.path})"

    def __getstate__(self):  # pickled into spawn-started DataLoader workers: no handle
        state = self.__dict__.copy()
        state.update(_h5=None, _pid=None, _sim=None, _attn=None)
        return state

    def _absent_fix(self) -> str:
        return ("build it into the cache folder this file was exported from (`medalign-cache build`), then export "
                "again")

    def _not_done_fix(self, state: int) -> str:
        if state == FAILED:
            return (f"its image failed to load or compute (reason in {self.path / 'failures.jsonl'}); fix the image, "
                    f"rebuild the cache folder and export again")
        return "finish the build of the cache folder it was exported from and export again"

    def _datasets(self):
        if self._pid != os.getpid():
            if self._h5 is not None:  # forked: the parent's handle must not be used (or closed) here
                _inherited.append(self._h5)
            f = _open(self.cache_path)
            self._h5, self._pid = f, os.getpid()
            self._sim, self._attn = f[self.name]["similarity"], f[self.name]["attention"]
        return self._sim, self._attn

    def native_packed(self, key: str, similarity: bool = True, attention: bool = True
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(packed fp16 similarity [M], fp32 attention [P]) as stored; an array not asked
        for is not read (None). HDF5 verifies each chunk's fletcher32 checksum."""
        row = self._done_row(key)
        sim_ds, attn_ds = self._datasets()
        out = []
        for wanted, ds in ((similarity, sim_ds), (attention, attn_ds)):
            if not wanted:
                out.append(None)
                continue
            try:
                values = ds[row]
            except (OSError, ValueError) as e:
                raise CacheError(f"{key!r}: row {row} of {self.path / ds.name.rsplit('/', 1)[-1]} cannot be read "
                                 f"({_one_line(e)}): the file is damaged (a failed checksum means its bytes "
                                 f"changed on disk); export it again") from None
            if values.size and np.isnan(values[0]):  # a done row is finite: NaN is the never-written fill
                raise CacheError(f"{key!r}: row {row} is marked done but {self.path} has no data for it; export "
                                 f"it again")
            out.append(values)
        return out[0], out[1]

    def structure_problems(self) -> list[str]:
        return []  # the arrays' shapes were checked against the keys when the group was opened

    @property
    def unchecked_arrays(self) -> list[str]:
        return []  # every dataset carries HDF5's fletcher32, verified on every read

    def stored_bytes(self) -> int:
        """Bytes the group's datasets take in the file (compressed chunks)."""
        with _open(self.cache_path) as f:
            return _storage_size(f[self.name])

    def close(self):
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = self._sim = self._attn = None


class H5Cache(Cache):
    """The teacher groups of an HDF5 cache (lookup by name or alias, as Cache)."""

    group_class = H5Group


def _attribute(value):
    text = value.decode() if isinstance(value, bytes) else value
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text  # an attribute someone added by hand: kept as it is


def open_h5_cache(path) -> H5Cache:
    """Open a single-file cache read-only (open_cache does this for a file)."""
    import h5py
    path = Path(path)
    with _open(path) as f:
        version = f.attrs.get(ROOT_ATTR)
        if version is None:
            raise CacheError(f"{path} is an HDF5 file but not a medalign cache (no {ROOT_ATTR!r} attribute); "
                             f"--cache takes a cache folder or a file written by `medalign-cache export`")
        if int(version) > SCHEMA_VERSION:
            raise CacheError(f"cache {path} has schema {int(version)}, newer than this medalign understands "
                             f"({SCHEMA_VERSION}); upgrade medalign")
        groups = {}
        for name, obj in f.items():
            if isinstance(obj, h5py.Group):
                attrs = {k: _attribute(v) for k, v in obj.attrs.items()}
                _check_group_schema(H5Path(path, f"/{name}"), attrs)
                groups[name] = attrs
    return H5Cache(path, groups)


# ----------------------------------------------------------------------------- writer

@dataclass
class ExportReport:
    group: str
    samples: int
    done: int
    failed: int
    pending: int
    bytes: int


def _filters(level: int) -> dict:
    gzip = {"shuffle": True, "compression": "gzip", "compression_opts": level} if level else {}
    return {**gzip, "fletcher32": True}


def _strings(h, name: str, lines: list[str], level: int):
    """Fixed-length UTF-8 strings (NUL-padded to the longest): unlike variable-length ones
    they live in the dataset's chunks, so they are compressed and checksummed too."""
    import h5py
    encoded = [line.encode("utf-8") for line in lines]
    kind = h5py.string_dtype("utf-8", length=max((len(b) for b in encoded), default=1) or 1)
    if not lines:  # a chunked dataset needs a non-empty chunk: an empty one is plain
        return h.create_dataset(name, shape=(0,), dtype=kind)
    return h.create_dataset(name, data=np.array(encoded, dtype=kind), chunks=(min(len(lines), KEYS_CHUNK),),
                            **_filters(level))


def _failure_lines(group) -> list[str]:
    log = group.path / "failures.jsonl"
    try:
        return log.read_text().splitlines() if log.exists() else []
    except OSError as e:
        raise CacheError(f"cannot read {log}: {e}") from None


def _export_group(f, group, level: int, progress: bool) -> ExportReport:
    keys = group.keys()
    n, P = len(keys), group.num_patches
    M = P * (P - 1) // 2
    status = np.asarray(group._status, dtype=np.uint8)  # the codes, one per key in the keys' order
    h = f.create_group(group.name)
    for name, value in group.metadata.items():
        h.attrs[name] = json.dumps(value, default=str)
    _strings(h, "keys", keys, level)
    if n:
        h.create_dataset("status", data=status, chunks=(min(n, KEYS_CHUNK),), **_filters(level))
    else:
        h.create_dataset("status", shape=(0,), dtype=np.uint8)
    arrays = {}
    for name, width, dtype in (("similarity", M, np.float16), ("attention", P, np.float32)):
        arrays[name] = h.create_dataset(name, shape=(n, width), dtype=dtype, fillvalue=np.nan,
                                        **({"chunks": (1, width), **_filters(level)} if n else {}))
    _strings(h, "failures.jsonl", _failure_lines(group), level)

    done = status == DONE
    bar = tqdm(total=int(done.sum()), desc=f"export {group.name}", unit="sample", disable=not progress,
               dynamic_ncols=True)
    for lo in range(0, n, BLOCK):
        rows = np.arange(lo, min(lo + BLOCK, n))[done[lo:lo + BLOCK]]
        if not len(rows):
            continue
        sims, attns = zip(*(group.native_packed(keys[r]) for r in rows))
        if len(rows) == rows[-1] - rows[0] + 1:  # contiguous: one write per array
            arrays["similarity"][rows[0]:rows[-1] + 1] = np.stack(sims)
            arrays["attention"][rows[0]:rows[-1] + 1] = np.stack(attns)
        else:  # rows not done stay unwritten: they read as the NaN fill
            for r, s, a in zip(rows, sims, attns):
                arrays["similarity"][r], arrays["attention"][r] = s, a
        bar.update(len(rows))
    bar.close()
    return ExportReport(group.name, n, int(done.sum()), int((status == FAILED).sum()),
                        int((status == PENDING).sum()), _storage_size(h))


def export_h5(cache, teachers, to, gzip_level: int = GZIP_LEVEL, progress: bool = True) -> list[ExportReport]:
    """Write the groups `teachers` (names or aliases) of the Zarr cache `cache` into the new
    HDF5 file `to`: written beside it under a temporary name, fsynced, then renamed, so
    `to` is either absent or complete."""
    import h5py
    from importlib.metadata import PackageNotFoundError, version
    to = Path(to).expanduser()
    if to.suffix.lower() not in H5_SUFFIXES:
        raise CacheError(f"--to {to}: name the file *.h5 or *.hdf5 (that is how --cache recognises it)")
    if to.exists():
        raise CacheError(f"{to} exists; an export never overwrites: delete it or choose another --to")
    if not 0 <= gzip_level <= 9:
        raise CacheError(f"gzip level must be 0 (no compression) .. 9, got {gzip_level}")
    source = open_cache(cache)
    if isinstance(source, H5Cache):
        raise CacheError(f"{source.path} is already a single-file cache; export from the cache folder it came from")
    groups = list({g.name: g for g in (source[t] for t in teachers)}.values())
    try:
        medalign = version("medalign")
    except PackageNotFoundError:
        medalign = "unknown (not installed)"
    tmp = to.with_name(f".{to.name}.{os.getpid()}.partial")
    reports = []
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs[ROOT_ATTR] = SCHEMA_VERSION
            f.attrs[EXPORT_ATTR] = json.dumps({"source": str(source.path), "versions": {
                "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version, "medalign": medalign}})
            for group in groups:
                reports.append(_export_group(f, group, gzip_level, progress))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, to)
    except OSError as e:
        raise CacheError(f"cannot write {to}: {e.strerror or _one_line(e)}; free space or choose another --to "
                         f"(nothing was left behind)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return reports


__all__ = ["ExportReport", "H5Cache", "H5Group", "H5Path", "export_h5", "is_h5_cache", "open_h5_cache"]
