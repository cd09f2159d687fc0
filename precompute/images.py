"""Decode any image a medical dataset ships into the 8-bit RGB a CLIP teacher
and a LLaVA student expect.

    load_image(path)       PNG/JPEG/BMP/TIFF in every PIL mode, DICOM, and images inside
                           HDF5 files ("cxr.h5::/cxr[17]", h5images.py) -> PIL "RGB"
    expand2square(img)     LLaVA's pad-to-square
    has_dicom_magic(path)  the Part 10 "DICM" marker (suffix-less DICOM exports)
    ImageError             one line: "<path>: <what is wrong>"

Why not just `Image.open(path).convert("RGB")`: PIL's conversion of 16-bit and
float grayscale clips at 255, so a 12- or 16-bit radiograph turns almost
entirely white; alpha is dropped instead of composited; EXIF rotation is
ignored; and a truncated file only fails later, deep inside a DataLoader worker.

Grayscale intensities depend on how the image was stored, and are NOT
normalised to one look across kinds:
- 8-bit (L, 1, P, RGB...): used as stored, no stretching;
- 16-bit / 32-bit / float grayscale: the image's own min..max stretched to 0..255;
- DICOM grayscale: the modality rescale, then the header's first VOI window
  mapped to 0..255 (outside it, e.g. air and bone in a soft-tissue window,
  saturates); min..max of the frame after a VOI LUT or when there is no VOI;
- DICOM colour: scaled by its stored bit depth.
The same file gives the same pixels at build time (teacher) and training time
(student): both stages call load_image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class ImageError(ValueError):
    """An image that cannot be decoded; the message starts with its path."""


DICOM_SUFFIXES = (".dcm", ".dicom")


def load_image(path) -> Image.Image:
    """Decode `path` fully and return a PIL image in mode "RGB".

    - 8-bit grayscale / 1-bit: replicated to three channels.
    - 16-bit (I;16, I;16B, ...), 32-bit integer (I) and float (F) grayscale: the
      image's own value range is stretched to 0..255. A 16-bit PNG does not say
      whether it holds 10, 12 or 16 bits, so the type's range (0..65535) would
      leave 12-bit data nearly black; the data's range never clips or darkens.
    - LA / RGBA / PA / palette with transparency: composited onto black.
    - CMYK, YCbCr, palette: PIL's conversion to RGB.
    - EXIF orientation is applied (phone photos of films, some JPEG exports).
    - Multi-page TIFF/GIF: the first page.
    - DICOM (suffix .dcm/.dicom or the "DICM" magic at byte 128): see
      `_load_dicom`; needs pydicom. Multi-frame DICOM: the middle frame.
    - An image inside an HDF5 file: an `h5images.H5Image` (what `resolve_image`
      returns for a "<file>::<dataset>[<index>]" key) or such a string; see h5images.py.
    Every failure (missing, empty, truncated, not an image, decompression bomb)
    raises ImageError naming the file.
    """
    if "::" in str(path):
        from .h5images import H5Image, load_h5_image  # h5py is imported only for HDF5 images
        if not isinstance(path, H5Image):
            try:
                path = H5Image.parse(str(path))
            except ValueError as e:
                raise ImageError(str(e)) from None
        return load_h5_image(path)
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); re-export or remove it")
    if path.suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path):
        return _load_dicom(path)
    return _load_pil(path)


def expand2square(img: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Pad the shorter side so the image is square, content centred (LLaVA's
    `expand2square`, same placement: offset = (long - short) // 2).

    `img` is what load_image returns (RGB). LLaVA / LLaVA-Med pad with the
    image processor's mean colour,
    `tuple(int(x * 255) for x in image_processor.image_mean)`, so that the
    padding becomes ~0 after normalisation; pass that as `background` to match.
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), tuple(background))
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


# ----------------------------------------------------------------------------- PNG / JPEG / ...

def _load_pil(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            # Decode every pixel now: PIL is lazy, and a truncated file would
            # otherwise fail later in some unrelated-looking place.
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        # PIL's text gives its refusal limit (2 x MAX_IMAGE_PIXELS); say which knob that is.
        raise ImageError(f"{path}: {e} A header this large is usually corrupt; if the image is genuine, "
                         f"downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}; "
                         f"PIL refuses twice that) before building.") from None
    except Image.UnidentifiedImageError:
        # PIL's own text only repeats the path. Say what kind of bytes the file starts with,
        # never the bytes themselves: the "image" may be a link to a secret (/etc/passwd).
        raise ImageError(f"{path}: not a readable image: not a known image format (starts with "
                         f"{_describe_head(path)}); re-export or remove it") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise ImageError(f"{path}: cannot decode ({type(e).__name__}: {e}); re-export or remove it") from None


def _describe_head(path: Path, n: int = 16) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(n)
    except OSError:
        return "bytes that cannot be read"
    text = None
    for cut in range(4):  # the n-th byte may fall inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            pass
    kind = "text" if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text) else "binary data"
    return f"{len(head)} bytes of {kind}"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        # I;16, I;16B, I;16L, I;16N, I (int32), F (float32): scale by the data's range.
        gray = _to_uint8(np.asarray(img))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV
    except ValueError as e:
        raise ValueError(f"PIL cannot convert mode {mode!r} to RGB ({e}); re-export as PNG") from None


def _to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map [lo, hi] (default: the finite min and max of `values`) linearly onto
    0..255. A constant image becomes black; NaN becomes black."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if lo is None or hi is None:
        if finite.size == 0:
            return np.zeros(values.shape, dtype=np.uint8)
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=lo) - lo) / (hi - lo)
    return _unit_to_uint8(scaled)


def _unit_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM

def has_dicom_magic(path) -> bool:
    # Part 10 files: 128-byte preamble, then "DICM". Clinical exports often
    # have no suffix at all (IM0001, 1.2.840....), so the magic decides.
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _load_dicom(path: Path) -> Image.Image:
    """DICOM -> 8-bit RGB, the way a viewer shows it by default:

    1. pixel data of the middle frame (multi-frame files: a volume or cine loop
       has no single "the image"; the middle one is the most representative);
    2. monochrome: modality LUT / rescale slope+intercept (stored values ->
       Hounsfield units etc.), then the first VOI window (Window Centre/Width,
       top level or the frame's functional groups; LINEAR, LINEAR_EXACT or
       SIGMOID per PS3.3 C.11.2) mapped straight to 0..255; a VOI LUT sequence
       via pydicom followed by min-max; no VOI at all: min-max of the frame;
       MONOCHROME1 (low values = white) is inverted so bone is bright as in
       MONOCHROME2;
    3. colour: RGB/YBR as decoded (pydicom converts YBR to RGB), palette colour
       through its LUT, scaled to 8 bits by the stored bit depth.
    """
    try:
        import pydicom
    except ImportError:
        raise ImageError(f"{path}: is a DICOM file and pydicom is not installed; "
                         f"pip install pydicom (or pip install 'medalign[dicom]')") from None
    magic = has_dicom_magic(path)
    try:
        # Files without the Part 10 header (older exports) need force=True.
        ds = pydicom.dcmread(path, force=not magic)
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels and not magic:
        raise ImageError(f"{path}: not a DICOM image (no 'DICM' header and no pixel data found); "
                         f"check the file, or give it its real suffix if it is another format")
    if not has_pixels:
        raise _without_pixels(path, ds)
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        index = frames // 2
        arr = _dicom_frame(ds, index if frames > 1 else None)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric.startswith("MONOCHROME") or (arr.ndim == 2 and photometric != "PALETTE COLOR"):
            gray = _dicom_gray(ds, arr, index)
            if photometric == "MONOCHROME1":
                gray = 255 - gray
            return Image.fromarray(gray, mode="L").convert("RGB")
        return Image.fromarray(_dicom_color(ds, arr, photometric), mode="RGB")
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated pixel data, missing codec, bad LUT...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = f" ({syntax.name})" if syntax is not None else ""
        short = _short_pixel_data(ds, syntax)
        if short:
            raise ImageError(f"{path}: cannot decode DICOM pixel data{name}: truncated, {short}; "
                             f"copy or export it again") from None
        raise ImageError(f"{path}: cannot decode DICOM pixel data{name}: {type(e).__name__}: {e}") from None


def _without_pixels(path: Path, ds) -> ImageError:
    """A DICOM without pixel data is either cut short (it announces an image: an
    image SOP class, Rows/Columns, or nothing at all after the file header; pydicom
    reads a truncated file without complaint, up to where it ends) or a non-image
    object (an SR, an RT plan) that has no place in an image dataset."""
    evidence = _announced_image(ds)
    if evidence:
        return ImageError(f"{path}: truncated DICOM ({path.stat().st_size} bytes): {evidence}, but the file "
                          f"ends before its pixel data; copy or export it again")
    try:
        kind = ds.get("Modality") or ds.get("SOPClassUID") or "unknown"
    except Exception:  # noqa: BLE001 - an element cut short fails only when read
        kind = "unknown"
    return ImageError(f"{path}: DICOM object without pixel data (modality/class {kind}); "
                      f"only image DICOMs can be used, remove it from the dataset")


def _announced_image(ds) -> str | None:
    """Why `ds` should have had pixel data, or None (see `_without_pixels`)."""
    if "Rows" in ds or "Columns" in ds:
        return "its header gives the image size (Rows/Columns)"
    try:
        from pydicom.uid import UID
        meta = getattr(ds, "file_meta", None)
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
        name = UID(str(sop)).name if sop else ""
    except Exception:  # noqa: BLE001 - an element cut short fails only when read
        name = ""
    if "Image Storage" in name:
        return f"its header announces a {name} object"
    return "nothing follows its 'DICM' file header" if len(ds) == 0 else None


def _short_pixel_data(ds, syntax) -> str | None:
    """"N of M bytes" when uncompressed pixel data is shorter than its header says."""
    try:
        if syntax is not None and syntax.is_compressed:
            return None  # compressed lengths are not predictable
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * \
            int(ds.get("NumberOfFrames") or 1)
        expected = (pixels * int(ds.BitsAllocated) + 7) // 8
        got = len(ds.PixelData)
    except Exception:  # noqa: BLE001 - a header too broken to tell
        return None
    return f"{got} of {expected} pixel data bytes" if got < expected else None


def _dicom_frame(ds, index: int | None) -> np.ndarray:
    try:
        from pydicom.pixels import pixel_array  # pydicom >= 3: decodes only the frame asked for
    except ImportError:
        arr = ds.pixel_array
        return arr[index] if index is not None else arr
    return pixel_array(ds, index=index)


def _pixels_module():
    try:
        import pydicom.pixels as px  # pydicom >= 3
        return px
    except ImportError:
        from pydicom.pixel_data_handlers import util as px  # pydicom 2.x
        return px


def _functional(ds, index: int, sequence: str, attribute: str):
    """An attribute from an enhanced multi-frame file's functional groups
    (per-frame first, then shared), or None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    items = []
    if per_frame and index < len(per_frame):
        items.append(per_frame[index])
    if shared:
        items.append(shared[0])
    for item in items:
        seq = item.get(sequence)
        if seq and attribute in seq[0]:
            return seq[0][attribute].value
    return None


def _first(value) -> float:
    # Window Centre/Width may hold several windows (VM > 1): take the first, as viewers do.
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def _dicom_gray(ds, arr: np.ndarray, index: int) -> np.ndarray:
    px = _pixels_module()
    values = arr.astype(np.float64)
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        values = np.asarray(px.apply_modality_lut(arr, ds), dtype=np.float64)
    else:
        slope = _functional(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is not None or intercept is not None:
            values = values * float(slope if slope is not None else 1) + float(intercept or 0)

    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    function = ds.get("VOILUTFunction")
    if center is None or width is None:
        center = _functional(ds, index, "FrameVOILUTSequence", "WindowCenter")
        width = _functional(ds, index, "FrameVOILUTSequence", "WindowWidth")
        function = _functional(ds, index, "FrameVOILUTSequence", "VOILUTFunction")
    if center is not None and width is not None:
        windowed = _window(values, _first(center), _first(width), str(function or "LINEAR").upper())
        if windowed is not None:
            return _unit_to_uint8(windowed)
    if "VOILUTSequence" in ds:
        return _to_uint8(px.apply_voi_lut(values, ds, prefer_lut=True))
    return _to_uint8(values)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3 windowing onto [0, 1]; None when the
    header's window is unusable (then the caller falls back to min-max)."""
    if function == "SIGMOID":
        if width <= 0:
            return None
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
    else:  # LINEAR, the default (and what an unknown function is read as)
        if width < 1:
            return None
        center, width = center - 0.5, width - 1.0
    if width == 0:  # LINEAR with width 1: a threshold at the centre
        return (x > center).astype(np.float64)
    return (x - center) / width + 0.5


def _dicom_color(ds, arr: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        arr = np.asarray(_pixels_module().apply_color_lut(arr, ds))
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored") or 8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"unsupported colour layout {arr.shape} for {photometric}")
    if bits <= 8 and arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return _to_uint8(arr, 0, 2 ** bits - 1)
