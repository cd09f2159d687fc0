"""Where the student looks, measured against region masks (`medalign-distill eval --masks`).

A mask marks the region a question is about (a lesion, an organ: SLAKE ships organ masks,
the grounding example writes lesion masks). For each evaluated image that has one, the
score is the share of the student's prompt-to-image attention at the run's layer (head-
and prompt-row-averaged, as L_att reads it) that falls inside the region:

    in_mask = sum_v a_v f_v / sum_v a_v

with f_v the fraction of visual token v's patch covered by the mask. The mask is carried
through the same geometry as the image (padded to square if the run pads, then the
student processor's resize and centre crop), then averaged over each patch, so f is
exact up to the processor's interpolation. `chance` is the mask's share of the image
(mean f): what a uniform attention map would score.

Masks file: an .npz of 2-D arrays (nonzero = inside) at each image's own resolution,
keyed by image key (the path relative to --image-root; "/" may be written "__", since
some tools cannot store it in an npz name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image

from precompute.images import expand2square


class MaskError(ValueError):
    """A masks file that cannot be used; the message names it and the fix."""


def load_masks(path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            masks = {k.replace("__", "/"): np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise MaskError(f"{path}: not a readable .npz of masks ({e}); write one with numpy.savez({{key: mask}})")
    bad = [k for k, m in masks.items() if m.ndim != 2]
    if bad:
        raise MaskError(f"{path}: masks must be 2-D (height x width), got {masks[bad[0]].shape} for {bad[0]!r}")
    return masks


def mask_on_grid(mask: np.ndarray, image_processor, pad_to_square: bool, grid: int) -> np.ndarray:
    """[H, W] mask -> [grid * grid] patch coverage, through the student's image geometry."""
    img = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8) * 255).convert("RGB")
    if pad_to_square:
        img = expand2square(img, (0, 0, 0))
    pixels = image_processor(img, do_normalize=False, return_tensors="pt")["pixel_values"][0, 0]
    cover = F.adaptive_avg_pool2d(pixels.clamp(0, 1)[None, None].float(), grid)
    return cover.reshape(-1).numpy()


def attention_in_mask(attention: np.ndarray, cover: np.ndarray) -> float:
    a = np.clip(np.asarray(attention, dtype=np.float64), 0, None)
    return float((a * cover).sum() / max(a.sum(), 1e-12))


def summarize(rows: list[dict], layer: int, masks_path) -> dict:
    """metrics.json's `grounding`: means over the questions whose image has a non-empty mask."""
    scored = [r["grounding"] for r in rows if r.get("grounding") is not None]
    return {"n": len(scored), "layer": layer, "masks": str(masks_path),
            "attention_in_mask": float(np.mean([g["in_mask"] for g in scored])) if scored else None,
            "chance": float(np.mean([g["chance"] for g in scored])) if scored else None}
