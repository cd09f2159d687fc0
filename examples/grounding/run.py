"""A small, honest grounding experiment for MedAlign, end to end on a laptop CPU.

    .venv/bin/python examples/grounding/run.py                 # full: 3 seeds, ~11 min on 2 CPU cores (2 runs at a time)
    .venv/bin/python examples/grounding/run.py --fast          # smoke: 1 seed, few steps, < 40 s

1. data.py writes a seeded synthetic dataset (scans with a lesion, VQA, reports, masks).
2. teacher.py trains a tiny CLIP (the `tiny` teacher's exact vision tower + bag-of-words
   text tower) contrastively on image-report pairs of its own; the cache is then built by
   the normal path: precompute.build.build_cache(teacher="tiny", checkpoint=teacher.pt).
3. A tiny random LLaVA student is fine-tuned with distill.train.train, four ways
   (baseline alpha=beta=0, alpha only, beta only, both), for each seed.
4. Each run is evaluated on the test split: answers via distill.evaluate.evaluate (the
   `medalign-distill eval` path); grounding = share of the student's prompt->visual
   attention at layer l (DistillTap capture) inside the ground-truth lesion mask; and the
   similarity-structure error = MSE between the student's visual-token cosine matrix at
   layer l-1 (after the alignment transform, if any) and the teacher's S_t.
Writes OUT/results.json, OUT/table.md, OUT/attention.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import data as D  # noqa: E402
import teacher as T  # noqa: E402
from distill.config import RunConfig  # noqa: E402
from distill.data import DistillDataset, make_collate  # noqa: E402
from distill.evaluate import evaluate, headline  # noqa: E402
from distill.grounding import attention_in_mask, load_masks  # noqa: E402
from distill.inference import load_medalign  # noqa: E402
from distill.losses import cosine_similarity_matrix  # noqa: E402
from distill.metrics import normalize_answer  # noqa: E402
from distill.student import AlignmentTransform, DistillTap  # noqa: E402
from distill.train import train  # noqa: E402
from precompute import open_cache  # noqa: E402
from precompute.build import BuildConfig, build_cache  # noqa: E402
from precompute.datasets import load_records  # noqa: E402

CONFIGS = {  # name -> (alpha, beta)
    "baseline": (0.0, 0.0),
    "alpha": (1.0, 0.0),
    "beta": (0.0, 1.0),
    "alpha+beta": (1.0, 1.0),
}
LAYER = 2
LR = 5e-3

FULL = dict(n_train=400, n_test=100, teacher_images=2000, teacher_steps=800, student_steps=800, seeds=3)
FAST = dict(n_train=48, n_test=16, teacher_images=400, teacher_steps=150, student_steps=12, seeds=1)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- measurement

@torch.no_grad()
def measure_run(em, test_json: Path, image_root: Path, group, masks: dict) -> dict:
    """Grounding and similarity-structure error of a trained run on the test split.

    `em`: the run as `medalign-distill eval` loads it (base + adapter + its own alignment
    transform, `load_medalign`); its tap is replaced: a DistillTap then captures the prompt->visual attention at layer l
    and the visual hidden states at layer l-1 (the run's transform, or an identity one for
    runs without it: W = 0, so the states are exactly the layer's output)."""
    transform = em.tap.transform if em.tap is not None else None
    if em.tap is not None:
        em.tap.remove()
    s = em.student
    if transform is None:
        transform = AlignmentTransform(s.hidden_size)          # zero W: identity, a read-out only
    tap = DistillTap(s, LAYER, transform, capture_attention=True)
    records = load_records(test_json, image_root)
    dataset = DistillDataset(records, image_root, s.processor, s.num_visual_tokens, 1 << 30, None, em.pad_to_square)
    collate = make_collate(s.processor.tokenizer.pad_token_id, s.image_token_id, s.num_visual_tokens)
    inside, chance, sim_err, atts = [], [], [], {}
    for lo in range(0, len(dataset), 32):
        idx = list(range(lo, min(lo + 32, len(dataset))))
        batch = collate([dataset[i] for i in idx])
        tap.set_batch(batch["visual_index"], batch["query_mask"])
        s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"].to(dtype=s.model.dtype))
        cos = cosine_similarity_matrix(tap.aligned_visual.float())               # [B, V, V]
        for j, i in enumerate(idx):
            key = records[i].images[0]
            sim_t, _ = group.targets(key, grid=s.grid)
            sim_err.append(float(((cos[j] - torch.as_tensor(sim_t).float()) ** 2).mean()))
            if masks[key].any():
                frac = D.mask_on_grid(masks[key], s.grid)
                a = tap.visual_attention[j].numpy()
                inside.append(attention_in_mask(a, frac))
                chance.append(float(frac.mean()))
                atts.setdefault(key, a)
    tap.remove()
    return {"grounding": float(np.mean(inside)), "grounding_chance": float(np.mean(chance)),
            "sim_mse": float(np.mean(sim_err)), "attention": atts}


def teacher_grounding(group, masks: dict, keys: list[str]) -> dict:
    inside, chance, inside6 = [], [], []
    for key in keys:
        if not masks[key].any():
            continue
        _, a = group.targets(key, grid=group.native_grid)
        frac = D.mask_on_grid(masks[key], group.native_grid)
        inside.append(attention_in_mask(np.asarray(a), frac))
        chance.append(float(frac.mean()))
        _, a6 = group.targets(key, grid=6)
        inside6.append(attention_in_mask(np.asarray(a6), D.mask_on_grid(masks[key], 6)))
    return {"inside": float(np.mean(inside)), "chance": float(np.mean(chance)),
            "ratio": float(np.mean(inside) / np.mean(chance)), "inside_at_student_grid": float(np.mean(inside6)),
            "n_images": len(inside)}


def per_kind_accuracy(eval_dir: Path) -> dict:
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    out = {}
    for kind in ("present", "where", "type"):
        # exact match after the project's answer normalisation (for yes/no: the closed score)
        scores = [float(normalize_answer(r["prediction"]) == normalize_answer(r["answer"]))
                  for r in rows if r["id"].endswith("-" + kind)]
        out[kind] = float(np.mean(scores)) if scores else float("nan")
    return out


# ----------------------------------------------------------------------------- one student run

def student_run(task: dict) -> dict:
    """Train one (config, seed), evaluate it, measure it. Runs in a worker process."""
    t1 = time.perf_counter()
    ds, name, seed = task["ds"], task["name"], task["seed"]
    alpha, beta = CONFIGS[name]
    out = Path(task["out"])
    run = out / "runs" / f"{name}-s{seed}"
    config = RunConfig(cache=out / "cache", teacher="tiny", student="tiny", data=ds["train"],
                       image_root=ds["image_root"], out=run, layer=LAYER, alpha=alpha, beta=beta,
                       lora_r=16, lora_alpha=32, lora_dropout=0.0, lr=task["lr"], warmup_ratio=0.05,
                       max_steps=task["steps"], batch_size=16, grad_accum=1, num_workers=0,
                       seed=seed, save_every=10**6, log_every=10**6)
    train(config, progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    em = load_medalign(run, device="cpu")  # loaded once: answers, then attention and features
    dest = evaluate(ds["test"], ds["image_root"], run=run, batch_size=32, max_new_tokens=24, meteor=False,
                    progress=False, device="cpu", model=em)
    h = headline(json.loads((dest / "metrics.json").read_text()))
    kinds = per_kind_accuracy(dest)
    group = open_cache(out / "cache")["tiny"]
    g = measure_run(em, ds["test"], ds["image_root"], group, load_masks(ds["masks"]))
    return {"seed": seed, "closed_acc": h["closed_acc"], "open_recall": h["open_recall"],
            "where_acc": kinds["where"], "type_acc": kinds["type"], "present_acc": kinds["present"], **g,
            "final_ntp": metrics[-1]["ntp"], "final_vis": metrics[-1].get("vis"),
            "final_att": metrics[-1].get("att"), "seconds": time.perf_counter() - t1}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger("medalign").setLevel(logging.WARNING)


def run_all(tasks: list[dict], jobs: int, threads: int):
    """The student runs in `jobs` worker processes of `threads` torch threads each, results
    in task order. A tiny model barely uses a second thread (here: 82 vs 89 ms a step),
    so on 2 cores two single-threaded runs side by side nearly halve the wall time; the
    numbers are the same (each run is seeded, and its thread count is fixed)."""
    if jobs == 1:
        _worker_init(threads)
        yield from map(student_run, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # fork: the workers inherit this module as loaded (the test loads it from its path)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        yield from pool.map(student_run, tasks)


# ----------------------------------------------------------------------------- pictures

def attention_picture(out: Path, image_root: Path, masks: dict, group, per_config: dict, keys: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from precompute.show import upsample_map

    cols = ["image + mask", "teacher a_t"] + list(per_config)
    fig, axes = plt.subplots(len(keys), len(cols), figsize=(1.45 * len(cols), 1.5 * len(keys) + 0.3), dpi=80,
                             squeeze=False)
    for r, key in enumerate(keys):
        img = np.asarray(Image.open(image_root / key).convert("L").resize((96, 96)), dtype=np.float32) / 255
        m = np.asarray(Image.fromarray(masks[key].astype(np.uint8) * 255).resize((96, 96))) > 127
        _, a_t = group.targets(key, grid=group.native_grid)
        maps = [None, (np.asarray(a_t), group.native_grid)] + [(per_config[c][key], 6) for c in per_config]
        for c, (ax, name) in enumerate(zip(axes[r], cols)):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if maps[c] is not None:
                values, grid = maps[c]
                ax.imshow(upsample_map(values / max(values.max(), 1e-12), grid, 96), cmap="jet", alpha=0.45,
                          vmin=0, vmax=1)
                share = attention_in_mask(values, D.mask_on_grid(masks[key], grid))
                ax.set_xlabel(f"in mask {share:.2f}", fontsize=6, labelpad=1)
            ax.contour(m, levels=[0.5], colors="white", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    fig.suptitle(f"attention on test lesions (student: prompt->visual, layer {LAYER}, seed 0); white: mask",
                 fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    # a small file to commit: 64-colour palette PNG
    Image.open(out).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


# ----------------------------------------------------------------------------- the table

def mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def make_table(results: dict) -> str:
    head = ("| config (alpha, beta) | closed acc (present?) | open recall | where? exact | type? exact | "
            "grounding: attention in mask | similarity MSE vs S_t |")
    lines = [head, "|" + "---|" * 7]
    for name, runs in results["configs"].items():
        a, b = CONFIGS[name]
        col = lambda k: mean_std([r[k] for r in runs])  # noqa: E731
        lines.append(f"| {name} ({a:g}, {b:g}) | {col('closed_acc')} | {col('open_recall')} | {col('where_acc')} | "
                     f"{col('type_acc')} | {col('grounding')} | {col('sim_mse')} |")
    t = results["teacher_grounding"]
    chance = np.mean([r["grounding_chance"] for runs in results["configs"].values() for r in runs])
    lines += ["", f"Chance level of the grounding column (mask area share at the 6x6 grid): {chance:.3f}. "
              f"Teacher (its own 7x7 CLS attention): {t['inside']:.3f} in mask vs {t['chance']:.3f} chance "
              f"({t['ratio']:.1f}x); resized to 6x6: {t['inside_at_student_grid']:.3f}.",
              f"mean ± sample std over {results['settings']['seeds']} seed(s); {results['settings']['n_test_questions']} "
              f"test questions on {results['settings']['n_test_images']} images."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="smoke-test sizes (1 seed, few steps)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="student optimiser steps per run")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--threads", type=int, default=1, help="torch threads per student run")
    p.add_argument("--jobs", type=int, default=None,
                   help="student runs side by side, in worker processes [cores // threads]")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--prepare-only", action="store_true",
                   help="stop after data, teacher and cache (examples/quickstart.sh trains with the CLI)")
    args = p.parse_args(argv)
    S = dict(FAST if args.fast else FULL)
    if args.seeds is not None:
        S["seeds"] = args.seeds
    if args.steps is not None:
        S["student_steps"] = args.steps
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
    logging.getLogger("medalign").setLevel(logging.WARNING)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    timings = {}

    log(f"[1/4] data: {S['n_train']} train / {S['n_test']} test images")
    ds = D.write_dataset(out / "data", S["n_train"], S["n_test"], seed=0)
    masks = load_masks(ds["masks"])

    log(f"[2/4] teacher: CLIP on {S['teacher_images']} own image-report pairs, {S['teacher_steps']} steps")
    t0 = time.perf_counter()
    tinfo = T.train_teacher(out / "teacher.pt", S["teacher_images"], S["teacher_steps"], seed=0, log=log)
    report = build_cache(BuildConfig(teacher="tiny", cache=out / "cache", image_root=ds["image_root"],
                                     checkpoint=out / "teacher.pt", batch_size=64, num_workers=0))
    group = open_cache(out / "cache")["tiny"]
    test_records = load_records(ds["test"], ds["image_root"])
    test_keys = sorted({r.images[0] for r in test_records})
    tg = teacher_grounding(group, masks, test_keys)
    timings["teacher_and_cache_s"] = time.perf_counter() - t0
    log(f"  cache: {report.computed} images; teacher CLS attention in lesion mask {tg['inside']:.3f} "
        f"vs area share {tg['chance']:.3f} ({tg['ratio']:.1f}x chance)")

    if args.prepare_only:
        log(f"prepared {out}: data/ (train.json, test.json, images/, masks.npz), teacher.pt, cache/ "
            f"({timings['teacher_and_cache_s']:.0f} s)")
        return {"teacher": tinfo, "teacher_grounding": tg, "timings": timings}
    configs = {c: CONFIGS[c] for c in args.configs.split(",")}
    log(f"[3/4] student: {len(configs)} configs x {S['seeds']} seed(s), {S['student_steps']} steps each, layer {LAYER}")
    results = {"configs": {c: [] for c in configs}}
    attn_maps = {}
    n_train_q = len(load_records(ds["train"], ds["image_root"]))
    n_test_q = len(test_records)
    tasks = [{"ds": ds, "name": name, "seed": seed, "out": str(out), "lr": args.lr, "steps": S["student_steps"]}
             for seed in range(S["seeds"]) for name in configs]
    log(f"  {len(tasks)} runs, {jobs} at a time, {args.threads} torch thread(s) each")
    t0 = time.perf_counter()
    for task, row in zip(tasks, run_all(tasks, jobs, args.threads)):
        name, seed = task["name"], task["seed"]
        maps = row.pop("attention")
        if seed == 0:
            attn_maps[name] = maps
        results["configs"][name].append(row)
        log(f"  {name:10s} seed {seed}: closed {row['closed_acc']:.3f} open {row['open_recall']:.3f} "
            f"grounding {row['grounding']:.3f} simMSE {row['sim_mse']:.4f} ntp {row['final_ntp']:.3f} "
            f"({row['seconds']:.0f}s)")
    timings["students_s"] = time.perf_counter() - t0

    log("[4/4] table and pictures")
    results["teacher"] = tinfo
    results["teacher_grounding"] = tg
    results["settings"] = {**S, "layer": LAYER, "configs": {k: list(v) for k, v in CONFIGS.items()},
                           "n_train_questions": n_train_q, "n_test_questions": n_test_q,
                           "n_test_images": S["n_test"], "lr": args.lr, "lora_r": 16, "batch_size": 16,
                           "command": "examples/grounding/run.py" + (" --fast" if args.fast else "")
                           + (f" --seeds {args.seeds}" if args.seeds is not None else "")
                           + (f" --steps {args.steps}" if args.steps is not None else "")
                           + (f" --lr {args.lr:g}" if args.lr != LR else "")}
    lesion_keys = [k for k in test_keys if masks[k].any()][:4]
    attention_picture(out / "attention.png", ds["image_root"], masks, group, attn_maps, lesion_keys)
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = timings
    results["torch_threads"] = args.threads
    results["jobs"] = jobs
    table = make_table(results)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(table)
    log(f"total {timings['total_s']:.0f} s; wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'attention.png'}")
    return results


if __name__ == "__main__":
    main()
