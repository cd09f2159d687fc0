"""`medalign-distill`: train students from a teacher-target cache.

Thin: flags (and an optional config file, flags winning) become one RunConfig,
which is validated, saved in the run directory, and handed to `train`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click

from precompute.cache import CacheError
from precompute.datasets import LANGUAGES, DatasetError
from precompute.images import ImageError

from .config import RunConfig, load_config_file
from .precision import DTYPES, PRECISIONS, QUANTIZE
from .templates import CHAT_TEMPLATES

USER_ERRORS = (CacheError, DatasetError, ImageError, KeyError, ValueError, FileNotFoundError)


def _one_line(e: Exception) -> click.ClickException:
    """A user error as click's one `Error:` line (a KeyError's message without str()'s quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return click.ClickException(str(msg))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Fine-tune a LLaVA-style student with LoRA and MedAlign's distillation losses, then use it.

    \b
    medalign-distill convert --model ~/llava-med-v1.5-mistral-7b --vision-tower ~/clip-vit-large-patch14-336 \\
        --out ~/models/llava-med-hf                                # once: the original format -> transformers
    medalign-distill run --cache ./cache --teacher unimed --student ~/models/llava-med-hf \\
        --data train.json --image-root images/ --out runs/unimed-l20 --layer 20 --alpha 1 --beta 0.03
    medalign-distill run ... --out runs/no-attn --beta 0      # ablation: same cache, no teacher run
    medalign-distill eval --run runs/unimed-l20 --data test.json --image-root images/
    medalign-distill compare runs/*            # and: pictures, predict, export

    The teacher is never loaded: its targets stream from the cache built by
    `medalign-cache build`.
    """


@contextmanager
def _quiet_libraries(quiet: bool):
    """--quiet also silences transformers' own progress bars ("Loading weights"),
    restored afterwards (a process may run several commands: tests, notebooks)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _opt(*names, **kw):
    # Every flag defaults to None so a config file's value survives unless the flag is given.
    return click.option(*names, default=None, show_default=False, **kw)


@main.command()
@_opt("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
      help="JSON/YAML file of run settings; flags given here override it.")
@_opt("--cache", metavar="DIR|URL", help="Cache built by medalign-cache: a folder or an fsspec URL.")
@_opt("--teacher", help="Teacher group in the cache (name or alias, e.g. unimed).")
@_opt("--student", help="Local transformers LLaVA directory, or 'tiny' for a tiny random student.")
@_opt("--data", type=click.Path(path_type=Path), help="Training dataset file.")
@_opt("--image-root", type=click.Path(path_type=Path), help="Folder the dataset's image paths are relative to.")
@_opt("--out", type=click.Path(path_type=Path), help="Run directory (config, logs, metrics, adapter).")
@_opt("--format", help="Dataset format [auto].")
@_opt("--split", help="Split for files holding several (R2Gen).")
@_opt("--lang", type=click.Choice(LANGUAGES), help="SLAKE question language (q_lang): en, zh or all [en].")
@_opt("--layer", type=int, help="Decoder layer l of the attention loss; the transform sits at l-1 [20].")
@_opt("--alpha", type=float, help="Weight of the visual alignment loss; 0 turns it off [1.0].")
@_opt("--beta", type=float, help="Weight of the attention distillation loss; 0 turns it off [0.03].")
@_opt("--eps", type=float, help="Alignment transform scale eps [1.0].")
@_opt("--align-rank", type=int, help="Low-rank alignment transform of this rank [full D x D].")
@_opt("--attn-loss", type=click.Choice(["kl", "softmax-kl"]), help="Attention loss form [kl, the reference].")
@_opt("--attn-temperature", type=float, help="Temperature of softmax-kl [1.0].")
@_opt("--pad-to-square/--no-pad-to-square", help="Pad images to square [follow the cache's teacher].")
@_opt("--chat-template", type=click.Choice(sorted(CHAT_TEMPLATES)),
      help="Prompt template by name, instead of the student's own [the student's; converted students carry "
           "the one MedAlign used].")
@_opt("--images", type=click.Choice(["first", "all"]),
      help="Records with several images (IU-Xray's views): show the student the first, or all of them, each "
           "its own block of visual tokens with its own teacher targets [first].")
@_opt("--lora-r", type=int, help="LoRA rank [32].")
@_opt("--lora-alpha", type=int, help="LoRA alpha [16].")
@_opt("--lora-dropout", type=float, help="LoRA dropout [0.05].")
@_opt("--lora-targets", help="Comma-separated module names [every linear layer of the language model].")
@_opt("--lr", type=float, help="Peak learning rate [2e-4].")
@_opt("--weight-decay", type=float, help="[0].")
@_opt("--warmup-ratio", type=float, help="[0.03].")
@_opt("--epochs", type=float, help="Passes over the data [9; the reference trains 9-12]; --max-steps overrides.")
@_opt("--max-steps", type=int, help="Optimiser steps; overrides --epochs.")
@_opt("--batch-size", type=int, help="Samples per micro-batch [4].")
@_opt("--grad-accum", type=int, help="Micro-batches per optimiser step [8].")
@_opt("--max-length", type=int, help="Token limit per sample [1024].")
@_opt("--gradient-checkpointing/--no-gradient-checkpointing", help="[on for CUDA].")
@_opt("--precision", type=click.Choice(PRECISIONS),
      help="[auto: bf16 on GPUs that have it, else fp16 with a loss scaler; fp32 on CPU].")
@_opt("--quantize", type=click.Choice(["none", *QUANTIZE]),
      help="Store the language model 4-bit (QLoRA: NF4, double quantisation) or 8-bit with bitsandbytes; "
           "LoRA trains on top [none]. Needs pip install \"medalign[quant]\".")
@_opt("--device", help="[auto].")
@_opt("--workers", "num_workers", type=int, help="DataLoader workers [2].")
@_opt("--seed", type=int, help="[0].")
@_opt("--save-every", type=int, help="Checkpoint every N steps [500].")
@_opt("--log-every", type=int, help="[10].")
@_opt("--report-to", metavar="none|tensorboard|wandb",
      help="Live tracking, comma-separated (tensorboard,wandb): every metrics.jsonl row while training runs; "
           "wandb offline unless WANDB_MODE is set [none].")
@click.option("--resume", is_flag=True, default=False, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def run(config_file, quiet, **flags):
    """Train one run (teacher targets from the cache; the teacher is never loaded)."""
    from .train import RunError, train

    try:
        settings = load_config_file(config_file) if config_file else {}
        resume = flags.pop("resume")
        settings.update({k: v for k, v in flags.items() if v is not None})
        if resume:
            settings["resume"] = True
        if isinstance(settings.get("lora_targets"), str):
            settings["lora_targets"] = [t.strip() for t in settings["lora_targets"].split(",") if t.strip()]
        required = [k for k in ("cache", "teacher", "student", "data", "image_root", "out") if not settings.get(k)]
        alpha, beta = settings.get("alpha", 1.0), settings.get("beta", 0.03)
        if alpha == 0 and beta == 0:  # plain LoRA needs no cache
            required = [k for k in required if k not in ("cache", "teacher")]
            settings.setdefault("cache", ".")
            settings.setdefault("teacher", "")
        if required:
            raise click.UsageError("missing " + ", ".join("--" + k.replace("_", "-") for k in required))
        try:
            config = RunConfig.from_dict(settings)
        except ValueError as e:
            if config_file is None:
                raise
            raise ValueError(f"{config_file} (with the flags given): {e}") from None
        with _quiet_libraries(quiet):
            out = train(config, progress=not quiet).out
    except (RunError, *USER_ERRORS) as e:
        raise _one_line(e) from e
    click.echo(f"run finished: {out}")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local folder of a LLaVA-codebase checkpoint (llava-med-v1.5-mistral-7b, HuatuoGPT-Vision-7B).")
@click.option("--vision-tower", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local folder of openai/clip-vit-large-patch14-336 (LLaVA-Med runs with its weights; "
                   "HuatuoGPT-Vision takes only its config and image processor) [mm_vision_tower if local].")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the converted student.")
@click.option("--chat-template", type=click.Choice(sorted(CHAT_TEMPLATES)), default=None,
              help="Default prompt template to store [the one MedAlign trains this student with].")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def convert(model_dir, vision_tower, out, chat_template, quiet):
    """Convert a LLaVA-Med / HuatuoGPT-Vision checkpoint into a transformers LLaVA folder (offline).

    \b
    medalign-distill convert --model ~/llava-med-v1.5-mistral-7b \\
        --vision-tower ~/clip-vit-large-patch14-336 --out ~/models/llava-med-v1.5-hf
    medalign-distill convert --model ~/HuatuoGPT-Vision-7B --vision-tower ~/clip-vit-large-patch14-336 \\
        --out ~/models/huatuogpt-vision-7b-hf

    The result is what --student takes; medalign.json in it records the template,
    the image geometry and which vision-tower weights were used.
    """
    from .convert import ConvertError, describe
    from .convert import convert as run_convert

    try:
        with _quiet_libraries(quiet):
            record = run_convert(model_dir, out, vision_tower=vision_tower, chat_template=chat_template,
                                 progress=not quiet)
    except (ConvertError, *USER_ERRORS) as e:
        raise click.ClickException(str(e)) from e
    for line in describe(record):
        click.echo(line)
    click.echo(f"converted: {out} (use it as --student)")


@main.command("eval")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Run directory (its base student + adapter/ + alignment/), or a folder `export` wrote.")
@click.option("--student", default=None, help="Without --run: a base student (local LLaVA directory or 'tiny').")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --student: directory for the base model's results (DIR/eval/<data-stem>/).")
@click.option("--base-only", is_flag=True, default=False,
              help="Evaluate the run's untouched base student (results in RUN/base/eval/<data-stem>/).")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path), help="Evaluation dataset file.")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", default="auto", show_default=True, help="Dataset format.")
@click.option("--split", default=None,
              help="Split to evaluate in files holding several (R2Gen keys, 'split' fields, VQA-RAD's "
                   "phrase_type) [test; a file without splits is read whole].")
@click.option("--lang", type=click.Choice(LANGUAGES), default="en", show_default=True,
              help="SLAKE question language (q_lang); all: both.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A broken image: fail stops naming it (predictions so far are kept); skip lists it in "
                   "skipped.jsonl and scores the rest.")
@click.option("--name", default=None, help="Results folder name [the data file's stem, -SPLIT appended].")
@click.option("--num-beams", default=1, show_default=True, help="1: greedy; more: beam search.")
@click.option("--max-new-tokens", default=64, show_default=True, help="VQA answers are short; reports need ~256.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--pad-to-square/--no-pad-to-square", default=None,
              help="Image preprocessing [the run's, as in training; off for a base student].")
@click.option("--meteor/--no-meteor", default=True, show_default=True,
              help="METEOR needs Java (pycocoevalcap's METEOR 1.5 jar).")
@click.option("--masks", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An .npz of region masks per image key: also score the share of the student's attention "
                   "inside them (metrics.json 'grounding').")
@click.option("--layer", type=int, default=None, help="Decoder layer read for --masks [the run's].")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 on GPUs that have it, else fp16; fp32 on CPU.")
@click.option("--quantize", type=click.Choice(["run", "none", *QUANTIZE]), default="run", show_default=True,
              help="How to store the language model: as the run trained it (its config.json), or unquantized "
                   "(a quantized run's adapter loads on the 16-bit base too), 4-bit, 8-bit [none without --run].")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", "num_workers", default=2, show_default=True, help="Image-loading workers.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def eval_(run_dir, student, out, base_only, data, image_root, quiet, **kw):
    """Generate answers for a dataset and score them (VQA accuracy/recall, BLEU, ROUGE-L, METEOR, CIDEr).

    \b
    medalign-distill eval --run runs/unimed-l20 --data vqa_rad/test.json --image-root vqa_rad/images
    medalign-distill eval --run runs/unimed-l20 --base-only --data ...     # the baseline row
    medalign-distill eval --student ~/models/llava-med-hf --out runs/base --data ...
    """

    from .evaluate import EvalError, LoadError, evaluate
    from .grounding import MaskError
    from .student import StudentError

    if run_dir is None and student is None:
        raise click.UsageError("give --run RUN, or --student PATH_OR_tiny with --out DIR")
    if run_dir is None and out is None:
        raise click.UsageError("--student without --run needs --out DIR for its results")
    try:
        with _quiet_libraries(quiet):
            dest = evaluate(data, image_root, run=run_dir, student=student, out=out, base_only=base_only,
                            progress=not quiet, **kw)
    except (EvalError, LoadError, StudentError, MaskError, *USER_ERRORS) as e:
        raise _one_line(e) from e
    m = json.loads((dest / "metrics.json").read_text())
    skipped = m["data"].get("skipped")
    if skipped:
        click.echo(f"skipped {skipped} of {m['data']['samples']} samples (broken or missing images), scored "
                   f"the other {m['n']}: see {dest / 'skipped.jsonl'}")
    vqa = m.get("vqa")
    if vqa:
        fmt = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
        med = vqa["medalign"]
        click.echo(f"as MedAlign reports it: closed {fmt(med['closed_accuracy'])} (n={med['closed_n']}), open recall "
                   f"{fmt(med['open_recall'])} (n={med['open_n']}); our closed accuracy "
                   f"{fmt(vqa['closed']['accuracy'])}, LLaVA-Med rule {fmt(vqa['closed']['accuracy_llava_med'])} "
                   f"(n={vqa['closed']['n']})")
    g = m.get("grounding")
    if g and g["attention_in_mask"] is not None:
        click.echo(f"attention inside the masks at layer {g['layer']}: {100 * g['attention_in_mask']:.1f}% "
                   f"(chance {100 * g['chance']:.1f}%, n={g['n']})")
    text = m.get("text", {}).get("all")
    if text:
        click.echo("  ".join(f"{k} {'—' if text.get(k) is None else f'{100 * text[k]:.2f}'}"
                             for k in ("BLEU_1", "BLEU_4", "ROUGE_L", "METEOR", "CIDEr")))
    click.echo(f"predictions and metrics: {dest}")


@main.command()
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A finished run (or an exported folder): base + adapter + alignment transform.")
@click.option("--student", default=None, help="Without --run: a base student (local LLaVA folder or 'tiny').")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image (PNG/JPEG/DICOM/...); repeat for several.")
@click.option("--question", "questions", multiple=True,
              help="A question; one per --image, one for all of them, or with --together one about all.")
@click.option("--together", is_flag=True, default=False,
              help="All --image files are one study (e.g. two X-ray views) asked one --question "
                   "(needs a run trained with --images all to show the student more than the first).")
@click.option("--data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Instead of --image/--question: the questions of a dataset file.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder the --data paths are relative to; with --image, the folder cache keys are relative to.")
@click.option("--limit", type=int, default=None, help="With --data: only the first N questions.")
@click.option("--format", "fmt", default="auto", show_default=True, help="Dataset format of --data.")
@click.option("--split", default=None, help="Split of --data [test where the file holds several].")
@click.option("--attention", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the student's prompt-to-image attention (and the teacher's, if cached) into this PNG.")
@click.option("--layer", type=int, default=None, help="Decoder layer of the attention picture [the run's].")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--num-beams", default=1, show_default=True, help="1: greedy, streamed; more: beam search.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
def predict(run_dir, student, images, questions, together, data, image_root, limit, fmt, split, attention, layer,
            max_new_tokens, num_beams, precision, device):
    """Ask a trained model (or a base student) about images; answers stream as they are generated.

    \b
    medalign-distill predict --run runs/unimed-l20 --image scan.dcm --question "Is there a pleural effusion?"
    medalign-distill predict --run runs/unimed-l20 --data test.json --image-root images/ --limit 5
    medalign-distill predict --run runs/unimed-l20 --image scan.png --question "..." --attention att.png
    """
    from precompute.cache import open_cache

    from .evaluate import EvalError, select_records
    from .inference import LoadError, load_medalign
    from .predict import PredictError, attention_picture, predict as run_predict, questions_from_args
    from .student import StudentError

    try:
        if (run_dir is None) == (student is None):
            raise click.UsageError("give --run RUN (a trained run or export) or --student PATH_OR_tiny")
        if data is not None:
            if images or questions:
                raise click.UsageError("--data replaces --image/--question; give one or the other")
            if image_root is None:
                raise click.UsageError("--data needs --image-root")
            records, root = select_records(data, image_root, fmt=fmt, split=split, limit=limit), image_root
        else:
            records, root = questions_from_args(list(images), list(questions), together)
            if image_root is not None:  # keys relative to the cache's image root: the teacher panel can find them
                records, root = _rebase(records, root, image_root), image_root
        home = None if run_dir is not None else Path(".medalign")
        m = load_medalign(run_dir, student=student, home=home, device=device, precision=precision,
                          doing="ask it")
        run_config = json.loads((run_dir / "config.json").read_text()) if run_dir and \
            (run_dir / "config.json").is_file() else {}
        at = layer if layer is not None else (m.info.get("alignment") or {}).get("layer") or run_config.get("layer")
        if attention is not None and at is None:
            raise click.UsageError("--attention on a base student needs --layer N")
        answers = run_predict(m, records, root, max_new_tokens=max_new_tokens, num_beams=num_beams,
                              write=lambda t: click.echo(t, nl=False), attention_layer=at if attention else None)
        if attention is not None:
            group = None
            if run_config.get("cache") and run_config.get("teacher"):
                try:
                    group = open_cache(run_config["cache"])[run_config["teacher"]]
                except (KeyError, *USER_ERRORS):
                    group = None  # the teacher panel is a bonus: a moved cache only loses it
            attention_picture(attention, m, answers, root, group, at,
                              f"{run_dir or student}: student attention at layer {at}")
            click.echo(f"attention: {attention}")
    except (PredictError, LoadError, EvalError, StudentError, *USER_ERRORS) as e:
        raise _one_line(e) from e


def _rebase(records, root: Path, image_root: Path):
    """Records over `root` -> the same images as keys relative to `image_root`."""
    from dataclasses import replace

    try:
        return [replace(r, images=tuple((root / k).resolve().relative_to(image_root.resolve()).as_posix()
                                        for k in r.images)) for r in records]
    except ValueError:
        raise click.UsageError(f"--image files must lie under --image-root {image_root}") from None


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A finished run (the --out of `medalign-distill run`).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--merge", is_flag=True, default=False,
              help="Merge the LoRA adapter into the weights (the alignment transform stays a separate file).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="With --merge: dtype of the merged weights [the base checkpoint's].")
def export(run_dir, out, merge, dtype):
    """Write a finished run as one self-contained folder: base, adapter (or merged), alignment, README.

    \b
    medalign-distill export --run runs/unimed-l20 --out ~/models/llava-med-medalign
    medalign-distill export --run runs/unimed-l20 --out ~/models/llava-med-medalign-merged --merge --dtype bf16

    Load it with `from distill import load_medalign` (README.md in the folder says how).
    """
    from .export import ExportError
    from .export import export as run_export
    from .inference import LoadError
    from .student import StudentError

    try:
        dest = run_export(run_dir, out, merge=merge, dtype=dtype)
    except (ExportError, LoadError, StudentError, *USER_ERRORS) as e:
        raise _one_line(e) from e
    click.echo(f"exported: {dest} (load it with distill.load_medalign; see {dest / 'README.md'})")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data-stem", default=None, help="Only evaluations of this dataset (RUN/eval/<stem>/) [all].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the markdown table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table as CSV.")
def compare(runs, data_stem, out, csv_path):
    """One table: the settings that differ between runs and their scores (runs/* works)."""
    from .compare import CompareError
    from .compare import compare as make_table

    try:
        table = make_table(runs, data_stem=data_stem)
    except (CompareError, *USER_ERRORS) as e:
        raise click.ClickException(str(e)) from e
    md = table.markdown()
    click.echo(md, nl=False)
    if out is not None:
        out.write_text(md)
    if csv_path is not None:
        csv_path.write_text(table.csv())


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run directory (the --out of `medalign-distill run`).")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Dataset file whose images to draw (e.g. the test split).")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the PNGs.")
@click.option("--keys", default=None, help="Comma-separated image keys for the attention figure.")
@click.option("--n", default=4, show_default=True, help="Images in the attention figure when --keys is not given.")
@click.option("--format", "fmt", default="auto", show_default=True, help="Dataset format.")
@click.option("--split", default=None, help="Split for files holding several (R2Gen).")
@click.option("--lang", type=click.Choice(LANGUAGES), default="en", show_default=True,
              help="SLAKE question language (q_lang); all: both.")
@click.option("--label-by", type=click.Choice(["auto", "answer", "folder"]), default="auto", show_default=True,
              help="t-SNE colour: the closed question's answer, or the image's folder.")
@click.option("--label-field", default=None, help="Colour the t-SNE by this field of the dataset's rows instead.")
@click.option("--tsne-n", default=256, show_default=True, help="Images in the t-SNE (the first N with targets).")
@click.option("--teacher-embedding", type=click.Choice(["similarity", "attention"]), default="similarity",
              show_default=True, help="Teacher vector per image for the t-SNE: its patch-similarity matrix or "
                                      "its attention map.")
@click.option("--cache", metavar="DIR|URL", default=None, help="Cache to read the teacher's targets from [the run's].")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
def pictures(run_dir, keys, **kw):
    """Attention before/after training vs the teacher, loss curves and a t-SNE of a run."""
    from .pictures import PicturesError, make_pictures
    from .student import StudentError

    try:
        key_list = [k.strip() for k in keys.split(",") if k.strip()] if keys else None
        result = make_pictures(run_dir, keys=key_list, **kw)
    except (PicturesError, StudentError, *USER_ERRORS) as e:
        raise _one_line(e) from e
    for name, path in result.files.items():
        click.echo(f"{name}: {path}")


if __name__ == "__main__":  # `python -m distill.cli` / `torchrun -m distill.cli`
    main()
