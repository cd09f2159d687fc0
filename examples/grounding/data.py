"""A seeded synthetic, medical-looking grounding dataset.

Each image is a 112 x 112 grayscale "scan": smooth low-frequency noise inside an
elliptical body with a bright outline, and (in most images) one small lesion somewhere
inside the body, in one of four quadrants, of one of three types:

    bright   a round bright nodule
    ring     a ring-enhancing lesion (bright rim, dark centre)
    dark     a dark, hypodense cyst

Questions (LLaVA json, one question per record, several records per image):
    "Is there a lesion in this scan?"            yes / no             closed
    "In which quadrant is the lesion?"           upper left / ...     open   (lesion images)
    "What type of lesion is seen?"               bright nodule / ...  open   (lesion images)

A short report per image ("a ring enhancing lesion in the lower right quadrant.") is
what the teacher CLIP is trained on. The ground-truth lesion masks are saved to
masks.npz for MEASUREMENT only: nothing in training reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 112
TYPES = ("bright", "ring", "dark")
TYPE_WORDS = {"bright": "bright nodule", "ring": "ring lesion", "dark": "dark cyst"}
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
Q_PRESENT = "Is there a lesion in this scan?"
Q_WHERE = "In which quadrant is the lesion?"
Q_TYPE = "What type of lesion is seen?"


@dataclass
class Case:
    key: str
    image: np.ndarray          # [112, 112] uint8
    mask: np.ndarray           # [112, 112] bool (all False without a lesion)
    lesion: str | None         # a TYPES entry or None
    quadrant: str | None
    report: str


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a cells x cells random grid, bicubically upsampled."""
    low = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(low).resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def report_for(lesion: str | None, quadrant: str | None, rng: np.random.Generator) -> str:
    if lesion is None:
        return str(rng.choice(["no focal lesion is seen.", "normal scan without a lesion.",
                               "no lesion is seen in this scan."]))
    lead = str(rng.choice(["there is a", "scan shows a", "a"]))
    return f"{lead} {TYPE_WORDS[lesion]} in the {quadrant} quadrant."


def make_case(rng: np.random.Generator, key: str, p_lesion: float = 0.75) -> Case:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    c = SIZE / 2 + rng.normal(0, 2, size=2)
    ry, rx = rng.uniform(44, 52), rng.uniform(40, 52)
    r_body = ((yy - c[0]) / ry) ** 2 + ((xx - c[1]) / rx) ** 2
    body = r_body <= 1.0
    tissue = 0.30 + 0.18 * _smooth_noise(rng, 6) + 0.08 * _smooth_noise(rng, 14)
    img = np.where(body, tissue, 0.04 + 0.03 * _smooth_noise(rng, 4))
    img = np.where(np.abs(np.sqrt(r_body) - 1.0) < 0.035, 0.85, img)          # the body outline

    mask = np.zeros((SIZE, SIZE), dtype=bool)
    lesion = quadrant = None
    if rng.random() < p_lesion:
        lesion = str(rng.choice(TYPES))
        qi = int(rng.integers(4))
        quadrant = QUADRANTS[qi]
        r = rng.uniform(10, 14)
        # centre inside the quadrant, away from the midlines and inside the body
        for _ in range(100):
            oy = rng.uniform(r + 4, 36)
            ox = rng.uniform(r + 4, 36)
            ly = c[0] + (-oy if qi in (0, 1) else oy)
            lx = c[1] + (-ox if qi in (0, 2) else ox)
            if ((ly - c[0]) / (ry - r - 3)) ** 2 + ((lx - c[1]) / (rx - r - 3)) ** 2 <= 1.0:
                break
        d = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
        mask = d <= r
        soft = np.clip(r + 0.5 - d, 0.0, 1.0)                               # anti-aliased disc
        if lesion == "bright":
            img = img * (1 - soft) + soft * (0.85 + 0.1 * (1 - d / r).clip(0, 1))
        elif lesion == "dark":
            img = img * (1 - soft) + soft * 0.07
        else:
            rim = np.clip(1.0 - np.abs(d - 0.75 * r) / (0.25 * r + 0.5), 0.0, 1.0)
            img = img * (1 - soft) + soft * 0.12
            img = img * (1 - rim) + rim * 0.9
    img = img + rng.normal(0, 0.025, size=img.shape)
    image = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Case(key, image, mask, lesion, quadrant, report_for(lesion, quadrant, rng))


def questions(case: Case) -> list[dict]:
    rows = [(Q_PRESENT, "yes" if case.lesion else "no", "closed", "present")]
    if case.lesion:
        rows += [(Q_WHERE, case.quadrant, "open", "where"), (Q_TYPE, TYPE_WORDS[case.lesion], "open", "type")]
    return [{"id": f"{Path(case.key).stem}-{kind}", "image": case.key, "answer_type": atype, "kind": kind,
             "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
            for q, a, atype, kind in rows]


def generate_cases(n: int, seed: int, prefix: str) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [make_case(rng, f"{prefix}/{prefix}_{i:04d}.png") for i in range(n)]


def write_dataset(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Images under root/images, train.json / test.json (LLaVA), reports.json, masks.npz."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": generate_cases(n_train, seed, "train"), "test": generate_cases(n_test, seed + 1, "test")}
    masks, reports, meta = {}, {}, {}
    for split, cases in splits.items():
        (root / "images" / split).mkdir(exist_ok=True)
        rows = []
        for case in cases:
            Image.fromarray(case.image, mode="L").save(root / "images" / case.key)
            masks[case.key] = case.mask
            reports[case.key] = case.report
            meta[case.key] = {"lesion": case.lesion, "quadrant": case.quadrant, "split": split}
            rows += questions(case)
        (root / f"{split}.json").write_text(json.dumps(rows, indent=1) + "\n")
    np.savez_compressed(root / "masks.npz", **{k.replace("/", "__"): v for k, v in masks.items()})
    (root / "reports.json").write_text(json.dumps(reports, indent=1) + "\n")
    (root / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {"root": root, "image_root": root / "images", "train": root / "train.json", "test": root / "test.json",
            "masks": root / "masks.npz", "n_train_images": n_train, "n_test_images": n_test}


def mask_on_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """Fraction of each of grid x grid cells covered by the mask (area-exact for any grid)."""
    n = mask.shape[0]
    up = np.kron(mask.astype(np.float32), np.ones((grid, grid), dtype=np.float32))    # [n*grid, n*grid]
    return up.reshape(grid, n, grid, n).mean(axis=(1, 3)).reshape(-1)
