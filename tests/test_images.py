"""load_image: every PIL mode and DICOM flavour a dataset ships -> 8-bit RGB, and
every broken file -> ImageError naming it. Without pydicom (an optional extra) the
DICOM tests skip and the rest still run."""
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.images import ImageError, expand2square, load_image

try:
    import pydicom
    from pydicom.data import get_testdata_file
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pydicom >= 3
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
except ImportError:
    pydicom = None

needs_pydicom = pytest.mark.skipif(pydicom is None,
                                   reason="pydicom is not installed (pip install 'medalign[dicom]')")


def gray_rgb(values):
    """The RGB array a grayscale uint8 image should become."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


RAMP = np.linspace(0, 1, 64 * 48).reshape(48, 64)     # a gradient over the whole image, H=48 W=64
RAMP8 = np.round(RAMP * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- PIL modes

def make_l(path):
    Image.fromarray(RAMP8, "L").save(path)
    return gray_rgb(RAMP8), 0


def make_l_jpeg(path):
    Image.fromarray(RAMP8, "L").save(path, quality=95)
    return gray_rgb(RAMP8), 3


def make_16bit_full(path):
    # 0..65535: PIL's own convert("L") would clip everything above 255 to white.
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)
    return gray_rgb(RAMP8), 1


def make_16bit_12bit_data(path):
    # 12-bit data in a 16-bit PNG (the usual DICOM export): must still span 0..255.
    Image.fromarray(np.round(RAMP * 4095).astype(np.uint16)).save(path)
    return gray_rgb(RAMP8), 1


def make_16bit_big_endian_tiff(path):
    img = Image.fromarray(np.round(RAMP * 65535).astype(">u2"))
    assert img.mode == "I;16B"
    img.save(path)
    return gray_rgb(RAMP8), 1


def make_int32_hounsfield(path):
    Image.fromarray(np.round(RAMP * 4000 - 1000).astype(np.int32), "I").save(path)
    return gray_rgb(RAMP8), 1


def make_float(path):
    Image.fromarray((RAMP * 3.5 - 1).astype(np.float32), "F").save(path)
    return gray_rgb(RAMP8), 1


def make_la(path):
    alpha = np.zeros_like(RAMP8)
    alpha[:, 32:] = 255                                   # left half transparent
    Image.fromarray(np.stack([RAMP8, alpha], -1), "LA").save(path)
    expected = gray_rgb(RAMP8)
    expected[:, :32] = 0                                  # composited onto black
    return expected, 0


def make_rgba(path):
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[:24] = 0
    alpha[24:, :32] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    expected = np.zeros_like(rgb)
    expected[24:, 32:, 0] = 200
    expected[24:, :32, 0] = 100                           # 200 * 128 / 255
    return expected, 1


def make_palette(path):
    img = Image.fromarray(RAMP8, "L").convert("P")        # grayscale palette, no transparency
    img.save(path)
    return gray_rgb(RAMP8), 0


def make_palette_transparent(path):
    index = np.zeros((48, 64), np.uint8)
    index[:, 32:] = 1
    img = Image.fromarray(index, "P")
    img.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    img.save(path, transparency=0)                        # index 0 (white) is transparent
    expected = np.zeros((48, 64, 3), np.uint8)
    expected[:, 32:, 1] = 255
    return expected, 0


def make_cmyk(path):
    cmyk = np.zeros((48, 64, 4), np.uint8)
    cmyk[:, 32:, 1:3] = 255                               # magenta + yellow = red
    Image.fromarray(cmyk, "CMYK").save(path)
    expected = np.full((48, 64, 3), 255, np.uint8)
    expected[:, 32:, 1:] = 0
    return expected, 0


def make_bilevel(path):
    Image.fromarray(RAMP8 > 127).convert("1").save(path)
    return gray_rgb(np.where(RAMP8 > 127, 255, 0)), 0


def make_exif_rotated(path):
    img = Image.fromarray(RAMP8, "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 CW to display"
    img.save(path, exif=exif, quality=95)
    return gray_rgb(np.rot90(RAMP8, k=-1)), 3             # 64 x 48 -> displayed 48 wide, 64 tall


PIL_CASES = {
    "L.png": make_l,
    "L.jpg": make_l_jpeg,
    "I16_full_range.png": make_16bit_full,
    "I16_12bit_data.png": make_16bit_12bit_data,
    "I16B.tif": make_16bit_big_endian_tiff,
    "I32_hounsfield.tif": make_int32_hounsfield,
    "F.tif": make_float,
    "LA.png": make_la,
    "RGBA.png": make_rgba,
    "P.png": make_palette,
    "P_transparency.png": make_palette_transparent,
    "CMYK.tif": make_cmyk,
    "1bit.png": make_bilevel,
    "exif_orientation6.jpg": make_exif_rotated,
}


@pytest.mark.parametrize("name", list(PIL_CASES))
def test_every_pil_mode_becomes_rgb(tmp_path, name):
    path = tmp_path / name
    expected, tolerance = PIL_CASES[name](path)
    img = load_image(path)
    got = np.asarray(img)
    assert img.mode == "RGB" and got.shape == expected.shape, (img.mode, got.shape)
    assert np.abs(got.astype(int) - expected).max() <= tolerance


def test_16bit_keeps_its_range_where_pil_saturates(tmp_path):
    path = tmp_path / "xray16.png"
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    naive = np.asarray(Image.open(path).convert("L"))
    assert (naive == 255).mean() > 0.9                    # what we must not do
    got = np.asarray(load_image(path))[..., 0]
    assert got.min() == 0 and got.max() == 255
    assert np.all(np.diff(got.astype(int), axis=1) >= 0)  # still a monotone gradient


# ----------------------------------------------------------------------------- DICOM

def expected_dicom(ds):
    """An independent 8-bit rendering: pydicom's own modality LUT and windowing,
    scaled by the output range pydicom's windowing uses (PS3.3 C.11.2)."""
    hu = apply_modality_lut(ds.pixel_array, ds)
    if "WindowCenter" not in ds:
        hu = hu.astype(float)
        return np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    bits = ds.BitsStored
    y_min, y_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2 ** bits - 1)
    if "RescaleSlope" in ds:
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    windowed = apply_voi_lut(hu, ds)
    return np.round((windowed - y_min) / (y_max - y_min) * 255)


def ct_with_window(path, center=40, width=400):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.save_as(path)
    return ds


@needs_pydicom
@pytest.mark.parametrize("case", ["CT_small.dcm", "MR_small.dcm", "CT_windowed"])
def test_dicom_rescale_and_window(tmp_path, case):
    if case == "CT_windowed":
        path = tmp_path / "ct_window.dcm"
        ds = ct_with_window(path)
    else:
        path = get_testdata_file(case)
        ds = pydicom.dcmread(path)
    img = load_image(path)
    got = np.asarray(img).astype(int)
    assert img.mode == "RGB" and got.shape == (ds.Rows, ds.Columns, 3)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert np.abs(got[..., 0] - expected_dicom(ds)).max() <= 1
    assert got.std() > 20                                 # a picture, not a flat field


@needs_pydicom
def test_dicom_soft_tissue_window_saturates_air_and_bone(tmp_path):
    path = tmp_path / "ct.dcm"
    ds = ct_with_window(path, center=40, width=400)
    hu = apply_modality_lut(ds.pixel_array, ds)
    got = np.asarray(load_image(path))[..., 0]
    assert (got[hu < -160] == 0).all() and (got[hu > 240] == 255).all()


@needs_pydicom
def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    normal = np.asarray(load_image(get_testdata_file("CT_small.dcm"))).astype(int)
    inverted = np.asarray(load_image(tmp_path / "inverted.dcm")).astype(int)
    assert (inverted == 255 - normal).all()


@needs_pydicom
def test_multiframe_takes_the_middle_frame(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frame = ds.pixel_array
    ds.PixelData = np.stack([np.zeros_like(frame), frame, np.full_like(frame, 4000)]).tobytes()
    ds.NumberOfFrames = 3
    ds.save_as(tmp_path / "cine.dcm")
    assert (np.asarray(load_image(tmp_path / "cine.dcm")) ==
            np.asarray(load_image(get_testdata_file("MR_small.dcm")))).all()


@needs_pydicom
def test_dicom_found_by_magic_without_suffix(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "IM0001")
    assert (np.asarray(load_image(tmp_path / "IM0001")) ==
            np.asarray(load_image(get_testdata_file("CT_small.dcm")))).all()


@needs_pydicom
def test_dicom_colour_16bit_matches_8bit():
    eight = np.asarray(load_image(get_testdata_file("SC_rgb_rle.dcm"))).astype(int)
    sixteen = np.asarray(load_image(get_testdata_file("SC_rgb_rle_16bit.dcm"))).astype(int)
    assert np.abs(eight - sixteen).max() <= 1 and eight.std() > 20


# Multi-frame files inside the pydicom wheel (others, e.g. emri_small.dcm, are downloaded on demand).
REAL_MULTIFRAME = ["examples_ybr_color.dcm", "rtdose.dcm"]


def _simple_rendering(ds, frame) -> np.ndarray | None:
    """The expected RGB of `frame` where no VOI window applies (min..max grayscale,
    8-bit colour as decoded), else None."""
    windowed = "WindowCenter" in ds or "SharedFunctionalGroupsSequence" in ds or \
        "PerFrameFunctionalGroupsSequence" in ds or "RescaleSlope" in ds
    if windowed:
        return None
    if frame.ndim == 3:
        return frame.astype(int) if ds.BitsStored <= 8 else None
    f = frame.astype(float)
    return gray_rgb(np.round((f - f.min()) / (f.max() - f.min()) * 255)).astype(int)


@needs_pydicom
@pytest.mark.parametrize("name", REAL_MULTIFRAME)
def test_real_multiframe_file_gives_its_middle_frame(name):
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} no longer ships with pydicom {pydicom.__version__}"
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    n = int(ds.NumberOfFrames)
    assert n > 1 and len(frames) == n
    got = np.asarray(load_image(path)).astype(int)
    assert got.shape == (ds.Rows, ds.Columns, 3) and got.std() > 10
    # the frame the picture correlates with best is the middle one
    flat = [np.asarray(f, dtype=float).reshape(-1) for f in frames]
    picture = (got[..., 0] if frames[0].ndim == 2 else got).reshape(-1).astype(float)
    corr = [np.corrcoef(picture, f)[0, 1] if f.std() > 0 else -1.0 for f in flat]
    assert int(np.argmax(corr)) == n // 2, corr
    expected = _simple_rendering(ds, frames[n // 2])
    if expected is not None:
        assert np.abs(got - expected).max() <= 1


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "IM0001"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)   # found by its magic, no suffix
    monkeypatch.setitem(sys.modules, "pydicom", None)    # makes `import pydicom` raise ImportError
    with pytest.raises(ImageError, match=r"pip install pydicom"):
        load_image(path)


def test_module_runs_without_pydicom(tmp_path, monkeypatch):
    """This module imported where `import pydicom` fails: it loads (no module-wide
    skip), its PIL tests run, and exactly the DICOM tests are marked to skip."""
    monkeypatch.setitem(sys.modules, "pydicom", None)
    spec = importlib.util.spec_from_file_location("images_without_pydicom", __file__)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except pytest.skip.Exception as e:                   # what a module-level importorskip does
        pytest.fail(f"without pydicom the whole module skips itself: {e}")
    assert module.pydicom is None
    module.test_every_pil_mode_becomes_rgb(tmp_path, "I16_full_range.png")

    def skipped(test) -> bool:
        marks = getattr(test, "pytestmark", [])
        return any(m.name == "skipif" and m.args[0] for m in marks)
    tests = {name: f for name, f in vars(module).items() if name.startswith("test_")}
    skips = {name for name, f in tests.items() if skipped(f)}
    assert {"test_dicom_rescale_and_window", "test_real_multiframe_file_gives_its_middle_frame"} <= skips
    assert not skips & {"test_every_pil_mode_becomes_rgb", "test_16bit_keeps_its_range_where_pil_saturates",
                        "test_decompression_bomb_is_refused_with_the_pixel_count",
                        "test_expand2square_centres_on_background", "test_dicom_without_pydicom_says_how_to_install"}
    broken = [p for p in module.test_broken_files_raise_image_error_naming_the_file.pytestmark
              if p.name == "parametrize"][0].args[1]
    assert all(bool(getattr(p, "marks", ())) == str(getattr(p, "values", [p])[0]).endswith(".dcm")
               for p in broken)


# ----------------------------------------------------------------------------- broken files

def write_truncated_png(path):
    Image.fromarray(RAMP8, "L").resize((256, 256)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_jpeg(path):
    Image.fromarray(RAMP8, "L").resize((256, 256)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_dicom_pixels(path):
    shutil.copy(get_testdata_file("MR_truncated.dcm"), path)   # pydicom's own truncated pixel data


def write_truncated_dicom_header(path, size=300):
    path.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:size])


BROKEN = {
    "truncated.png": (write_truncated_png, "cannot decode"),
    "truncated.jpg": (write_truncated_jpeg, "cannot decode"),
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "notes.png": (lambda p: p.write_text("not an image, just text\n"), "not a readable image"),
    "missing.png": (lambda p: None, "no such file"),
    "a_folder.png": (lambda p: p.mkdir(), "not a file"),
    "truncated_pixels.dcm": (write_truncated_dicom_pixels,
                             r"cannot decode DICOM pixel data .*truncated, 8130 of 8192 pixel data bytes"),
    "truncated_header.dcm": (write_truncated_dicom_header,
                             r"truncated DICOM \(300 bytes\): .*ends before its pixel data"),
    "truncated_header_1000.dcm": (lambda p: write_truncated_dicom_header(p, 1000),
                                  r"truncated DICOM \(1000 bytes\): its header announces a CT Image Storage"),
    "truncated_header_5000.dcm": (lambda p: write_truncated_dicom_header(p, 5000),
                                  r"truncated DICOM \(5000 bytes\): its header gives the image size"),
    "text.dcm": (lambda p: p.write_text("hello"), "not a DICOM image"),
    "rtplan.dcm": (lambda p: shutil.copy(get_testdata_file("rtplan.dcm"), p), "without pixel data"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_pydicom) if n.endswith(".dcm") else n
                                  for n in BROKEN])
def test_broken_files_raise_image_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    write, message = BROKEN[name]
    write(path)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("secret,kind", [(b"root:x:0:0:root:/root:/bin/bash\n", "16 bytes of text"),
                                         (bytes(range(7, 40)), "16 bytes of binary data"),
                                         ("k\u00e9y=s\u00e9cr\u00e8te\n".encode(), "bytes of text")])
def test_a_non_image_is_described_never_echoed(tmp_path, secret, kind):
    """An "image" that is a link to a secret (/etc/passwd): the error says what kind of
    bytes the file starts with, never the bytes themselves."""
    (tmp_path / "secret").write_bytes(secret)
    (tmp_path / "scan.png").symlink_to(tmp_path / "secret")
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "scan.png")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'scan.png'}: not a readable image: not a known image format")
    assert kind in message and "re-export or remove it" in message
    told = message.replace(str(tmp_path / "scan.png"), "")         # what the message adds to the path
    for n in (4, 6):
        assert not any(secret[i:i + n].decode("latin-1") in told for i in range(len(secret) - n))
        assert repr(secret[:n])[2:-1] not in told


def test_decompression_bomb_is_refused_with_the_pixel_count(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"10000 pixels.*MAX_IMAGE_PIXELS") as info:
        load_image(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- expand2square

@pytest.mark.parametrize("size, offset", [((30, 20), (0, 5)), ((20, 31), (5, 0)), ((16, 16), (0, 0))])
def test_expand2square_centres_on_background(size, offset):
    img = Image.new("RGB", size, (255, 255, 255))
    out = np.asarray(expand2square(img, (10, 20, 30)))
    side = max(size)
    assert out.shape == (side, side, 3)
    x, y = offset
    assert (out[y:y + size[1], x:x + size[0]] == 255).all()
    assert (out.reshape(-1, 3) == (10, 20, 30)).all(axis=1).sum() == side * side - size[0] * size[1]
