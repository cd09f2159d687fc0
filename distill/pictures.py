"""Pictures of a finished run: what the student looks at before and after
distillation, how the losses went, and how the images' features cluster (the
paper's Figure 1). Like eval, it refuses a run without RUN/finished.json (an
interrupted one: its checkpoints are a resume's starting point, not a result).

    medalign-distill pictures --run runs/unimed-l20 --data test.json --image-root images/ --out pics/

writes to the output folder:

attention.png   one row per sample: the image as the student saw it | the teacher's
                attention target a_t (the cache named by RUN/config.json, resized exactly
                to the student's grid, as the loss uses it) | the student's prompt-text ->
                visual attention at decoder layer l BEFORE training (the base model, no
                adapter, alignment transform off) | AFTER training (LoRA adapter +
                alignment transform of the run). Each map is divided by its max and
                bilinearly upsampled over the image; student panels give the cosine of
                their map with the teacher's (1 = same shape).
loss_curves.png distill.train.plot_loss_curves on RUN/metrics.jsonl.
tsne.png        a 2-D t-SNE (PCA when scikit-learn is missing or there are < 5 images)
                of one vector per image, coloured by a label per image, three panels:
                  teacher   the image's native patch-similarity matrix S (its strict upper
                            triangle). The cache keeps S and the CLS attention, not the
                            teacher's features; S = F F^T determines the L2-normalised patch
                            features F up to a rotation of feature space, so it is the most
                            complete rotation-invariant descriptor of the teacher's
                            representation the cache holds, and it is exactly what L_vis
                            distils. (Eigenvectors of S are not comparable across images:
                            sign and order flip.) `teacher_embedding="attention"` uses the
                            flattened attention map (a / max) instead.
                  student before / after  mean over the visual tokens of the (aligned)
                            hidden states at decoder layer l-1, where the alignment
                            transform acts; before = base model, after = adapter + transform.
                Each vector set is centred across images and L2-normalised per image
                (mean-pooled LLM states share a large common component that would
                otherwise dominate every distance). Panel titles give the leave-one-out
                1-nearest-neighbour label agreement in that (un-projected) space: a number
                that does not depend on t-SNE's randomness.
pictures.json   what was drawn: keys, labels, per-sample cosines, embedding method.

Labels (`label_by`): "answer" = the answer of the image's first closed question
(answer_type closed, or a yes/no answer when the file has no answer types); "folder" =
the image key's parent folder; "field" = a field of the dataset file's rows
(`label_field`), matched to records by id; "auto" = answer when closed questions exist,
else folder when the images sit in several folders, else the first answer.
Only the 10 most frequent labels get their own colour; the rest are "other".

The teacher is never loaded: its targets come from the cache, like in training.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from precompute.cache import open_cache
from precompute.datasets import Record, load_records

from .config import RunConfig
from .data import DistillDataset, make_collate, record_images
from .inference import load_medalign
from .rundir import require_finished
from .student import (AlignmentTransform, DistillTap, StudentError, load_adapter, load_alignment)

log = logging.getLogger("medalign.distill")

PANEL, TITLE_H, DPI = 3.0, 0.6, 100
MAX_LABELS = 10


class PicturesError(ValueError):
    """Pictures cannot be made as asked; the message says why and what to do."""


@dataclass
class PicturesResult:
    out: Path
    files: dict[str, Path]
    keys: list[str]                         # the samples of attention.png
    labels: dict[str, str]                  # image key -> label (t-SNE colours)
    method: str                             # "t-SNE" or "PCA"
    knn_agreement: dict[str, float | None] = field(default_factory=dict)
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # teacher/before/after [len(keys), V]
    panels: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    # attention.png's map panels (row, column) -> (left, top, right, bottom) in PNG pixels


# ----------------------------------------------------------------------------- run + data

def _run_config(run: Path, cache) -> RunConfig:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise PicturesError(f"{run} is not a run directory (no config.json); point --run at the --out of "
                            f"`medalign-distill run`")
    d = json.loads(path.read_text())
    d["resume"] = False
    if cache is not None:
        d["cache"] = str(cache)
    return RunConfig.from_dict(d)


def _trained_parts(run: Path) -> tuple[Path, Path | None, str]:
    """(adapter dir, alignment dir or None, where from) of a finished run."""
    run = Path(run)
    require_finished(run, "draw its pictures")
    alignment = run / "alignment"
    return run / "adapter", (alignment if (alignment / "alignment_config.json").is_file() else None), "final adapter"


def _raw_rows(path: Path, split: str | None) -> list[dict]:
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):  # R2Gen-style {"train": [...], ...}
        data = data.get(split) if split else [r for rows in data.values() if isinstance(rows, list) for r in rows]
    return [r for r in (data or []) if isinstance(r, dict)]


def _field_labels(path: Path, split: str | None, name: str) -> dict[str, str]:
    """record id -> str(row[name]); a row's id is its id/qid/question_id field or its position."""
    out = {}
    for i, row in enumerate(_raw_rows(path, split)):
        if name not in row:
            continue
        ids = [str(row[k]) for k in ("id", "qid", "question_id") if row.get(k) not in (None, "")] or [str(i)]
        for rid in ids:
            out.setdefault(rid, str(row[name]))
    return out


def _is_closed(r: Record) -> bool:
    if r.answer_type is not None:
        return r.answer_type == "closed"
    return bool(r.turns) and r.turns[0][1].strip().lower() in ("yes", "no")


def image_labels(images: list[str], by_image: dict[str, list[Record]], label_by: str = "auto",
                 field_values: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """One label per image key (see the module docstring); returns (labels, the rule used)."""
    if label_by == "auto":
        if any(_is_closed(r) for k in images for r in by_image[k]):
            label_by = "answer"
        elif len({posixpath.dirname(k) for k in images}) > 1:
            label_by = "folder"
        else:
            label_by = "first-answer"
    labels = {}
    for k in images:
        recs = by_image[k]
        if label_by == "answer":
            closed = [r for r in recs if _is_closed(r)]
            labels[k] = closed[0].turns[0][1].strip().lower() if closed else "(no closed question)"
        elif label_by == "folder":
            labels[k] = posixpath.dirname(k) or "(root)"
        elif label_by == "field":
            values = [field_values[r.id] for r in recs if r.id in (field_values or {})]
            labels[k] = values[0] if values else "(missing)"
        elif label_by == "first-answer":
            labels[k] = recs[0].turns[0][1].strip().lower()[:30]
        else:
            raise PicturesError(f"unknown label rule {label_by!r} (auto, answer, folder, field)")
    top = {lab for lab, _ in Counter(labels.values()).most_common(MAX_LABELS)}
    return {k: (v if v in top else "other") for k, v in labels.items()}, label_by


# ----------------------------------------------------------------------------- the student's view

@torch.no_grad()
def student_pass(student, tap: DistillTap, dataset, collate, device, batch_size: int):
    """Every image of every sample once: (attention [N, V] at layer l, mean aligned visual
    state [N, D] at l-1), N images in sample order."""
    model = student.model
    model.eval()
    atts, feats = [], []
    for lo in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
        tap.set_batch(batch["visual_index"].to(device), batch["query_mask"].to(device), batch["image_rows"].to(device))
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
              pixel_values=batch["pixel_values"].to(device, dtype=model.dtype))
        atts.append(tap.visual_attention.float().cpu())
        feats.append(tap.aligned_visual.float().mean(1).cpu())
    return torch.cat(atts).numpy(), torch.cat(feats).numpy()


def _student_picture(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """pixel_values [3, H, W] -> the RGB picture [H, W, 3] in [0, 1] the student saw."""
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or [0.0] * 3).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", None) or [1.0] * 3).view(3, 1, 1)
    return (pixels.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- embeddings

def _prepare(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(0, keepdims=True)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _pca(X: np.ndarray, k: int) -> np.ndarray:
    U, s, _ = np.linalg.svd(X - X.mean(0, keepdims=True), full_matrices=False)
    Y = U[:, :k] * s[:k]
    if Y.shape[1] < k:
        Y = np.pad(Y, ((0, 0), (0, k - Y.shape[1])))
    return Y


def embed_2d(X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """[N, d] -> ([N, 2], "t-SNE" | "PCA"). Input as `_prepare` leaves it."""
    n = X.shape[0]
    if n < 5:
        return _pca(X, 2), "PCA"
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return _pca(X, 2), "PCA"
    Z = _pca(X, min(50, n - 1, X.shape[1]))  # the usual PCA-50 before t-SNE; also makes it fast
    # exact gradients up to 1000 images: O(n^2) but no OpenMP (Barnes-Hut's threads crawl on a busy CPU)
    tsne = TSNE(n_components=2, perplexity=float(min(30.0, max(2.0, (n - 1) / 3))), init="pca",
                random_state=seed, learning_rate="auto", method="exact" if n <= 1000 else "barnes_hut")
    return tsne.fit_transform(Z.astype(np.float32)), "t-SNE"


def knn_agreement(X: np.ndarray, labels: list[str]) -> float | None:
    """Leave-one-out 1-NN label agreement (cosine on `_prepare`d rows); None if it says nothing."""
    if len(set(labels)) < 2 or len(labels) < 3:
        return None
    sim = X @ X.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(1)
    lab = np.asarray(labels)
    return float((lab[nn] == lab).mean())


# ----------------------------------------------------------------------------- figures

def _heat(ax, picture, values, grid, title, vmax=1.0):
    from precompute.show import upsample_map
    size = picture.shape[0]
    ax.imshow(picture)
    im = ax.imshow(upsample_map(values, grid, size), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=6)
    bar.set_label("value / max", fontsize=6)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _boxes(fig, axes) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Each axes' image area in the saved PNG's pixels (left, top, right, bottom); call after savefig."""
    height = fig.bbox.height
    out = {}
    for (r, c), ax in np.ndenumerate(axes):
        b = ax.get_window_extent()
        out[(r, c)] = (math.ceil(b.x0), math.ceil(height - b.y1), math.floor(b.x1), math.floor(height - b.y0))
    return out


def _panels(rows: int, cols: int, header: str):
    """(pyplot, figure, axes [rows, cols]) of PANEL-sized panels under a header."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL + 0.8, rows * PANEL + TITLE_H), dpi=DPI,
                             squeeze=False, layout="constrained")
    fig.suptitle(header, fontsize=9)
    return plt, fig, axes


def _picture(ax, picture, title: str, fontsize: int = 8) -> None:
    ax.imshow(picture)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=fontsize)


def attention_figure(out: Path, rows: list[dict], grid: int, header: str) -> dict:
    """Writes the PNG; returns the panel boxes (see `_boxes`)."""
    plt, fig, axes = _panels(len(rows), 4, header)
    for r, row in enumerate(rows):
        _picture(axes[r, 0], row["picture"], f"{row['key']}\n{row['question'][:40]}")
        _heat(axes[r, 1], row["picture"], row["teacher"], grid, "teacher a_t (target)")
        _heat(axes[r, 2], row["picture"], row["before"] / row["before"].max(), grid,
              f"student before, layer {row['layer']}\ncos to teacher {row['cos_before']:.3f}")
        _heat(axes[r, 3], row["picture"], row["after"] / row["after"].max(), grid,
              f"student after, layer {row['layer']}\ncos to teacher {row['cos_after']:.3f}")
    fig.savefig(out, dpi=DPI)
    boxes = _boxes(fig, axes)
    plt.close(fig)
    return boxes


def answer_figure(out: Path, rows: list[dict], grid: int, header: str) -> None:
    """predict's picture: per image, the image (titled with question and answer), the
    teacher's target where the cache holds it, the student's attention at the run's layer."""
    plt, fig, axes = _panels(len(rows), 3, header)
    for r, row in enumerate(rows):
        _picture(axes[r, 0], row["picture"], f"{row['key']}\nQ: {row['question'][:40]}\nA: {row['answer'][:40]}", 7)
        if row["teacher"] is not None:
            _heat(axes[r, 1], row["picture"], row["teacher"], grid, "teacher a_t (cache)")
        else:
            axes[r, 1].axis("off")
            axes[r, 1].text(0.5, 0.5, "not in the run's cache", ha="center", va="center", fontsize=8)
        title = f"student attention, layer {row['layer']}"
        if row["teacher"] is not None:
            title += f"\ncos to teacher {_cos(row['student'], row['teacher']):.3f}"
        _heat(axes[r, 2], row["picture"], row["student"], grid, title)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def tsne_figure(out: Path, panels: list[tuple[str, np.ndarray, float | None]], labels: list[str],
                method: str, header: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [lab for lab, _ in Counter(labels).most_common()]
    if "other" in names:  # "other" last, grey
        names = [x for x in names if x != "other"] + ["other"]
    cmap = plt.get_cmap("tab10")
    colour = {lab: ("0.6" if lab == "other" else cmap(i % 10)) for i, lab in enumerate(names)}
    lab = np.asarray(labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2 + TITLE_H), dpi=DPI,
                             squeeze=False, layout="constrained")
    fig.suptitle(header, fontsize=9)
    for ax, (title, Y, agree) in zip(axes[0], panels):
        for name in names:
            m = lab == name
            ax.scatter(Y[m, 0], Y[m, 1], s=18, color=colour[name], label=name, edgecolors="none")
        extra = f"\n1-NN label agreement {agree:.2f}" if agree is not None else ""
        ax.set_title(f"{title} ({method}){extra}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=7, loc="best", frameon=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- the whole thing

def make_pictures(run, data, image_root, out, *, keys: list[str] | None = None, n: int = 4,
                  fmt: str = "auto", split: str | None = None, lang: str = "en", label_by: str = "auto",
                  label_field: str | None = None, tsne_n: int = 256, teacher_embedding: str = "similarity",
                  batch_size: int = 8, device: str = "auto", cache=None) -> PicturesResult:
    from distill.train import plot_loss_curves

    run, out = Path(run), Path(out)
    if teacher_embedding not in ("similarity", "attention"):
        raise PicturesError(f"teacher_embedding must be 'similarity' or 'attention', got {teacher_embedding!r}")
    if label_field is not None:
        label_by = "field"
    elif label_by == "field":
        raise PicturesError("label_by 'field' needs --label-field NAME")
    config = _run_config(run, cache)
    if not config.distill:
        raise PicturesError(f"run {run} trained without distillation (alpha = beta = 0): it names no teacher "
                            f"cache to compare with")
    adapter_dir, alignment_dir, where = _trained_parts(run)

    # ---- which images
    records = [r for r in load_records(data, image_root, fmt=fmt, split=split, lang=lang) if r.turns]
    if not records:
        raise PicturesError(f"{data}: no records with a question/answer (the student needs a prompt)")
    by_image: dict[str, list[Record]] = {}   # image key -> the records that show it to the student
    for r in records:
        for k in record_images(r, config.images):
            by_image.setdefault(k, []).append(r)
    group = open_cache(config.cache)[config.teacher]
    usable = [k for k in by_image if k not in set(group.missing(list(by_image)))]
    if keys:
        unknown = [k for k in keys if k not in by_image]
        if unknown:
            raise PicturesError(f"{unknown} are not images of {data} (keys are image paths relative to "
                                f"--image-root, e.g. {next(iter(by_image))!r})")
        missing = group.missing(keys)
        if missing:
            raise PicturesError(f"{missing} have no finished target in cache group {group.name!r}; build them "
                                f"with `medalign-cache build`")
        shown = list(dict.fromkeys(keys))
    else:
        shown = usable[:n]
    if not shown:
        raise PicturesError(f"none of the images of {data} has a finished target in cache group {group.name!r}")
    images = list(dict.fromkeys(shown + usable[:max(tsne_n, 0)]))
    field_values = _field_labels(data, split, label_field) if label_field else None
    labels, rule = image_labels(images, by_image, label_by, field_values)

    # ---- the student, before and after
    # the base student as every command loads it: template, geometry, image mode and storage of the run
    base = load_medalign(run, base_only=True, device=device, precision=config.precision, quantize=config.quantize)
    student, dev = base.student, base.device
    if student.num_layers <= config.layer:
        raise PicturesError(f"layer {config.layer} of the run does not exist in {base.info['student_path']}")
    first = [by_image[k][0] for k in images]  # the prompt each image is shown with (with its record's others)
    dataset = DistillDataset(first, image_root, student.processor, student.num_visual_tokens, config.max_length,
                             None, base.pad_to_square, images=config.images)
    pad_id = student.processor.tokenizer.pad_token_id
    collate = make_collate(pad_id if pad_id is not None else 0, student.image_token_id, student.num_visual_tokens)
    # student_pass returns one row per image shown; image k's row in its record's prompt:
    starts = np.cumsum([0] + [len(record_images(r, config.images)) for r in first])
    row_of = [int(starts[i]) + record_images(r, config.images).index(k) for i, (k, r) in enumerate(zip(images, first))]

    identity = AlignmentTransform(student.hidden_size).to(dev)  # W = 0: X~ = X, only to read X at l-1
    tap = DistillTap(student, config.layer, identity, capture_attention=True)
    att_before, feat_before = (x[row_of] for x in student_pass(student, tap, dataset, collate, dev, batch_size))
    tap.remove()

    student.model = load_adapter(student.model, adapter_dir)
    transform = identity
    if alignment_dir is not None:
        transform = load_alignment(alignment_dir).to(dev)
        if transform.layer is not None and transform.layer != config.layer:
            raise StudentError(f"{alignment_dir} was trained for layer {transform.layer}, the run says "
                               f"{config.layer}")
    tap = DistillTap(student, config.layer, transform, capture_attention=True)
    att_after, feat_after = (x[row_of] for x in student_pass(student, tap, dataset, collate, dev, batch_size))
    tap.remove()

    # ---- teacher
    G = student.grid
    teacher_attn, teacher_vec = [], []
    for k in images:
        _, a_t = group.targets(k, G) if k in shown else (None, None)
        teacher_attn.append(a_t)
        sim, attn = group.native_packed(k, similarity=teacher_embedding == "similarity",
                                        attention=teacher_embedding == "attention")
        teacher_vec.append(np.asarray(sim, dtype=np.float32) if teacher_embedding == "similarity"
                           else np.asarray(attn, dtype=np.float32) / float(np.max(attn)))
    out.mkdir(parents=True, exist_ok=True)
    md = group.metadata
    fake = " [random-init teacher: NOT real targets]" if md.get("random_init") else ""
    header = (f"run {run.name}: teacher {md.get('teacher', group.name)}{fake}, student {config.student}, "
              f"layer {config.layer}, after = {where}")

    # ---- (a) attention side by side
    rows, summary = [], []
    index = {k: i for i, k in enumerate(images)}
    for k in shown:
        i = index[k]
        t = teacher_attn[i].numpy()
        row = {"key": k, "question": by_image[k][0].turns[0][0].replace("\n", " "), "layer": config.layer,
               "picture": _student_picture(dataset.pixels(k), student.processor.image_processor),
               "teacher": t / t.max(), "before": att_before[i], "after": att_after[i],
               "cos_before": _cos(att_before[i], t), "cos_after": _cos(att_after[i], t)}
        rows.append(row)
        summary.append({"key": k, "cos_before": row["cos_before"], "cos_after": row["cos_after"]})
    files = {"attention": out / "attention.png"}
    boxes = attention_figure(files["attention"], rows, G, header)

    # ---- (b) loss curves
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        files["loss_curves"] = out / "loss_curves.png"
        plot_loss_curves(metrics, files["loss_curves"])
    else:
        log.warning("run %s has no metrics.jsonl yet: no loss curves", run)

    # ---- (c) t-SNE
    lab = [labels[k] for k in images]
    panels, agreement, method = [], {}, "PCA"
    for name, X in (("teacher: patch-similarity S" if teacher_embedding == "similarity"
                     else "teacher: attention map", np.stack(teacher_vec)),
                    (f"student before: mean visual state, layer {config.layer - 1}", feat_before),
                    (f"student after: mean aligned state, layer {config.layer - 1}", feat_after)):
        Xp = _prepare(X)
        Y, method = embed_2d(Xp)
        agree = knn_agreement(Xp, lab)
        agreement[name.split(":")[0]] = agree
        panels.append((name, Y, agree))
    files["tsne"] = out / "tsne.png"
    tsne_figure(files["tsne"], panels, lab, method,
                f"{header}\n{len(images)} images, colour = {rule}" + (f" {label_field!r}" if label_field else ""))

    (out / "pictures.json").write_text(json.dumps({
        "run": str(run), "after": where, "layer": config.layer, "student_grid": G, "teacher_group": group.name,
        "samples": summary, "embedding": method, "teacher_embedding": teacher_embedding, "label_rule": rule,
        "labels": labels, "knn_agreement": agreement,
        "files": {k: str(v) for k, v in files.items()}}, indent=2) + "\n")
    files["summary"] = out / "pictures.json"
    return PicturesResult(out=out, files=files, keys=shown, labels=labels, method=method,
                          knn_agreement=agreement, panels=boxes,
                          attention={name: np.stack([row[name] for row in rows]) for name in
                                     ("teacher", "before", "after")})


__all__ = ["PicturesError", "PicturesResult", "answer_figure", "attention_figure", "embed_2d", "image_labels",
           "knn_agreement", "make_pictures", "student_pass", "tsne_figure"]
