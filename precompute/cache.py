"""The teacher-target cache: a Zarr v3 store, its writer, and THE reader.

    <cache>/zarr.json                 root group, attrs {"medalign_cache_schema": 1}
    <cache>/<group>/zarr.json         group attrs: the teacher's metadata + schema_version, shard_size, num_patches
    <cache>/<group>/keys              str [N]       sample keys (image paths relative to the image root)
    <cache>/<group>/status            uint8 [N]     0 pending, 1 done, 2 failed (the commit marker)
    <cache>/<group>/similarity        float16 [N, M] packed strict upper triangle, M = P(P-1)/2
    <cache>/<group>/attention         float32 [N, P] CLS attention at the native grid (not max-normalised)
    <cache>/<group>/failures.jsonl    {"key", "error"} per failed sample
    <cache>/<group>/build.lock        flock'd by the one build that may write the group

cache_schema.md is the full description (enough to read a cache with plain zarr + numpy).

Writes go through zarr-python (that is what makes the store a standard Zarr store).
Reads do not: zarr-python spends milliseconds per single-row read, so `_RowReader`
parses the shard index itself and reads a row with one pread + one blosc decode.

A cache is a local folder (a Path: locks, fsync, atomic renames, the pread fast path)
or an fsspec URL such as memory:// or s3:// (a `_Url`: the same few Path methods over
fsspec, range reads instead of pread, no locks; cache_schema.md, "Caches at URLs").
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from .targets import bilinear_matrix, resize_attention, resize_similarity, unpack_upper

SCHEMA_VERSION = 1
ROOT_ATTR = "medalign_cache_schema"
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
# Metadata that decides what the stored numbers are: two builds differing in any of
# these must never share a group. (seed matters only for random-init teachers.)
IDENTITY_FIELDS = ("teacher", "arch", "checkpoint_sha256", "preprocessing", "recipe", "num_patches",
                   "random_init", "seed")
# Measured on fp16 cosine matrices (cache_schema.md, "Codec choice"): byte shuffle + lz4hc
# level 1 stores ~1.4x smaller than raw, encodes faster than zstd-3 and decodes 4x faster
# (zstd's extra ~10% of size would cost reads the 0.15x-of-memmap budget).
BLOSC = {"cname": "lz4hc", "clevel": 1, "shuffle": "shuffle"}
# A read decodes one chunk (30-300 KB). numcodecs hands that to blosc's thread pool when
# called from a main thread, which makes an L/14-336 chunk decode ~2x slower, not faster
# (bench_cache_read.py); parallelism comes from DataLoader workers, where numcodecs never
# uses the pool, nor in zarr-python's decode threads. So blosc runs single-threaded
# (numcodecs' documented switch; it affects this process's main-thread blosc calls only).
numcodecs.blosc.use_threads = False
# Every chunk ends in the Zarr spec's crc32c of its encoded bytes (targets: the blosc
# frame; keys, status: theirs), so a flipped byte on disk is an error when read, by
# medalign and by any Zarr reader, never a target. Caches written before this have
# none and still read (cache_schema.md, "Checksums"); False only writes that old layout
# (tests and the bench compare the two).
CHUNK_CHECKSUMS = True
SHARD_TARGET_BYTES = 32 * 2**20  # one shard file ~ tens of MB: few files, cheap rewrites
KEYS_CHUNK = 65536
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_UINT64 = 2**64 - 1  # an index entry of a chunk never written


# On a URL cache (no locks) parts other than part 0 wait this long for part 0 to create
# or extend the group (see GroupWriter.open).
URL_PART_WAIT_S = 600.0
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What pathlib makes of a URL ("s3://b/x" -> "s3:/b/x"): never a folder anyone meant.
_MANGLED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")


class CacheError(RuntimeError):
    """Every user-facing cache problem; the message names the path or key and the fix."""


class CacheLockedError(CacheError):
    """Another build holds the group's lock."""


def packed_size(num_patches: int) -> int:
    return num_patches * (num_patches - 1) // 2


def default_shard_size(num_patches: int) -> int:
    """Samples per shard file: ~SHARD_TARGET_BYTES of raw targets, within [16, 512]."""
    per_sample = packed_size(num_patches) * 2 + num_patches * 4
    return int(min(512, max(16, SHARD_TARGET_BYTES // per_sample)))


def _json_normal(obj):
    # What zarr will store and give back: tuples become lists, Paths become strings.
    return json.loads(json.dumps(obj, default=str))


def _read_json(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"cannot read {path}: {e}") from e


def writer_versions() -> dict:
    """Versions of what wrote the store (group attribute `versions`, with the teacher's)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        medalign = version("medalign")
    except PackageNotFoundError:
        medalign = "unknown (not installed)"
    return {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__,
            "medalign": medalign}


# ----------------------------------------------------------------------------- where

class _Url:
    """The few pathlib.Path methods the cache uses, over an fsspec URL (memory://, s3://...).

    str() is the URL: what zarr-python opens (it makes an FsspecStore of it) and what
    messages show. Local folders never become a _Url (see cache_location)."""

    def __init__(self, fs, fspath: str):
        self.fs, self.fspath = fs, fspath.rstrip("/")

    def __truediv__(self, name: str) -> "_Url":
        return _Url(self.fs, f"{self.fspath}/{name}")

    def __str__(self):
        return self.fs.unstrip_protocol(self.fspath)

    def __repr__(self):
        return f"_Url({str(self)!r})"

    @property
    def name(self) -> str:
        return self.fspath.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "_Url":
        return _Url(self.fs, self.fspath.rsplit("/", 1)[0])

    def exists(self) -> bool:
        return self.fs.exists(self.fspath)

    def is_file(self) -> bool:
        return self.fs.isfile(self.fspath)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.fspath)

    def iterdir(self) -> Iterator["_Url"]:
        return (_Url(self.fs, p) for p in self.fs.ls(self.fspath, detail=False))

    def mkdir(self, parents: bool = False, exist_ok: bool = False):
        pass  # object stores have no folders: a prefix exists once a file is under it

    def read_text(self) -> str:
        return self.fs.cat_file(self.fspath).decode()

    def append_text(self, text: str):
        # Object stores cannot append: rewrite the (small) file whole.
        old = self.fs.cat_file(self.fspath) if self.fs.exists(self.fspath) else b""
        self.fs.pipe_file(self.fspath, old + text.encode())


def cache_location(path) -> "Path | _Url":
    """What --cache names: a local folder (Path; file:// URLs too) or another fsspec URL.

    A URL fsspec cannot open (unknown scheme, its package not installed) is refused here,
    before any work, and so is a URL that went through pathlib.Path: it would otherwise
    become a local folder named like the URL ("./s3:/bucket/x")."""
    if isinstance(path, _Url):
        return path
    text = os.fspath(path)
    if isinstance(path, Path) and _MANGLED_URL.match(text):
        meant = _MANGLED_URL.sub(lambda m: m[0] + "/", text)
        raise CacheError(f"cache path {text!r} looks like a URL that went through pathlib.Path (which folds "
                         f"'//' into '/'); pass the URL as a string, e.g. {meant!r}")
    if not _URL.match(text):
        return Path(text).expanduser()
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    try:
        fs, fspath = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as e:
        raise CacheError(f"cannot use cache URL {text!r}: {e}. --cache takes a local folder or an fsspec URL "
                         f"whose package is installed (tested: memory://, file://; see cache_schema.md, "
                         f"\"Caches at URLs\")") from None
    if isinstance(fs, LocalFileSystem):
        return Path(fspath)  # file://: the local folder, with its locks and the fast reader
    return _Url(fs, fspath)


def default_group_name(teacher: str) -> str:
    """The teacher's name, made a portable directory name ("open_clip:ViT-B-16" -> "open_clip--ViT-B-16");
    readers find the group by the teacher name too (it is in the metadata)."""
    return teacher.replace(":", "--").replace("/", "-")


def is_url(path) -> bool:
    """True for a --cache value that names a URL (scheme://...), not a local folder."""
    return isinstance(path, _Url) or (isinstance(path, str) and bool(_URL.match(path)))


def _is_local(path) -> bool:
    return isinstance(path, Path)


# ----------------------------------------------------------------------------- os errors

_IO_HINTS = {  # what to do; the error itself (strerror) is in the message already
    errno.ENOSPC: "free space or put --cache on another disk; finished shards are kept and rerunning the same "
                  "command resumes",
    errno.EDQUOT: "free space or put --cache elsewhere; finished shards are kept and rerunning the same command "
                  "resumes",
    errno.EACCES: "make it writable (and readable) for this user, or choose another --cache",
    errno.EPERM: "make it writable for this user, or choose another --cache",
    errno.EROFS: "choose another --cache",
}
# flock() on file systems mounted without lock support (Lustre without -o flock, some NFS)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _io_error(e: OSError, doing: str, path) -> CacheError:
    """One line naming the file, the error and what to do."""
    hint = _IO_HINTS.get(e.errno, "check the file system (and the cache's files), then rerun; finished rows "
                                  "are kept")
    return CacheError(f"cannot {doing} {e.filename or path}: {e.strerror or e}; {hint}")


@contextmanager
def _os_errors(doing: str, path):
    """OSError -> CacheError (`_io_error`)."""
    try:
        yield
    except CacheError:
        raise
    except OSError as e:
        raise _io_error(e, doing, path) from e


def _fsync(paths):
    """fsync files and folders (local only), so a commit that follows never vouches for
    bytes still in the page cache. Missing paths are skipped (an all-failed shard has
    no data file)."""
    for p in dict.fromkeys(paths):  # ordered, unique: a folder shared by files is synced once
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _with_parents(files, top: Path) -> list[Path]:
    """The files, then every folder from theirs up to `top`: a renamed-in file is only
    durable once the folder entries leading to it are."""
    out = list(files)
    for f in files:
        d = f.parent
        while True:
            out.append(d)
            if d == top or d == d.parent:
                break
            d = d.parent
    return out


# ----------------------------------------------------------------------------- lock

@contextmanager
def _flock(lock_path, what: str, shared: bool = False, blocking: bool = False):
    """flock on `lock_path`: exclusive (a whole build) or shared (one part of a build split
    into parts, which write disjoint shards); non-blocking unless asked. An exclusive
    holder writes its pid in the file for the message. A URL cache has no locks: this
    then does nothing (cache_schema.md, "Caches at URLs")."""
    if not _is_local(lock_path):
        yield
        return
    with _os_errors("open the lock file", lock_path):
        f = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise CacheLockedError(
                f"another build is writing {what} (pid {holder}, lock {lock_path}); wait for it to finish, "
                f"or stop it (its finished rows are kept) and rerun") from None
        except OSError as e:
            if e.errno in _NO_LOCKS:
                raise CacheError(
                    f"the file system holding {lock_path} does not support file locks (flock: {e.strerror}), "
                    f"which keep two builds from writing one group; mount it with locking (Lustre: -o flock; "
                    f"NFS: with a lock manager), or build on a local disk and copy the finished cache") from None
            raise _io_error(e, "lock", lock_path) from e
        if not shared:
            with _os_errors("write the lock file", lock_path):
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
        try:
            yield
        finally:
            if not shared:
                with contextlib.suppress(OSError):  # a full disk must not hide the real error
                    f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


# ----------------------------------------------------------------------------- writer

_SHARDED = ("similarity", "attention", "status")


def _shard_of(parts: tuple[str, ...]) -> int | None:
    """The shard a file under a group folder belongs to, from its path parts:
    similarity|attention/c/<s>/0 and status/c/<s> (status has one chunk per shard), and
    their temp files (<name>.<hex>.partial). None for keys and metadata files."""
    if len(parts) >= 3 and parts[0] in _SHARDED and parts[1] == "c":
        head = parts[2].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def _remove_partials(gpath, owned) -> int:
    """Delete the temp files (*.partial) zarr's LocalStore leaves when killed mid-write,
    those whose owner (`_shard_of`: a shard number, or None) `owned` accepts. The caller
    holds the lock that excludes every live writer of those files. URL stores write no
    temp files (an object PUT is atomic)."""
    if not _is_local(gpath):
        return 0
    gone = 0
    for p in gpath.rglob("*.partial"):
        if owned(_shard_of(p.relative_to(gpath).parts)):
            p.unlink(missing_ok=True)
            gone += 1
    return gone


def _create_arrays(gpath, n: int, num_patches: int, shard_size: int):
    M, P = packed_size(num_patches), num_patches
    crc = [Crc32cCodec()] if CHUNK_CHECKSUMS else []
    # One chunk per sample (the unit a reader fetches), many chunks per shard file
    # (the unit the file system sees). NaN fill: a row never written reads as NaN.
    for name, width, dtype in (("similarity", M, "float16"), ("attention", P, "float32")):
        zarr.create_array(store=str(gpath / name), shape=(n, width), chunks=(1, width),
                          shards=(shard_size, width), dtype=dtype, fill_value=np.nan,
                          serializer=BytesCodec(endian="little"), compressors=[BloscCodec(**BLOSC), *crc],
                          overwrite=True)
    # status is 1 byte a sample: plain chunks, one per shard, so committing a shard's
    # rows rewrites exactly one small file.
    zarr.create_array(store=str(gpath / "status"), shape=(n,), chunks=(shard_size,), dtype="uint8",
                      fill_value=PENDING, compressors=crc or None, overwrite=True)
    # A fixed chunk whatever the first build's size: appends then add rows to the last
    # chunk instead of one file per few keys. (zstd is zarr's default for strings.)
    zarr.create_array(store=str(gpath / "keys"), shape=(n,), chunks=(KEYS_CHUNK,), dtype=str,
                      compressors=[ZstdCodec(), *crc], overwrite=True)


def _write_keys(keys, lo: int, names: list[str]):
    """keys[lo:lo+len(names)] = names, one chunk at a time in ascending order. A crash
    then leaves a prefix of `names` stored and only empty keys after it (see
    `_committed_keys`); zarr writes the chunks of one slice in any order."""
    chunk = keys.chunks[0]  # groups created before KEYS_CHUNK was fixed may have another
    start, hi = lo, lo + len(names)
    while start < hi:
        end = min(hi, (start // chunk + 1) * chunk)
        keys[start:end] = np.array(names[start - lo:end - lo], dtype=object)
        start = end


def _read_whole(apath) -> np.ndarray:
    """A 1-D unsharded array (keys, status) read whole. A chunk that cannot be decoded
    (emptied, damaged, failing its checksum) is a CacheError naming its file."""
    arr = zarr.open_array(str(apath), mode="r")
    try:
        return arr[:]
    except (ValueError, RuntimeError) as e:  # zarr: crc32c mismatch; numcodecs: zstd/blosc errors
        n, first = arr.chunks[0], e
        for i in range(math.ceil(arr.shape[0] / n)):  # which chunk: the error does not say
            try:
                arr[i * n:(i + 1) * n]
            except (ValueError, RuntimeError) as e_chunk:
                apath, first = apath / "c" / str(i), e_chunk
                break
        why = "it fails its checksum (crc32c)" if "checksum" in str(first) else first
        raise CacheError(f"{apath} cannot be decoded ({why})") from None


def _committed_keys(gpath) -> list[str]:
    """The group's keys: `keys` up to its first empty entry.

    Keys are never empty, so an empty one is a row an interrupted append made (keys are
    resized, then named) but never named: it and every row after it are unused, and the
    next append reuses them. The other arrays may be longer still; keys decide."""
    keys = _read_whole(gpath / "keys").tolist()
    try:
        return keys[:keys.index("")]
    except ValueError:
        return keys


def _sync_metadata(gpath):
    """fsync what creating or extending a group writes besides data: the zarr.json files
    and the keys chunks, and the folders leading to them (local caches only)."""
    if not _is_local(gpath):
        return
    files = [gpath.parent / "zarr.json", gpath / "zarr.json", *gpath.glob("*/zarr.json"),
             *(p for p in (gpath / "keys").rglob("*") if p.is_file())]
    _fsync(_with_parents(files, gpath.parent))


def _sync_group_json(gpath):
    """fsync the group's own zarr.json (and its folders): all an attribute update writes."""
    if _is_local(gpath):
        _fsync(_with_parents([gpath / "zarr.json"], gpath.parent))


def _open_root(cache_path) -> None:
    """Create the root group, or check that an existing one is a medalign cache."""
    meta = cache_path / "zarr.json"
    if meta.exists():
        _check_root(cache_path)
        return
    if cache_path.exists() and (not cache_path.is_dir() or any(cache_path.iterdir())):
        raise CacheError(f"{cache_path} exists and is not a medalign cache; choose a new or empty folder "
                         f"for --cache")
    cache_path.mkdir(parents=True, exist_ok=True)
    zarr.create_group(store=str(cache_path), attributes={ROOT_ATTR: SCHEMA_VERSION}, overwrite=False)


def _existing_attrs(gpath, metadata: dict, num_patches: int, shard_size: int | None) -> dict:
    """The attributes of an existing group, checked against the build about to write it."""
    attrs = _read_json(gpath / "zarr.json").get("attributes", {})
    _check_group_schema(gpath, attrs)
    _check_identity(gpath, attrs, {**metadata, "num_patches": num_patches})
    if shard_size is not None and shard_size != attrs["shard_size"]:
        raise CacheError(f"cache group {gpath} was created with shard size {attrs['shard_size']}; "
                         f"rerun with --shard-size {attrs['shard_size']} or without --shard-size")
    return attrs


def _create_group(gpath, keys: list[str], attrs: dict, num_patches: int, shard_size: int | None):
    shard_size = default_shard_size(num_patches) if shard_size is None else int(shard_size)
    if shard_size < 1:
        raise CacheError(f"shard size must be positive, got {shard_size}")
    # Arrays first, group zarr.json last: the group only exists once complete, so a
    # crash here just means the next run creates it again.
    _create_arrays(gpath, len(keys), num_patches, shard_size)
    _write_keys(zarr.open_array(str(gpath / "keys"), mode="r+"), 0, keys)
    _sync_metadata(gpath)
    attrs = {**attrs, "versions": {**attrs.get("versions", {}), **writer_versions()},
             "schema_version": SCHEMA_VERSION, "shard_size": shard_size, "num_patches": num_patches}
    zarr.create_group(store=str(gpath), attributes=attrs, overwrite=False)
    _sync_group_json(gpath)


def _append(gpath, n_old: int, new: list[str]):
    """Rows n_old.. for the `new` keys, pending. The keys are written last and in order,
    so a crash anywhere leaves the group as it was plus (maybe) a prefix of the new keys,
    all pending; `_committed_keys` ignores the rest and the next run appends it again."""
    n = n_old + len(new)
    for name in ("similarity", "attention"):
        arr = zarr.open_array(str(gpath / name), mode="r+")
        arr.resize((n, arr.shape[1]))
    status = zarr.open_array(str(gpath / "status"), mode="r+")
    status.resize((n,))
    status[n_old:n] = PENDING
    keys = zarr.open_array(str(gpath / "keys"), mode="r+")
    keys.resize((n,))
    _write_keys(keys, n_old, new)
    _sync_metadata(gpath)


def _wait_for_part_zero(gpath, keys: list[str], metadata: dict, num_patches: int, shard_size: int | None,
                        part: tuple[int, int]) -> list[str]:
    """On a URL cache there is no lock to decide which of several parts starting together
    creates (or extends) the group, so part 0 does and the others wait for it: until the
    group exists and holds all of their keys."""
    deadline = time.monotonic() + URL_PART_WAIT_S
    while True:
        if (gpath / "zarr.json").exists():
            _check_root(gpath.parent)
            _existing_attrs(gpath, metadata, num_patches, shard_size)
            all_keys = _committed_keys(gpath)
            if not set(keys).difference(all_keys):
                return all_keys
        if time.monotonic() >= deadline:
            raise CacheError(
                f"part {part[0]}/{part[1]} waited {URL_PART_WAIT_S:.0f} s for part 0 to create or extend group "
                f"{gpath}: on a URL cache (no locks) only part 0 does that; start part 0 with the same command")
        time.sleep(min(1.0, URL_PART_WAIT_S / 10))


class GroupWriter:
    """Creates or extends one teacher group and writes rows into it (used by build.py).

    Call `write_rows` and `clean_partials` inside `with writer.lock():`.
    """

    def __init__(self, cache_path, group: str, keys: list[str], requested: np.ndarray, last_build: dict):
        self.cache_path, self.group = cache_path, group
        self.path = cache_path / group
        attrs = _read_json(self.path / "zarr.json")["attributes"]
        self.metadata = attrs
        self.num_patches, self.shard_size = int(attrs["num_patches"]), int(attrs["shard_size"])
        self.keys = keys
        self.num_shards = math.ceil(len(keys) / self.shard_size)
        self._requested = requested
        self._status = zarr.open_array(str(self.path / "status"), mode="r+")
        self._similarity = zarr.open_array(str(self.path / "similarity"), mode="r+")
        self._attention = zarr.open_array(str(self.path / "attention"), mode="r+")
        self._last_build = last_build
        self._locked, self._part = False, None

    @classmethod
    def open(cls, cache_path, group: str, keys: Sequence[str], num_patches: int, metadata: dict,
             shard_size: int | None = None, *, part: tuple[int, int] | None = None,
             image_root: str | None = None) -> "GroupWriter":
        """Create `group` for `keys`, or extend an existing group built by the same teacher.

        Existing keys keep their row and their results; new keys are appended as pending.
        image_root: the build's image folder, stored as the group's `image_root` once the
        writer holds its lock (not an identity field: the last build's; `verify` defaults
        to it).
        part: the (i, n) this writer will lock; on a URL cache only part 0 creates or
        extends the group and the others wait for it (`_wait_for_part_zero`).
        """
        cache_path = cache_location(cache_path)
        keys = list(keys)
        if not GROUP_NAME.match(group or ""):
            raise CacheError(f"group name {group!r} is not usable as a folder name in {cache_path}; "
                             f"use letters, digits, '.', '_' and '-' (e.g. --group unimed-b16)")
        bad = [k for k in keys if not isinstance(k, str) or not k]
        if bad:
            raise CacheError(f"cache keys must be non-empty strings, got {bad[:3]!r}")
        repeated = sorted(k for k, c in Counter(keys).items() if c > 1)
        if repeated:
            raise CacheError(f"cache keys repeat ({repeated[:5]}): each image must appear once; deduplicate them")
        metadata = _json_normal(metadata)
        if metadata.get("num_patches", num_patches) != num_patches:
            raise CacheError(f"metadata says {metadata['num_patches']} patches but num_patches={num_patches}")
        if math.isqrt(num_patches) ** 2 != num_patches or num_patches < 2:
            raise CacheError(f"num_patches={num_patches} is not a square patch grid")
        last_build = {} if image_root is None else {"image_root": str(image_root)}

        gpath = cache_path / group
        with _os_errors("create or open cache group", gpath):
            if not _is_local(gpath) and part is not None and part[0] != 0:
                # part 0 creates the root too: two creators of one object would race
                all_keys = _wait_for_part_zero(gpath, keys, metadata, num_patches, shard_size, part)
            else:
                _open_root(cache_path)
                gpath.mkdir(exist_ok=True)
                # Deciding "create or append" happens under a short blocking lock, so builds
                # (or the parts of one build) starting together cannot both create the
                # group; the parts of one build then find it created, with the same keys.
                with _flock(gpath / "create.lock", f"group {group!r} of cache {cache_path}", blocking=True):
                    all_keys = cls._create_or_extend(gpath, keys, {**metadata, **last_build}, num_patches,
                                                     shard_size)
        index = {k: i for i, k in enumerate(all_keys)}
        return cls(cache_path, group, all_keys, np.array([index[k] for k in keys], dtype=np.int64), last_build)

    @staticmethod
    def _create_or_extend(gpath, keys: list[str], metadata: dict, num_patches: int,
                          shard_size: int | None) -> list[str]:
        """Under create.lock: every writer of keys and metadata holds it, so their temp
        files are garbage here."""
        _remove_partials(gpath, lambda shard: shard is None)
        if not (gpath / "zarr.json").exists():
            _create_group(gpath, keys, metadata, num_patches, shard_size)
            return keys
        _existing_attrs(gpath, metadata, num_patches, shard_size)
        old = _committed_keys(gpath)
        known = set(old)
        new = [k for k in keys if k not in known]
        if new:  # resizing must not race a running build's writes
            with _flock(gpath / "build.lock", f"group {gpath.name!r} of cache {gpath.parent}"):
                _append(gpath, len(old), new)
        return old + new

    @contextmanager
    def lock(self, part: tuple[int, int] | None = None):
        """Hold the group's build lock (non-blocking; CacheLockedError if another build has it).

        part=(i, n): one of n parts of a build that write disjoint shards (shard % n == i):
        parts share the group lock with each other, never with a whole build, and each
        part holds its own lock exclusively. A URL cache has no locks (cache_schema.md)."""
        what = f"group {self.group!r} of cache {self.cache_path}"
        with contextlib.ExitStack() as stack:
            stack.enter_context(_flock(self.path / "build.lock", what, shared=part is not None))
            if part is not None:
                i, n = part
                stack.enter_context(_flock(self.path / f"build.part-{i}-of-{n}.lock", f"part {i}/{n} of {what}"))
            self._locked, self._part = True, part
            try:
                self._record_last_build()
                yield self
            finally:
                self._locked, self._part = False, None

    def _record_last_build(self):
        """Store this build's `image_root` (if it changed) now that it may write the group:
        under create.lock, like every metadata write; at a URL (no locks) only part 0 or a
        whole build writes it."""
        changed = {k: v for k, v in self._last_build.items() if self.metadata.get(k) != v}
        if not changed or (not _is_local(self.path) and self._part is not None and self._part[0] != 0):
            return
        with _os_errors("update the attributes of cache group", self.path), \
                _flock(self.path / "create.lock", f"group {self.group!r} of cache {self.cache_path}", blocking=True):
            zarr.open_group(str(self.path), mode="r+").attrs.update(changed)
            _sync_group_json(self.path)
        self.metadata.update(changed)

    def _require_lock(self, what: str):
        if not self._locked:
            raise CacheError(f"{what} needs the group's lock: call it inside `with writer.lock():`")

    def pending_rows(self, retry_failed: bool = False) -> np.ndarray:
        """Sorted rows of the keys this writer was opened with that still need computing
        (status pending; also failed ones with retry_failed). Resume = compute only these."""
        status = self._status[:][self._requested]
        todo = (status == PENDING) | ((status == FAILED) if retry_failed else False)
        return np.sort(self._requested[todo])

    def write_rows(self, rows: np.ndarray, similarity_packed: np.ndarray, attention: np.ndarray,
                   failures: dict[int, str]):
        """Store targets for sorted `rows` of ONE shard; rows in `failures` are stored as failed.

        Targets first, then status: status is the commit marker, so a crash in between
        leaves the rows pending (recomputed next run), never done-with-garbage. On a local
        cache the targets are fsynced before the commit, so this holds across power loss.
        """
        self._require_lock("write_rows")
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        sim, attn, status = self._checked(rows, similarity_packed, attention, failures)
        with _os_errors("write cache group", self.path):
            self._write_targets(rows, sim, attn)
            if failures:
                _append_text(self.path / "failures.jsonl", "".join(
                    json.dumps({"key": self.keys[row], "error": str(failures[row])}) + "\n"
                    for row in sorted(failures)))
            self._make_durable(int(rows[0]) // self.shard_size, bool(failures))
            self._commit(rows, status)

    def _checked(self, rows: np.ndarray, sim: np.ndarray, attn: np.ndarray, failures: dict[int, str]):
        """Validate one shard's rows; -> (similarity, attention, status) to store."""
        n, M, P = len(rows), packed_size(self.num_patches), self.num_patches
        if rows.ndim != 1 or (np.diff(rows) <= 0).any() or rows[0] < 0 or rows[-1] >= len(self.keys):
            raise CacheError(f"rows must be sorted, unique and in [0, {len(self.keys)}), got {rows[:8]}...")
        if rows[0] // self.shard_size != rows[-1] // self.shard_size:
            raise CacheError(f"rows {rows[0]}..{rows[-1]} span several shards of {self.shard_size}; "
                             f"write one shard at a time")
        for name, arr, shape, dtype in (("similarity_packed", sim, (n, M), np.float16),
                                        ("attention", attn, (n, P), np.float32)):
            if arr.shape != shape or arr.dtype != dtype:
                raise CacheError(f"{name} must be {np.dtype(dtype)} {shape}, got {arr.dtype} {arr.shape}")
        unknown = set(failures) - set(rows.tolist())
        if unknown:
            raise CacheError(f"failures name rows {sorted(unknown)[:5]} that are not being written")

        failed = np.isin(rows, list(failures))
        good = np.isfinite(sim).all(1) & np.isfinite(attn).all(1) & (attn.max(1) > 0)
        broken = np.flatnonzero(~failed & ~good)
        if len(broken):
            key = self.keys[rows[broken[0]]]
            raise CacheError(f"targets for {key!r} contain NaN/inf or an all-zero attention map, so they cannot "
                             f"be stored as done: check the teacher run (overflow in low precision?) or record "
                             f"the sample as failed")
        sim, attn = sim.copy(), attn.copy()
        sim[failed], attn[failed] = np.nan, np.nan
        return sim, attn, np.where(failed, FAILED, DONE).astype(np.uint8)

    def _write_targets(self, rows: np.ndarray, sim: np.ndarray, attn: np.ndarray):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):  # contiguous: plain slice writes
            self._similarity[lo:hi] = sim
            self._attention[lo:hi] = attn
            return
        # zarr 3.1 cannot write an integer selection into a sharded array, so merge into
        # the row range's current contents and write that back: still one shard rewrite
        # (the shard's chunks outside lo:hi keep their encoded bytes).
        for arr, values in ((self._similarity, sim), (self._attention, attn)):
            block = arr[lo:hi]
            block[rows - lo] = values
            arr[lo:hi] = block

    def _make_durable(self, shard: int, failures: bool):
        """fsync the shard's data files (and failures.jsonl), with the folders leading to
        them, before `_commit` says "done": otherwise a power loss could keep the status
        chunk but lose the data it vouches for. URL stores: a finished PUT is durable."""
        if not _is_local(self.path):
            return
        files = [self.path / name / "c" / str(shard) / "0" for name in ("similarity", "attention")]
        if failures:
            files.append(self.path / "failures.jsonl")
        _fsync(_with_parents(files, self.path))

    def _commit(self, rows: np.ndarray, status: np.ndarray):
        """Write the rows' status: the commit marker (one chunk file per shard)."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        current = self._status[lo:hi]
        current[rows - lo] = status
        self._status[lo:hi] = current

    def clean_partials(self) -> int:
        """Delete temp files (*.partial) a killed writer left behind; returns how many.

        Under the lock, so no live writer's temp file can be among them: a whole build
        deletes all, part i/n those of its own shards (the other parts may be writing
        theirs right now). Those of keys and metadata go when a group is opened."""
        self._require_lock("clean_partials")
        with _os_errors("clean temp files of cache group", self.path):
            if self._part is None:
                return _remove_partials(self.path, lambda shard: True)
            i, n = self._part
            return _remove_partials(self.path, lambda shard: shard is not None and shard % n == i)


def _append_text(path, text: str):
    if _is_local(path):
        with open(path, "a") as f:
            f.write(text)
    else:
        path.append_text(text)


def _check_identity(gpath: Path, stored: dict, metadata: dict):
    for field in IDENTITY_FIELDS:
        if stored.get(field) != metadata.get(field):
            raise CacheError(
                f"cache group {gpath} holds targets of a different teacher: {field!r} is "
                f"{stored.get(field)!r} there, {metadata.get(field)!r} now. Targets of different teachers "
                f"must not mix; use another group name (--group {gpath.name}-2) or another --cache")


def _check_group_schema(gpath: Path, attrs: dict):
    version = attrs.get("schema_version")
    if not isinstance(version, int):
        raise CacheError(f"{gpath} is not a medalign cache group (no schema_version)")
    if version > SCHEMA_VERSION:
        raise CacheError(f"cache group {gpath} has schema {version}, newer than this medalign "
                         f"understands ({SCHEMA_VERSION}); upgrade medalign")


def _check_root(path: Path) -> dict:
    meta = _read_json(path / "zarr.json")
    version = meta.get("attributes", {}).get(ROOT_ATTR)
    if meta.get("node_type") != "group" or not isinstance(version, int):
        raise CacheError(f"{path} is a Zarr store but not a medalign cache (no {ROOT_ATTR!r} attribute)")
    if version > SCHEMA_VERSION:
        raise CacheError(f"cache {path} has schema {version}, newer than this medalign understands "
                         f"({SCHEMA_VERSION}); upgrade medalign")
    return meta


# ----------------------------------------------------------------------------- reader

_warned: set[str] = set()


def chunk_codecs(meta: dict) -> list[str]:
    """Names of the codecs each chunk of an array goes through (inside the shards of a
    sharded one), from its zarr.json: whether "crc32c" checks every chunk."""
    try:
        codecs = meta["codecs"]
        if codecs and codecs[0]["name"] == "sharding_indexed":
            codecs = codecs[0]["configuration"]["codecs"]
        return [c["name"] for c in codecs]
    except (KeyError, TypeError, IndexError):
        return []


# The CRC-32C of any bytes followed by their own CRC-32C (little endian) is this constant,
# so a chunk is checked with one pass over the bytes as read, without slicing off its
# 4-byte checksum (a copy). (A property of CRCs with a final XOR; tests check it.)
CRC32C_RESIDUE = 0x48674BC7


class _RowReader:
    """Row i of a 2-D array laid out as GroupWriter writes it (chunks (1, W) in shards
    (S, W), codecs bytes(little) + blosc + crc32c), read without zarr-python.

    A shard file holds its chunks followed by the index: S (offset, nbytes) uint64 pairs
    and a crc32c of them. The index is read once per shard file version; then a row is
    one os.pread + one checksum + one blosc decode. Arrays written before chunk checksums
    (no crc32c codec) read the same, unchecked (`checksummed` False). File descriptors
    are per process (reopened after a fork: DataLoader workers) and at most MAX_OPEN
    stay open.

    At a URL the same happens with fsspec range reads: an "open" shard is its fsspec
    path, checked (size, version) when opened, and a row is one `cat_file(start, end)`.
    """

    MAX_OPEN = 64

    def __init__(self, path):
        self.path = path
        self.local = _is_local(path)
        meta = _read_json(path / "zarr.json")
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.width = int(meta["shape"][1])
        self.checksummed = "crc32c" in chunk_codecs(meta)  # read through zarr, zarr checks it
        self.fast = self._layout(meta)
        if not self.fast:
            if str(path) not in _warned:
                _warned.add(str(path))
                warnings.warn(f"{path}: codecs are not the ones medalign writes; reading through "
                              f"zarr-python (correct, ~100x slower)", stacklevel=3)
            self._zarr = zarr.open_array(str(path), mode="r")
        self._indexes: dict[int, tuple[tuple, list]] = {}
        self._reset()

    def _layout(self, meta: dict) -> bool:
        try:
            (shard,) = meta["codecs"]
            cfg = shard["configuration"]
            inner = [c["name"] for c in cfg["codecs"]]
            ok = (shard["name"] == "sharding_indexed" and inner in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"])
                  and cfg["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                  and cfg["chunk_shape"] == [1, self.width]
                  and [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
                  and cfg["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                  and cfg.get("index_location", "end") == "end"
                  and meta["chunk_key_encoding"]["name"] == "default"
                  and meta["chunk_grid"]["configuration"]["chunk_shape"][1] == self.width)
        except (KeyError, TypeError, ValueError):
            return False
        if ok:
            self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
            self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        return ok

    def _reset(self):
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._mutex = threading.Lock()

    def __getstate__(self):  # pickled into spawn-started DataLoader workers: no fds, no lock
        state = self.__dict__.copy()
        for name in ("_fds", "_mutex", "_pid", "_zarr"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if not self.fast:
            self._zarr = zarr.open_array(str(self.path), mode="r")
        self._reset()

    def close(self):
        # In a forked child these are its own copies of the parent's fds: closing them
        # is safe and leaves the parent's untouched. (URL handles are mere paths.)
        if self.local:
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()

    def __del__(self):
        if "_fds" in self.__dict__:  # __init__ may have failed before _reset
            self.close()

    def _shard_file(self, shard: int):
        return self.path / f"c{self.sep}{shard}{self.sep}0"

    def _fd(self, shard: int) -> tuple:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd, self._indexes[shard][1]
        fd, size, version = self._open(shard)
        try:
            cached = self._indexes.get(shard)
            if cached is None or cached[0] != version:  # a build may have rewritten the shard
                self._indexes[shard] = (version, self._read_index(fd, size, shard))
        except BaseException:
            self._close(fd)
            raise
        self._fds[shard] = fd
        if len(self._fds) > self.MAX_OPEN:
            self._close(self._fds.popitem(last=False)[1])
        return fd, self._indexes[shard][1]

    def _open(self, shard: int) -> tuple:
        """-> (handle, size, version) of a shard file: an fd, or an fsspec path at a URL."""
        if self.local:
            fd = os.open(self._shard_file(shard), os.O_RDONLY)
            st = os.fstat(fd)
            return fd, st.st_size, (st.st_ino, st.st_size, st.st_mtime_ns)
        url = self._shard_file(shard)
        info = url.fs.info(url.fspath)
        # Whatever the store reports that changes with a rewrite (S3: ETag; memory: created).
        version = (info["size"], *(str(info.get(k)) for k in ("ETag", "etag", "mtime", "LastModified", "created")))
        return url.fspath, int(info["size"]), version

    def _close(self, fd):
        if self.local:
            os.close(fd)

    def _pread(self, fd, nbytes: int, offset: int) -> bytes:
        if self.local:
            return os.pread(fd, nbytes, offset)
        return self.path.fs.cat_file(fd, start=offset, end=offset + nbytes)

    def _read_index(self, fd, size: int, shard: int) -> list[list[int]]:
        nbytes = self.shard_rows * 16 + 4
        raw = self._pread(fd, nbytes, size - nbytes) if size >= nbytes else b""
        if len(raw) != nbytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise CacheError(f"shard file {self._shard_file(shard)} is truncated or corrupt (bad index); "
                             f"rebuild this cache group")
        # Python ints: a row's lookup is then two list indexings, no numpy scalars
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(self.shard_rows, 2).tolist()

    def _damaged(self, key: str, row: int, shard: int | None, what: str) -> CacheError:
        """One line naming cache, group, key and file, and the fix."""
        group = self.path.parent
        where = self._shard_file(shard) if shard is not None else self.path
        return CacheError(f"cache {group.parent}, group {group.name!r}: the stored {self.path.name} of {key!r} "
                          f"(row {row}) in {where} {what}; the file was damaged or altered on disk: rebuild the "
                          f"group (delete {group} and rerun the `medalign-cache build` that made it)")

    def read(self, row: int, key: str) -> np.ndarray:
        if not self.fast:
            try:  # zarr checks the crc32c codec, if the array has one
                return np.asarray(self._zarr[row])
            except (ValueError, RuntimeError) as e:
                raise self._damaged(key, row, None, f"cannot be decoded ({type(e).__name__}: {e})") from None
        if self._pid != os.getpid():  # forked: start afresh (a parent thread may have held the lock)
            self.close()
            self._reset()
        shard, local = divmod(row, self.shard_rows)
        try:
            with self._mutex:  # an fd may not be closed by eviction while another thread reads it
                fd, index = self._fd(shard)
                offset, nbytes = index[local]
                if offset == MAX_UINT64:
                    raise self._damaged(key, row, shard, "is not there (its status says done, the shard's index "
                                                         "has no entry)")
                buf = self._pread(fd, nbytes, offset)
        except FileNotFoundError:
            raise self._damaged(key, row, shard, "is missing (no such file)") from None
        out = np.empty(self.width, dtype=self.dtype)
        if len(buf) != nbytes:
            raise self._damaged(key, row, shard, f"is truncated ({len(buf)} of {nbytes} bytes)")
        if self.checksummed:
            if google_crc32c.value(buf) != CRC32C_RESIDUE:
                raise self._damaged(key, row, shard, "fails its checksum (crc32c)")
            buf = memoryview(buf)[:-4]  # the blosc frame, without a copy
        # The blosc header's bytes 4..8 hold the decoded size; check it, since decoding
        # into a larger buffer would silently leave garbage at the end.
        if len(buf) < 16 or int.from_bytes(buf[4:8], "little") != out.nbytes:
            raise self._damaged(key, row, shard, "is corrupt (bad blosc header)")
        try:
            numcodecs.blosc.decompress(buf, out)
        except RuntimeError as e:  # "error during blosc decompression: -1"
            raise self._damaged(key, row, shard, f"is corrupt ({e})") from None
        return out


class TeacherGroup:
    """One teacher's targets. Keys and status are a snapshot taken when the group is
    opened: rows a running build finishes later need a fresh open_cache()."""

    def __init__(self, cache_path, name: str, metadata: dict):
        self.name, self.cache_path, self.path = name, cache_path, cache_path / name
        self.metadata = metadata
        self.num_patches = int(metadata["num_patches"])
        self.native_grid = math.isqrt(self.num_patches)
        self.shard_size = int(metadata["shard_size"])
        fix = "rebuild it: delete that folder and rerun the `medalign-cache build` that made it"
        try:
            self._keys = _committed_keys(self.path)
            self._rows = {k: i for i, k in enumerate(self._keys)}
            status = _read_whole(self.path / "status")
            self._similarity = _RowReader(self.path / "similarity")
            self._attention = _RowReader(self.path / "attention")
        except CacheError as e:
            raise CacheError(f"cache group {self.path} is damaged: {e}; {fix}") from e
        except (OSError, ValueError, RuntimeError) as e:  # zarr's "no array here" is a FileNotFoundError
            raise CacheError(f"cache group {self.path} is damaged ({type(e).__name__}: {e}); {fix}") from e
        n = len(self._keys)
        if len(status) < n:
            raise CacheError(f"cache group {self.path} is damaged (status has {len(status)} rows for {n} keys); {fix}")
        # Rows past the keys are unused (an interrupted append leaves them pending), so a
        # result there means keys lost entries: a keys chunk deleted or emptied.
        orphans = np.flatnonzero(status[n:] != PENDING)
        if len(orphans):
            raise CacheError(f"cache group {self.path} is damaged: {len(orphans)} rows from row {n + orphans[0]} on "
                             f"hold results but have no key (files of {self.path / 'keys'} deleted or emptied?); "
                             f"{fix}")
        self._status = status[:n]  # arrays may be longer than keys after an interrupted append: keys decide

    def __repr__(self):
        return f"TeacherGroup({self.name!r}, {len(self)} samples, grid {self.native_grid}, {self.path})"

    def keys(self) -> list[str]:
        return list(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._rows

    def index(self, key: str) -> int:
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in cache group {self.name!r} ({self.path}); {self._absent_fix()}") from None

    def _absent_fix(self) -> str:
        """How to get a key the group lacks into it (the end of index's error)."""
        return (f"add it with `medalign-cache build --teacher {self.metadata.get('teacher', self.name)} --group "
                f"{self.name} --data <dataset naming it> --image-root <its image folder> --cache {self.cache_path}`")

    def status(self, key: str) -> str:
        return STATUS_NAMES[int(self._status[self.index(key)])]

    def missing(self, keys) -> list[str]:
        """Keys that are absent or not done (pending/failed): what training cannot use."""
        return [k for k in keys if k not in self._rows or self._status[self._rows[k]] != DONE]

    def _done_row(self, key: str) -> int:
        row = self.index(key)
        state = int(self._status[row])
        if state == DONE:
            return row
        raise CacheError(f"{key!r} in cache group {self.name!r} ({self.path}) is {STATUS_NAMES[state]}, it has "
                         f"no targets: {self._not_done_fix(state)}")

    def _not_done_fix(self, state: int) -> str:
        """How to get targets for a key that is pending or failed (the end of _done_row's error)."""
        if state == FAILED:
            return "its image failed to load or compute (see failures.jsonl there); fix the image and rebuild"
        return "rerun the same `medalign-cache build` command to compute it"

    def native_packed(self, key: str, similarity: bool = True, attention: bool = True
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(packed fp16 similarity [M], fp32 attention [P]) as stored: the fast path for
        DataLoader workers. An array not asked for is neither read nor decoded (None)."""
        row = self._done_row(key)
        return (self._similarity.read(row, key) if similarity else None,
                self._attention.read(row, key) if attention else None)

    def native(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(S [P, P], attention [P]) at the teacher's grid, float32."""
        sim, attn = self.native_packed(key)
        return unpack_upper(torch.from_numpy(sim).float(), self.num_patches), torch.from_numpy(attn)

    def targets(self, key: str, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """docs/method.md's (S_t [G*G, G*G], a_t [G*G]) for a student with a grid x grid token map."""
        R = bilinear_matrix(self.native_grid, grid)  # first: it validates grid
        sim, attn = self.native(key)
        # On the native grid R = I and the resize returns S unchanged: skip the matmuls.
        sim_t = sim if grid == self.native_grid else resize_similarity(sim, R)
        return sim_t, resize_attention(attn, R)

    def structure_problems(self) -> list[str]:
        """What is wrong with the target arrays against the keys and metadata (for verify):
        shapes that do not fit the keys and patch count, shards of another size."""
        P, n, problems = self.num_patches, len(self._keys), []
        for name, width in (("similarity", P * (P - 1) // 2), ("attention", P)):
            try:
                arr = zarr.open_array(str(self.path / name), mode="r")
            except (OSError, ValueError) as e:
                problems.append(f"{self.path / name}: cannot open ({type(e).__name__}: {e})")
                continue
            if arr.ndim != 2 or arr.shape[0] < n or arr.shape[1] != width:
                problems.append(f"{self.path / name} has shape {arr.shape}, expected ({n}+, {width}) "
                                f"for {n} keys and {P} patches")
            elif arr.shards is not None and arr.shards[0] != self.shard_size:
                problems.append(f"{self.path / name} has shards of {arr.shards[0]} rows, the metadata says "
                                f"{self.shard_size}")
        return problems

    @property
    def unchecked_arrays(self) -> list[str]:
        """The target arrays whose chunks carry no checksum (written before medalign added them)."""
        return [r.path.name for r in (self._similarity, self._attention) if not r.checksummed]

    def stored_bytes(self) -> int:
        """Bytes the group's files take in the store."""
        if _is_local(self.path):
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return int(self.path.fs.du(self.path.fspath))

    def close(self):
        self._similarity.close()
        self._attention.close()


class Cache(Mapping):
    """The teacher groups of a cache, by exact group name or by a teacher alias."""

    group_class = TeacherGroup  # what __getitem__ opens (H5Cache: H5Group)

    def __init__(self, path, groups: dict[str, dict]):
        self.path = path
        self._meta = groups
        self._open: dict[str, TeacherGroup] = {}

    def __repr__(self):
        return f"Cache({str(self.path)!r}, groups={list(self._meta)})"

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self):
        return len(self._meta)

    def _resolve(self, name: str) -> str:
        if name in self._meta:
            return name
        hits = [g for g, md in self._meta.items()
                if name == md.get("teacher") or name in (md.get("aliases") or [])]
        if len(hits) == 1:
            return hits[0]
        available = ", ".join(f"{g} (aliases: {', '.join(md.get('aliases') or []) or '-'})"
                              for g, md in self._meta.items()) or "none"
        if hits:
            raise KeyError(f"{name!r} is an alias of several groups in cache {self.path}: {hits}; "
                           f"name the group exactly")
        raise KeyError(f"no teacher group {name!r} in cache {self.path}; available: {available}")

    def __getitem__(self, name: str) -> TeacherGroup:
        group = self._resolve(name)
        if group not in self._open:
            self._open[group] = self.group_class(self.path, group, self._meta[group])
        return self._open[group]

    def __contains__(self, name) -> bool:
        try:
            self._resolve(name)
            return True
        except KeyError:
            return False


def open_cache(path) -> Cache:
    """Open a cache for reading (no lock: readers never conflict with each other).

    path: a local folder or an fsspec URL (`cache_location`), or a single-file HDF5
    cache written by `medalign-cache export` (read by h5cache.py)."""
    path = cache_location(path)
    if _is_local(path) and path.is_file():
        from .h5cache import open_h5_cache
        return open_h5_cache(path)
    if not path.is_dir():
        raise CacheError(f"no cache at {path}; build one with `medalign-cache build ... --cache {path}`")
    if not (path / "zarr.json").is_file():
        raise CacheError(f"{path} is not a medalign cache (no zarr.json); point --cache at the folder "
                         f"`medalign-cache build` wrote")
    _check_root(path)
    groups = {}
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name):
        meta_file = sub / "zarr.json"
        if not meta_file.is_file():
            continue  # a group still being created has no zarr.json yet
        meta = _read_json(meta_file)
        if meta.get("node_type") != "group":
            continue
        attrs = meta.get("attributes", {})
        _check_group_schema(sub, attrs)
        groups[sub.name] = attrs
    return Cache(path, groups)


__all__ = ["Cache", "CacheError", "CacheLockedError", "GroupWriter", "TeacherGroup", "cache_location", "default_group_name", "is_url",
           "default_shard_size", "open_cache", "packed_size", "writer_versions"]
