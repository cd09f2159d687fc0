"""Images stored inside HDF5 files: how one is named, listed and read.

    <file>::<dataset>[<index>]      e.g. cxr.h5::/cxr[17], scans/file1000001.h5::/reconstruction_rss[12]

names image `index` along the first axis of `dataset` in `file` (relative to the image
root, like every cache key). Medical datasets ship that way: CheXzero's `cxr.h5` (one
dataset `cxr` [N, 320, 320], row i aligned with row i of a CSV of impressions), fastMRI's
one file per scan (`reconstruction_rss` [slices, H, W] float32, the volume maximum in the
file's `max` attribute), slice stacks [N, H, W], [N, H, W, C], [N, C, H, W].

The name is a plain string, so it works in every dataset format's image field and as the
cache key. A key is an HDF5 reference exactly when it contains "::" (":" cannot occur in
portable file names: Windows reserves it). The canonical spelling, which is the cache key,
has the file part normalised like any key, the dataset path absolute ("/cxr") with empty
and "." parts dropped, and the index in decimal without leading zeros; `cxr.h5::cxr[017]`
and `./cxr.h5::/cxr[17]` are one key.

    H5Image                 a parsed reference (file, dataset, index); what resolve_image returns
    parse_h5_key(text)      "<file>::<dataset>[<index>]" -> (file, dataset, index), ValueError if malformed
    h5_key(file, ds, i)     the canonical key
    image_datasets(path)    [(dataset, length)] of the image stacks in a file (folder scan, --data x.h5)
    load_h5_image(ref)      -> PIL "RGB" (load_image calls it); every failure is one ImageError line
    read_only(path)         open an HDF5 file read-only; H5OpenError says why not (also used by h5cache)
    close_files()           close this process's cached handles

Pixels (docs/formats.md, "Images in HDF5 files"):
- layout: rank 3 is [N, H, W]; rank 4 is [N, H, W, C] when the last axis is 1, 3 or 4 and
  axis 1 is not, [N, C, H, W] in the opposite case; the dataset's `layout` attribute
  ("NHW", "NHWC", "NCHW") decides where that is ambiguous or wrong. C = 1 is grayscale,
  3 RGB, 4 RGBA (composited on black, like an RGBA PNG).
- uint8: as stored. Any other integer or float type: if the dataset, or else the file's
  root group, has a `max` attribute (fastMRI stores the volume maximum there), 0..max
  maps linearly onto 0..255 (clipped), so every slice of a volume keeps one scale;
  otherwise the image's own min..max is stretched to 0..255, exactly as a 16-bit PNG is
  (images._to_uint8). NaN or infinite values are refused, never turned into black.

Handles: h5py file handles do not survive fork (a DataLoader worker must not use one its
parent opened), and opening a file per sample is slow. So files are opened lazily,
read-only, at most MAX_OPEN per process, kept open and reused (with what was checked of
each dataset read through them: type, layout, `max`), and the whole set is dropped (never
used again, not closed) when the process id changes.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ImageError, _to_rgb, _to_uint8

H5_SUFFIXES = (".h5", ".hdf5")      # what the folder scan opens; a key may name any HDF5 file
LAYOUTS = ("NHW", "NHWC", "NCHW")
CHANNELS = (1, 3, 4)
MAX_OPEN = 32                       # handles kept open per process (fastMRI: one file per scan)
_KEY = re.compile(r"^(?P<file>.*?)::(?P<dataset>.*)\[(?P<index>[^\[\]]*)\]$", re.S)


class H5OpenError(OSError):
    """An HDF5 file that cannot be opened for reading; the message says why (no path)."""


# ----------------------------------------------------------------------------- names

def parse_h5_key(text: str) -> tuple[str, str, int]:
    """"<file>::<dataset>[<index>]" -> (file as written, canonical dataset path, index).
    ValueError names what is wrong; the file part is left for normalize_key."""
    m = _KEY.match(text)
    if m is None:
        raise ValueError(f"{text!r} names an image inside an HDF5 file ('::') but lacks its index: write "
                         f"<file>::<dataset>[<index>], e.g. cxr.h5::/cxr[0]")
    file, dataset, index = m["file"].strip(), m["dataset"].strip(), m["index"].strip()
    if not file:
        raise ValueError(f"{text!r}: no file before '::'")
    parts = [p for p in dataset.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"{text!r}: no dataset between '::' and '[{index}]'")
    if ".." in parts:
        raise ValueError(f"{text!r}: '..' in the dataset path; give it from the file's root, e.g. /group/data")
    if not index.isdigit() or not index.isascii():
        raise ValueError(f"{text!r}: index {index!r} is not a non-negative integer")
    return file, "/" + "/".join(parts), int(index)


def h5_key(file: str, dataset: str, index: int) -> str:
    """The canonical key (file already normalised, dataset as parse_h5_key returns it)."""
    return f"{file}::{dataset}[{int(index)}]"


@dataclass(frozen=True)
class H5Image:
    """One image inside an HDF5 file: what `resolve_image` gives for a "::" key, and what
    `load_image` accepts besides paths. str() is "<file>::<dataset>[<index>]"."""
    file: Path
    dataset: str
    index: int

    @classmethod
    def parse(cls, text) -> "H5Image":
        file, dataset, index = parse_h5_key(os.fspath(text))
        return cls(Path(file), dataset, index)

    def __str__(self):
        return h5_key(str(self.file), self.dataset, self.index)

    def is_file(self) -> bool:
        """Whether the container exists (what "missing image" means); the dataset and the
        index are checked when the image is read."""
        return self.file.is_file()

    exists = is_file


# ----------------------------------------------------------------------------- files

def read_only(path) -> "h5py.File":  # noqa: F821 - h5py is imported on first use
    """h5py.File(path, "r"), with every way that fails turned into one H5OpenError sentence."""
    import h5py
    path = Path(path)
    if not path.exists():
        raise H5OpenError("no such file")
    if not path.is_file():
        raise H5OpenError("not a file")
    try:
        return h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001 - h5py raises OSError subclasses with HDF5's stack text
        raise H5OpenError(_open_failure(path, e)) from None


def _open_failure(path: Path, e: Exception) -> str:
    text = str(e)
    if "unable to lock file" in text or isinstance(e, BlockingIOError):
        return ("locked by a writer: another process has the file open for writing (HDF5 file locking); "
                "wait for it to finish")
    if "already open for write" in text:
        return ("marked open for writing: another process is writing it, or its writer crashed before closing "
                "it; wait for the writer, or if none is running clear the flag with `h5clear -s FILE`")
    m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if m:
        return f"truncated HDF5 file ({m[1]} of {m[2]} bytes); copy or export it again"
    if "file signature not found" in text:
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError:
            head = b""
        size = path.stat().st_size
        return (f"not an HDF5 file ({'empty' if size == 0 else f'{size} bytes starting with {head!r}'}); "
                f"check the file, or name it without '::' if it is an image file")
    reason = re.sub(r"^Unable to (synchronously )?open file \((.*)\)$", r"\2", text)
    return f"cannot open it as HDF5 ({reason})"


class _OpenFile:
    """One cached handle: the file's identity when opened (a replaced file is reopened), the
    h5py.File, and what load_h5_image has checked in it: dataset name -> _Stack. The checks
    live and die with the handle."""

    def __init__(self, identity: tuple, h5):
        self.identity, self.h5 = identity, h5
        self.stacks: dict[str, _Stack] = {}


_UNREAD = object()  # a _Stack's limit before its first image that is not uint8


@dataclass
class _Stack:
    """A dataset that passed _dataset and _layout in one open file, and its `max` attribute
    (_max_attribute's result) once an image needed it."""
    ds: "h5py.Dataset"  # noqa: F821 - h5py is imported on first use
    layout: str
    limit: object = _UNREAD


class _Handles:
    """This process's open files: real path -> _OpenFile, least recently used first."""

    def __init__(self):
        self.pid = os.getpid()
        self.files: OrderedDict[str, _OpenFile] = OrderedDict()
        self.lock = threading.Lock()


_handles = _Handles()
_inherited: list[_Handles] = []   # a forked child's copies of its parent's handles: kept, never touched


def _current() -> _Handles:
    global _handles
    if _handles.pid != os.getpid():
        # Forked (a DataLoader worker): the parent's handles are unusable here, and closing
        # them could release the parent's file locks, so they are only set aside.
        _inherited.append(_handles)
        _handles = _Handles()
    return _handles


def _cached_file(path: Path, state: _Handles) -> _OpenFile:
    """The open handle of `path` (caller holds state.lock), reopened when the file was replaced."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise H5OpenError("no such file") from None
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = state.files.get(real)
    if hit is not None and hit.identity == identity:
        state.files.move_to_end(real)
        return hit
    if hit is not None:
        del state.files[real]
        hit.h5.close()
    opened = state.files[real] = _OpenFile(identity, read_only(real))
    while len(state.files) > MAX_OPEN:
        state.files.popitem(last=False)[1].h5.close()
    return opened


def close_files() -> None:
    """Close this process's cached handles (HDF5 will not truncate a file the same process
    has open: call this before rewriting an image file in place)."""
    state = _current()
    with state.lock:
        while state.files:
            state.files.popitem()[1].h5.close()


# ----------------------------------------------------------------------------- reading

def load_h5_image(ref: H5Image) -> Image.Image:
    """The image `ref` names, as PIL "RGB" (rules: module docstring)."""
    state = _current()
    try:
        with state.lock:  # eviction must not close a file another thread is reading
            opened = _cached_file(ref.file, state)
            stack = opened.stacks.get(ref.dataset)
            if stack is None:  # checked once per handle; a failed check is not kept, so it is redone each time
                ds = _dataset(opened.h5, ref)
                stack = _Stack(ds, _layout(ds, ref))
                opened.stacks[ref.dataset] = stack
            ds = stack.ds
            if ref.index >= ds.shape[0]:
                raise ImageError(f"{ref}: index {ref.index} is out of range: {ref.dataset} holds {ds.shape[0]} "
                                 f"images (0..{ds.shape[0] - 1})")
            pixels = ds[ref.index]
            limit = None
            if pixels.dtype != np.uint8:
                if stack.limit is _UNREAD:
                    stack.limit = _max_attribute(ds, opened.h5, ref)
                limit = stack.limit
    except ImageError:
        raise
    except H5OpenError as e:
        raise ImageError(f"{ref}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged chunk, a failed filter, a dangling external link
        raise ImageError(f"{ref}: cannot read it ({type(e).__name__}: {_one_line(e)}); check or copy the file "
                         f"again") from None
    return _to_image(pixels, stack.layout, limit, ref)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _dataset(f, ref: H5Image):
    import h5py
    obj = f.get(ref.dataset)
    if obj is None:
        found = ", ".join(name for name, _ in _image_datasets(f)[:8]) or "none"
        raise ImageError(f"{ref}: no dataset {ref.dataset} in {ref.file}; image stacks there: {found}")
    if not isinstance(obj, h5py.Dataset):
        raise ImageError(f"{ref}: {ref.dataset} is a group, not a dataset; name a dataset inside it")
    kind = obj.dtype.kind
    if kind not in "uif":  # bool is kind "b"
        hint = " (take the magnitude first)" if kind == "c" else ""
        raise ImageError(f"{ref}: {ref.dataset} holds {obj.dtype} values, not image intensities{hint}")
    return obj


def _layout(ds, ref) -> str:
    """"NHW", "NHWC" or "NCHW" for a dataset (rules: module docstring)."""
    given = ds.attrs.get("layout")
    if given is not None:
        name = given.decode() if isinstance(given, bytes) else str(given)
        name = name.strip().upper()
        if name not in LAYOUTS or len(name) != ds.ndim or ("C" in name and ds.shape[name.index("C")] not in CHANNELS):
            raise ImageError(f"{ref}: {ref.dataset} has shape {ds.shape} and layout attribute {given!r}; the layout "
                             f"must be one of {', '.join(LAYOUTS)} matching its rank, with 1, 3 or 4 channels")
        return name
    if ds.ndim == 3:
        return "NHW"
    if ds.ndim == 4:
        first, last = ds.shape[1] in CHANNELS, ds.shape[3] in CHANNELS
        if last and not first:
            return "NHWC"
        if first and not last:
            return "NCHW"
        if first and last:
            raise ImageError(f"{ref}: cannot tell [N,H,W,C] from [N,C,H,W] for shape {ds.shape}; set the dataset's "
                             f"'layout' attribute to 'NHWC' or 'NCHW'")
    raise ImageError(f"{ref}: {ref.dataset} has shape {ds.shape}; an image stack is [N,H,W], [N,H,W,C] or "
                     f"[N,C,H,W] with C = 1, 3 or 4 (index along the first axis)")


def _max_attribute(ds, f, ref) -> float | None:
    """The `max` attribute of the dataset, else of the file (fastMRI), or None."""
    for owner, where in ((ds, ref.dataset), (f, "the file")):
        if "max" not in owner.attrs:
            continue
        value = np.asarray(owner.attrs["max"])
        number = float(value.reshape(-1)[0]) if value.size == 1 and value.dtype.kind in "uif" else None
        if number is None or not np.isfinite(number) or number <= 0:
            shown = value.tolist() if value.dtype.kind in "uifb" else owner.attrs["max"]
            raise ImageError(f"{ref}: the 'max' attribute of {where} is {shown!r}; it must be one positive "
                             f"finite number (the value shown as white)")
        return number
    return None


def _to_image(pixels: np.ndarray, layout: str, limit: float | None, ref) -> Image.Image:
    if layout == "NCHW":
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.dtype != np.uint8:
        if pixels.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(pixels)))
            if bad:
                raise ImageError(f"{ref}: {bad} of {pixels.size} values are NaN or infinite; fix or drop this "
                                 f"image (they would otherwise become arbitrary pixels)")
        # One range for all channels: the colour balance is kept. No limit: the image's own min..max.
        pixels = _to_uint8(pixels, 0.0, limit)
    mode = "L" if pixels.ndim == 2 else "RGB" if pixels.shape[-1] == 3 else "RGBA"
    return _to_rgb(Image.fromarray(np.ascontiguousarray(pixels), mode=mode))


# ----------------------------------------------------------------------------- listing

def _image_datasets(f) -> list[tuple[str, int]]:
    import h5py
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) and obj.dtype.kind in "uif" and obj.shape[0] > 0:
            try:
                _layout(obj, H5Image(Path(f.filename), "/" + name, 0))
            except ImageError:
                return  # e.g. fastMRI's multi-coil k-space is complex; coil maps [slices, 15, H, W]
            found.append(("/" + name, int(obj.shape[0])))

    f.visititems(visit)
    return sorted(found)


def image_datasets(path) -> list[tuple[str, int]]:
    """(dataset path, number of images) of every image stack in an HDF5 file, sorted:
    numeric, non-complex datasets of rank 3, or rank 4 with a recognisable layout.
    H5OpenError if the file cannot be read."""
    state = _current()
    with state.lock:
        return _image_datasets(_cached_file(Path(path), state).h5)


def dataset_length(path, dataset: str) -> int:
    """Images in one dataset of an HDF5 file; ValueError says why it is not an image stack."""
    ref = H5Image(Path(path), dataset, 0)
    state = _current()
    try:
        with state.lock:
            ds = _dataset(_cached_file(Path(path), state).h5, ref)
            _layout(ds, ref)
            return int(ds.shape[0])
    except H5OpenError as e:
        raise ValueError(f"{path}: {e}") from None
    except ImageError as e:
        raise ValueError(str(e).replace(f"{ref}: ", f"{path}: ", 1)) from None


def is_hdf5(path) -> bool:
    """Whether `path` is a file starting with the HDF5 signature (what h5py.is_hdf5 checks)."""
    if not Path(path).is_file():
        return False
    import h5py
    try:
        return bool(h5py.is_hdf5(str(path)))
    except OSError:
        return False
