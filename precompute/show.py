"""Look at what a cache holds: a teacher's CLS attention and one patch's similarity row,
drawn over the image as the teacher saw it.

    medalign-cache show --cache ./cache --teacher unimed --image-root images/ \\
        --key case_001/img.png --key case_002/img.png --patch-xy 7,7 --out fig.png

One row per key, two panels per row:
  1. attention: the stored CLS attention a (divided by its max, as the targets are),
     bilinearly upsampled over the image (align_corners=False, the convention the
     cache's resize uses) and alpha-blended, with a colour bar;
  2. similarity: row p of the patch-similarity matrix S (cosine of patch p with every
     patch), drawn the same way, patch p outlined.
At the teacher's native grid by default; `grid=G` shows the targets exactly as a
student with a G x G token grid is trained on (`TeacherGroup.targets(key, G)`).

"As the teacher saw it": the image is decoded with `load_image`, padded to square when
the build did (`pad_to_square`, mean-coloured like the build), and resized/cropped
according to the group's `preprocessing` metadata (open_clip's eval transform:
resize_mode shortest = resize the short side + centre crop, longest = resize the long
side + centre pad, squash = plain resize), so grid cell (r, c) lies over the pixels the
teacher's patch (r, c) saw.

Pure matplotlib (Agg backend), no teacher, no open_clip: only the cache is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cache import open_cache
from .datasets import resolve_image
from .images import expand2square, load_image

# Figure geometry (inches at DPI): fixed so the PNG's pixel size is predictable.
PANEL_W, PANEL_H, TITLE_H, DPI = 4.0, 3.6, 0.5, 100
RANDOM_INIT_NOTE = "random-init: NOT real targets"


def teacher_view(image: Image.Image, preprocessing: dict) -> Image.Image:
    """An RGB image -> the image_size x image_size RGB picture the teacher was fed
    (before normalisation), following the cache group's `preprocessing` metadata."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    size = int(preprocessing["image_size"])
    interp = (InterpolationMode.BILINEAR if preprocessing.get("interpolation") == "bilinear"
              else InterpolationMode.BICUBIC)  # open_clip: bicubic unless told bilinear
    mode = preprocessing.get("resize_mode") or "shortest"
    img = image.convert("RGB")
    if preprocessing.get("pad_to_square"):
        mean = preprocessing.get("mean") or (0.0, 0.0, 0.0)
        img = expand2square(img, tuple(int(255 * m) for m in mean))  # as build_cache pads
    if mode == "squash":
        return TF.resize(img, [size, size], interpolation=interp)
    if mode == "longest":  # open_clip ResizeKeepRatio(longest=1) + CenterCropOrPad(fill 0)
        w, h = img.size
        ratio = max(h / size, w / size)
        img = TF.resize(img, [round(h / ratio), round(w / ratio)], interpolation=interp)
        return TF.center_crop(img, [size, size])
    if mode != "shortest":
        raise ValueError(f"unknown resize_mode {mode!r} in the cache's preprocessing metadata")
    img = TF.resize(img, size, interpolation=interp)
    return TF.center_crop(img, [size, size])


def upsample_map(values, grid: int, size: int) -> np.ndarray:
    """A row-major grid x grid map [grid*grid] -> [size, size], bilinear (align_corners=False)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float32)).view(1, 1, grid, grid)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def parse_patch(patch: int | None, patch_xy: str | tuple | None, grid: int) -> int | None:
    """--patch I (row-major index) or --patch-xy x,y (column x, row y, 0-based) on a
    grid x grid map -> index, or None for "not given"."""
    if patch is not None and patch_xy is not None:
        raise ValueError("give --patch or --patch-xy, not both")
    if patch_xy is not None:
        try:
            x, y = (int(v) for v in (patch_xy.split(",") if isinstance(patch_xy, str) else patch_xy))
        except (TypeError, ValueError):
            raise ValueError(f"--patch-xy must be 'x,y' (column, row), got {patch_xy!r}") from None
        if not (0 <= x < grid and 0 <= y < grid):
            raise ValueError(f"--patch-xy {x},{y} is outside the {grid}x{grid} grid (0..{grid - 1})")
        return y * grid + x
    if patch is not None and not 0 <= patch < grid * grid:
        raise ValueError(f"--patch {patch} is outside the {grid}x{grid} grid (0..{grid * grid - 1})")
    return patch


@dataclass
class ShowResult:
    out: Path
    grid: int
    patches: list[int]          # the similarity row shown, per key
    size: tuple[int, int]       # PNG width, height in pixels
    panels: dict                # (row, column) -> (left, top, right, bottom) of each map panel, PNG pixels


def overlay(ax, picture: np.ndarray, heat: np.ndarray, *, cmap="jet", alpha=0.5, vmin=None, vmax=None,
            label: str = ""):
    """Draw `picture` [H, W, 3] with `heat` [H, W] alpha-blended on top, plus a colour bar."""
    ax.imshow(picture)
    im = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    if label:
        bar.set_label(label, fontsize=7)
    return im


def show_targets(cache, teacher: str, image_root, keys, out, *, patch: int | None = None,
                 patch_xy=None, grid: int | None = None) -> ShowResult:
    """Render the figure described in the module docstring to `out` (PNG).

    Without patch/patch_xy each row shows the similarity row of the patch the teacher
    attends to most (the attention map's argmax), the most telling one to look at.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    keys = list(keys)
    if not keys:
        raise ValueError("give at least one --key")
    group = open_cache(cache)[teacher]
    md = group.metadata
    g = int(grid) if grid else group.native_grid
    if g < 1:
        raise ValueError(f"--grid must be >= 1, got {grid}")
    fixed = parse_patch(patch, patch_xy, g)
    size = int(md["preprocessing"]["image_size"])

    rows = len(keys)
    fig, axes = plt.subplots(rows, 2, figsize=(2 * PANEL_W, rows * PANEL_H + TITLE_H), dpi=DPI, squeeze=False,
                             layout="constrained")
    title = f"teacher {md.get('teacher', group.name)} ({md.get('arch')}), group {group.name}, "
    title += f"native grid {group.native_grid}" + (f", shown at grid {g}" if g != group.native_grid else "")
    random_init = bool(md.get("random_init"))
    if random_init:
        title += f"\n{RANDOM_INIT_NOTE}"
    fig.suptitle(title, fontsize=10, color="crimson" if random_init else "black")
    chosen = []
    for r, key in enumerate(keys):
        sim, attn = group.targets(key, g) if g != group.native_grid else group.native(key)
        if g == group.native_grid:
            attn = attn / attn.max()  # the same scaling the training targets get
        sim, attn = sim.numpy(), attn.numpy()
        picture = np.asarray(teacher_view(load_image(resolve_image(image_root, key)), md["preprocessing"]))
        p = int(np.argmax(attn)) if fixed is None else fixed
        chosen.append(p)

        ax = axes[r, 0]
        overlay(ax, picture, upsample_map(attn, g, size), vmin=0.0, vmax=1.0, label="attention / max")
        ax.set_title(f"{key}\nCLS attention", fontsize=8)

        ax = axes[r, 1]
        row = sim[p]
        others = np.delete(row, p)
        overlay(ax, picture, upsample_map(row, g, size), vmin=float(others.min()), vmax=float(others.max()),
                label="cosine to marked patch")
        cell = size / g
        py, px = divmod(p, g)
        ax.add_patch(Rectangle((px * cell - 0.5, py * cell - 0.5), cell, cell, fill=False, edgecolor="white",
                               linewidth=1.5))
        ax.plot([(px + 0.5) * cell - 0.5], [(py + 0.5) * cell - 0.5], marker="x", color="white", markersize=6)
        ax.set_title(f"similarity of patch {p} (x={px}, y={py})", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    height = fig.bbox.height
    panels = {}
    for (r, c), ax in np.ndenumerate(axes):
        b = ax.get_window_extent()
        panels[(r, c)] = (math.ceil(b.x0), math.ceil(height - b.y1), math.floor(b.x1), math.floor(height - b.y0))
    plt.close(fig)
    with Image.open(out) as im:
        shape = im.size
    return ShowResult(out=out, grid=g, patches=chosen, size=shape, panels=panels)


__all__ = ["RANDOM_INIT_NOTE", "ShowResult", "parse_patch", "show_targets", "teacher_view", "upsample_map"]
