"""`medalign-distill predict`: ask a trained model (or a base student) about images.

    medalign-distill predict --run RUN --image scan.dcm --question "Is there a pleural effusion?"
    medalign-distill predict --run RUN --image a.png --image b.png --question "..." --question "..."
    medalign-distill predict --run RUN --image pa.png --image lateral.png --together --question "Report?"
    medalign-distill predict --run RUN --data test.json --image-root images/ --limit 5
    ... --attention attention.png     # where the student looks, beside the teacher where cached

The model comes from `load_medalign`, as eval loads it (the same base, template, image
geometry and alignment transform), and answers are generated the same way, one question
at a time so that the tokens can be printed as they come: the same inputs give eval's
answers. `--attention` draws, for each image, the student's prompt-to-image attention at
the run's layer (head- and prompt-row-averaged, as L_att reads it) over the image as the
student saw it, beside the teacher's target map when the run's cache holds that image
(its key: the path relative to --image-root).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from precompute.datasets import Record

from .data import record_images
from .inference import MedAlignModel, common_folder, decode, generate_batch, student_attention


class PredictError(ValueError):
    """A prediction that cannot run as asked; the message says what to do."""


@dataclass
class Answer:
    id: str
    images: tuple[str, ...]       # keys, relative to the image root
    question: str
    answer: str
    attention: list[np.ndarray] | None = None   # per image [V], the student's map (with --attention)


def questions_from_args(images: list[Path], questions: list[str], together: bool) -> tuple[list[Record], Path]:
    """--image/--question pairs (or one question for every image, or with `together` one
    question about all the images) -> records over their common folder."""
    if not images or not questions:
        raise PredictError("give --image PATH and --question TEXT (or --data FILE)")
    paths = [Path(p).expanduser().resolve() for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PredictError(f"image not found: {', '.join(missing)}")
    root = common_folder(paths)
    keys = [p.relative_to(root).as_posix() for p in paths]
    if together:
        if len(questions) != 1:
            raise PredictError("--together asks ONE --question about all the --image files")
        return [Record(id="q1", images=tuple(keys), turns=((questions[0], ""),), task="vqa")], root
    if len(questions) == 1:
        questions = questions * len(keys)
    if len(questions) != len(keys):
        raise PredictError(f"{len(keys)} --image but {len(questions)} --question: give one question per image, "
                           f"one for all of them, or --together")
    return [Record(id=f"q{i + 1}", images=(k,), turns=((q, ""),), task="vqa")
            for i, (k, q) in enumerate(zip(keys, questions))], root


def _streamer(tokenizer, write):
    """transformers' TextStreamer, writing through `write` (click.echo) instead of print."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            write(text + ("\n" if stream_end else ""))

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def predict(m: MedAlignModel, records: list[Record], image_root, *, max_new_tokens: int = 64,
            num_beams: int = 1, write=None, attention_layer: int | None = None) -> list[Answer]:
    """Answer every record, one at a time (`write`: stream the tokens through it; only with
    greedy decoding). With `attention_layer`, also the student's attention per image."""
    dataset, collate = m.dataset(records, image_root), m.collate()
    tokenizer = m.student.processor.tokenizer
    answers = []
    for i, record in enumerate(records):
        batch = collate([dataset[i]])
        if batch["errors"]:
            raise PredictError(f"{record.id}: {batch['errors'][0]['error']}")
        if write is not None:
            write(f"{record.id} [{', '.join(record_images(record, m.images))}] {record.prompt}\n> ")
        streamer = _streamer(tokenizer, write) if write is not None and num_beams == 1 else None
        new = generate_batch(m, batch, max_new_tokens=max_new_tokens, num_beams=num_beams, streamer=streamer)
        text = decode(m, new)[0]
        if write is not None and streamer is None:
            write(text + "\n")
        answer = Answer(record.id, record_images(record, m.images), record.prompt, text)
        if attention_layer is not None:
            answer.attention = list(student_attention(m, batch, attention_layer).numpy())
        answers.append(answer)
    return answers


def attention_picture(out: Path, m: MedAlignModel, answers: list[Answer], image_root, group, layer: int,
                      header: str) -> None:
    """One row per image: the image as the student saw it, the teacher's target (when the
    cache holds the image), the student's attention; titles carry the question and answer."""
    from .pictures import _student_picture, answer_figure

    dataset = m.dataset([], image_root)
    grid = m.student.grid
    rows = []
    for a in answers:
        for key, att in zip(a.images, a.attention):
            teacher = None
            if group is not None and not group.missing([key]):
                t = group.targets(key, grid)[1].numpy()
                teacher = t / t.max()
            rows.append({"key": key, "question": a.question, "answer": a.answer, "layer": layer,
                         "picture": _student_picture(dataset.pixels(key), m.student.processor.image_processor),
                         "student": att / max(float(att.max()), 1e-12), "teacher": teacher})
    answer_figure(out, rows, grid, header)
