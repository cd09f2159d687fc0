"""Dataset files as users have them -> one list of `Record`s.

    load_records(path, image_root, fmt="auto", split=None, default_split=None, lang="en") -> [Record]
    cache_keys(records)            the sorted unique image keys (rows of the cache)
    resolve_image(image_root, key) key -> file path (or H5Image), refusing keys that leave the root
    missing_images(records, root)  keys whose file is absent (the builder reports them)

Formats (FORMATS; `fmt="auto"` looks at the content):

    folder       no file (path None) or a directory: every image under it, task "image"
    llava        LLaVA / LLaVA-Med instruction JSON: [{"id", "image", "conversations"}]
    llava-jsonl  LLaVA-Med question jsonl: {"question_id", "image", "text"[, "answer"]}
    r2gen        R2Gen annotation.json (IU-Xray, MIMIC-CXR): {"train": [...], "val": ..., "test": ...}
    vqa-rad      [{"qid", "image_name", "question", "answer", "answer_type", "phrase_type"}]
    slake        [{"qid", "img_name", "question", "answer", "answer_type", "q_lang"}] (`lang`: en kept)
    pathvqa      [{"image", "question", "answer"[, "answer_type"]}]
    csv          a table with an image column and optional question/answer/report columns
    h5           an HDF5 file (every image stack in it), or a JSON object
                 {"images": "<file>::<dataset>", "texts": "<table>"}: every row of that
                 dataset, row i with row i of the table (CheXzero's cxr.h5 + impressions CSV)

The record-list formats read JSON, JSONL or CSV alike. A record's images are
*cache keys*: paths relative to the image root, posix, normalised, so the same
image named "./a\\b.png" by one file and "a/b.png" by another is one cache row. An image
inside an HDF5 file is "<file>::<dataset>[<index>]" (h5images.py), e.g. "cxr.h5::/cxr[17]".

Splits: `split` picks one (an R2Gen key, or the records whose `split` field has
that value; VQA-RAD's public file marks test questions by `phrase_type` instead).
Without it, `default_split` is used where the file holds splits: evaluation asks
for "test"; cache builds and training pass None, which reads R2Gen's "train" and
every record of a record list. Each Record keeps the split it came from.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from .h5images import H5_SUFFIXES, H5Image, H5OpenError, dataset_length, h5_key, image_datasets, is_hdf5, \
    parse_h5_key
from .images import DICOM_SUFFIXES, has_dicom_magic


class DatasetError(ValueError):
    """A dataset file that cannot be read as asked; names the file, the record, the fix."""


TASKS = ("instruct", "vqa", "report", "image")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + DICOM_SUFFIXES
LANGUAGES = ("en", "zh", "all")   # SLAKE's q_lang values, or both halves

# R2Gen files hold reports, not prompts: every report record gets this one
# instruction. Training and evaluation must use the same text, so it is fixed here.
REPORT_PROMPT = "Write the radiology report for this image, describing the findings."


@dataclass(frozen=True)
class Record:
    """One training/evaluation sample.

    `turns` are (human prompt, assistant answer) pairs, the `<image>` token
    removed (the student's chat template places the image). Task "image"
    (images without text: folder listings, image-only tables) has no turns;
    every other task has at least one.
    """
    id: str
    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]
    task: str
    answer_type: str | None = None   # "closed" | "open" for VQA when known
    split: str | None = None         # the split the file put it in ("train", "test", ...), if it says

    def __post_init__(self):
        # Accept lists (and one key as a str) from hand-built records; store
        # tuples so records hash and compare.
        images = (self.images,) if isinstance(self.images, str) else tuple(self.images)
        object.__setattr__(self, "images", images)
        if not all(isinstance(t, (tuple, list)) and len(t) == 2 for t in self.turns):
            raise DatasetError(f"record {self.id!r}: turns must be (prompt, answer) pairs, got {self.turns!r}")
        object.__setattr__(self, "turns", tuple((h, a) for h, a in self.turns))
        if not isinstance(self.id, str) or not self.id:
            raise DatasetError(f"record id must be a non-empty string, got {self.id!r}")
        if not self.images or not all(isinstance(k, str) and k for k in self.images):
            raise DatasetError(f"record {self.id!r}: needs at least one image key, got {self.images!r}")
        if self.task not in TASKS:
            raise DatasetError(f"record {self.id!r}: task {self.task!r} is not one of {TASKS}")
        if self.task != "image" and not self.turns:
            raise DatasetError(f"record {self.id!r}: task {self.task!r} needs at least one (prompt, answer) turn")
        if not all(isinstance(h, str) and isinstance(a, str) for h, a in self.turns):
            raise DatasetError(f"record {self.id!r}: turns must be (str, str) pairs")
        if self.answer_type not in (None, "closed", "open"):
            raise DatasetError(f"record {self.id!r}: answer_type {self.answer_type!r} is not 'closed' or 'open'")

    @property
    def prompt(self) -> str:
        return self.turns[0][0] if self.turns else ""

    @property
    def answer(self) -> str:
        return self.turns[0][1] if self.turns else ""


# ----------------------------------------------------------------------------- image keys

def normalize_key(raw, image_root=None) -> str:
    """A path as a dataset file spells it -> the cache key. ValueError says why not.

    Backslashes are Windows separators; "." and empty parts go; ".." must stay
    inside the root. An absolute path is accepted only inside `image_root`
    (some evaluation files carry them) and made relative to it. A "::" key names an
    image inside an HDF5 file: its file part is normalised so, the rest canonically
    (h5images.parse_h5_key).
    """
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"image path must be a non-empty string, got {raw!r}")
    if "::" in raw:
        file, dataset, index = parse_h5_key(raw.strip())
        return h5_key(normalize_key(file, image_root), dataset, index)
    path = raw.strip().replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:/", path):
        root = None if image_root is None else os.path.abspath(image_root).replace("\\", "/").rstrip("/")
        inside = root is not None and posixpath.normpath(path).startswith(root + "/")
        if not inside:
            raise ValueError(f"absolute image path {raw!r} is not under the image root "
                             f"{image_root}; give paths relative to the image root")
        path = posixpath.normpath(path)[len(root) + 1:]
    key = posixpath.normpath(path)
    if key == ".." or key.startswith("../"):
        raise ValueError(f"image path {raw!r} leaves the image root ('..'); "
                         f"give paths relative to the image root, or choose a higher root")
    if key in (".", ""):
        raise ValueError(f"image path {raw!r} names no file")
    return key


def resolve_image(image_root, key: str) -> Path | H5Image:
    """The file behind a cache key, or for a "::" key the H5Image inside its file (both
    have is_file(); load_image takes both). Keys that escape the root (absolute, '..')
    are refused; a symlink inside the root pointing elsewhere is fine (datasets are often
    assembled from links)."""
    try:
        normal = normalize_key(key)
    except ValueError as e:
        raise DatasetError(f"image key {key!r}: {e}") from None
    if "::" in normal:
        file, dataset, index = parse_h5_key(normal)
        return H5Image(Path(image_root) / file, dataset, index)
    return Path(image_root) / normal


def cache_keys(records) -> list[str]:
    """Sorted unique image keys over all records: the rows of a cache group."""
    return sorted({key for r in records for key in r.images})


def missing_images(records, image_root) -> list[str]:
    """Keys (sorted) whose file (for HDF5 images: the container) does not exist under `image_root`."""
    return [k for k in cache_keys(records) if not resolve_image(image_root, k).is_file()]


# ----------------------------------------------------------------------------- format registry

class _Registry(dict):
    """name -> loader(data, source) -> [Record]; a name registers once."""

    def __setitem__(self, name, loader):
        if name in self:
            raise KeyError(f"dataset format {name!r} is already registered")
        super().__setitem__(name, loader)


FORMATS = _Registry()


def register_format(name: str):
    def add(loader):
        FORMATS[name] = loader
        return loader
    return add


@dataclass
class _Source:
    """Where records come from, for keys and for error messages."""
    path: Path | None
    image_root: Path
    split: str | None                  # asked for (--split): the file must have it
    labels: list[str] | None = None    # how to name top-level row i ("record 3", "line 4", "row 5")
    default_split: str | None = None   # used when no split is asked for and the file holds splits
    lang: str = "en"

    def __post_init__(self):
        self.records: list[Record] = []
        self.ids: dict[str, str] = {}     # id -> label of the row that first used it

    def add(self, label: str, **fields) -> None:
        """Append one Record; ids must be unique across the file."""
        rid = fields["id"]
        if rid in self.ids:
            raise DatasetError(f"{self.path}: duplicate id {rid!r} ({self.ids[rid]} and {label}); "
                               f"ids must be unique: fix or drop one of them")
        self.ids[rid] = label
        self.records.append(Record(**fields))

    def where(self, label: str, rid=None) -> str:
        return f"{self.path}: {label}" + (f" (id {rid!r})" if rid not in (None, "") else "")

    def fail(self, label: str, rid, message: str) -> DatasetError:
        return DatasetError(f"{self.where(label, rid)}: {message}")

    def rows(self, data, what: str = "a list of records", split_of=None):
        """(label, row, split) for a top-level list, the split filter applied.
        `split_of(row)` names a row's split (default: its 'split' field)."""
        if not isinstance(data, list):
            shape = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
            raise DatasetError(f"{self.path}: expected {what} at the top level, got {shape}{_object_hint(data)}")
        labels = self.labels or [f"record {i}" for i in range(len(data))]
        for label, row in zip(labels, data):
            if not isinstance(row, dict):
                raise DatasetError(f"{self.where(label)}: expected an object with fields, got {type(row).__name__}")
        split_of = split_of or _split_field
        rows = [(label, row, split_of(row)) for label, row in zip(labels, data)]
        wanted = self.split if self.split is not None else self.default_split
        if wanted is None:
            return rows
        present = sorted({str(s) for _, _, s in rows if s is not None})
        if not present:
            if self.split is None:
                return rows  # a default split: a file without splits is read whole
            raise DatasetError(f"{self.path}: split {self.split!r} asked for, but its records have no "
                               f"'split' field; drop --split (only R2Gen files, VQA-RAD's phrase_type and "
                               f"records with a 'split' field have splits)")
        rows = [(label, row, s) for label, row, s in rows if s == wanted]
        if not rows:
            default = "" if self.split is not None else " (the default here)"
            raise DatasetError(f"{self.path}: no records with split {wanted!r}{default}; present: {present}; "
                               f"pick one with --split")
        return rows

    def key(self, raw, label, rid) -> str:
        try:
            return normalize_key(raw, self.image_root)
        except ValueError as e:
            raise self.fail(label, rid, str(e)) from None


def _text(row: dict, names, source: _Source, label, rid, required: bool = True, default=None):
    """The first of `names` present and non-empty in `row`, as stripped text
    (numbers become text: VQA-RAD has numeric answers)."""
    empty = None
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise source.fail(label, rid, f"field {name!r} must be text, got {type(value).__name__}")
        if str(value).strip():
            return str(value).strip()
        empty = empty or name
    if required:
        if empty:
            raise source.fail(label, rid, f"field {empty!r} is empty")
        wanted = " or ".join(repr(n) for n in names)
        raise source.fail(label, rid, f"missing field {wanted} (fields present: {sorted(row)})")
    return default


def _split_field(row: dict) -> str | None:
    value = row.get("split")
    return None if value in (None, "") else str(value)


def _row_id(row: dict, names, index: int) -> str:
    # Files without ids get their position: unique, stable for a given file.
    for name in names:
        value = row.get(name)
        if value not in (None, ""):
            return str(value)
    return str(index)


def _answer_type(value, answer: str, source, label, rid, infer: bool) -> str | None:
    if value in (None, ""):
        if not infer:
            return None
        # Closed questions are the yes/no ones (how PathVQA's closed split is defined).
        return "closed" if answer.strip().lower() in ("yes", "no") else "open"
    kind = str(value).strip().lower()
    if kind in ("closed", "close"):
        return "closed"
    if kind == "open":
        return "open"
    raise source.fail(label, rid, f"answer_type {value!r} is not CLOSED or OPEN")


_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


def _strip_image_token(text: str) -> str:
    # "<image>\nWhat is ...?" -> "What is ...?"; a token mid-text leaves a line break.
    return _IMAGE_TOKEN.sub("\n", text).strip()


# ----------------------------------------------------------------------------- formats

def _is_image_file(path: str, name: str) -> bool:
    """What load_image reads: an IMAGE_SUFFIXES suffix (any case), or the DICOM magic.
    DICOM exports are often named without a suffix (IM0001) or by UID
    (1.2.840.113619.2.55.3, whose "suffix" is ".3"), so any other name is
    checked for the magic."""
    if name.startswith("."):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES or has_dicom_magic(path)


def _h5_keys(path, rel: str) -> list[str]:
    """The keys of every image in the HDF5 file `path` (`rel`: its key-normalised name)."""
    try:
        stacks = image_datasets(path)
    except H5OpenError as e:
        raise DatasetError(f"{path}: {e}; fix or remove it (or move it out of the image folder)") from None
    return [h5_key(rel, name, i) for name, n in stacks for i in range(n)]


@register_format("folder")
def _folder(data, source: _Source) -> list[Record]:
    """Every image file (see `_is_image_file`) under the directory, and every image of
    every image stack in its .h5/.hdf5 files, sorted; hidden files and folders
    (.DS_Store, ._x.png) skipped, symlinked folders followed."""
    top = Path(source.path) if source.path is not None else Path(source.image_root)
    root = Path(source.image_root)
    if not top.is_dir():
        raise DatasetError(f"{top}: not a directory of images")
    inside = os.path.relpath(os.path.abspath(top), os.path.abspath(root))
    if inside == ".." or inside.startswith(".." + os.sep):
        raise DatasetError(f"{top}: image folder is not inside the image root {root}; "
                           f"pass the folder itself as the image root")
    keys, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if "::" in name and (_is_image_file(full, name) or name.lower().endswith(H5_SUFFIXES)):
                raise DatasetError(f"{full}: '::' in a file name cannot be part of a cache key (it marks an image "
                                   f"inside an HDF5 file); rename the file")
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in H5_SUFFIXES:
                keys += _h5_keys(full, normalize_key(os.path.relpath(full, root).replace(os.sep, "/")))
            elif _is_image_file(full, name):
                keys.append(normalize_key(os.path.relpath(full, root).replace(os.sep, "/")))
    return [Record(id=key, images=(key,), turns=(), task="image") for key in sorted(keys)]


_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")


@register_format("llava")
def _llava(data, source: _Source) -> list[Record]:
    for index, (label, row, split) in enumerate(source.rows(data, "a JSON list of LLaVA records")):
        rid = _row_id(row, ("id",), index)
        image = row.get("image")
        if image in (None, "", []):
            raise source.fail(label, rid, "text-only record (no 'image'); MedAlign distils image targets, "
                                          "so every record needs an image: remove text-only records")
        images = image if isinstance(image, list) else [image]
        conversation = row.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            raise source.fail(label, rid, "missing or empty 'conversations' list")
        texts = []
        for j, message in enumerate(conversation):
            role = str(message.get("from", "")).lower() if isinstance(message, dict) else None
            expected = _HUMAN if j % 2 == 0 else _GPT
            if role not in expected:
                raise source.fail(label, rid, f"conversations[{j}] is from {role!r}; expected "
                                              f"{expected[0]!r} (turns alternate human, gpt)")
            value = message.get("value")
            if not isinstance(value, str):
                raise source.fail(label, rid, f"conversations[{j}] has no text 'value'")
            texts.append(_strip_image_token(value))
        if len(texts) % 2:
            raise source.fail(label, rid, "the conversation ends with a human turn that has no gpt answer")
        turns = tuple(zip(texts[0::2], texts[1::2]))
        kind = _answer_type(row.get("answer_type"), turns[0][1], source, label, rid, infer=False)
        source.add(label, id=rid, images=tuple(source.key(k, label, rid) for k in images), turns=turns,
                   task="vqa" if kind else "instruct", answer_type=kind, split=split)
    return source.records


@register_format("llava-jsonl")
def _llava_jsonl(data, source: _Source) -> list[Record]:
    for index, (label, row, split) in enumerate(source.rows(data)):
        rid = _row_id(row, ("question_id", "id"), index)
        image = _text(row, ("image",), source, label, rid)
        question = _strip_image_token(_text(row, ("text", "question"), source, label, rid))
        # Question files for inference carry no answer; evaluation copies do.
        answer = _text(row, ("answer", "gpt4_answer", "gpt_answer"), source, label, rid, required=False, default="")
        kind = _answer_type(row.get("answer_type"), answer, source, label, rid, infer=False)
        source.add(label, id=rid, images=(source.key(image, label, rid),), turns=((question, answer),),
                   task="vqa" if kind else "instruct", answer_type=kind, split=split)
    return source.records


@register_format("r2gen")
def _r2gen(data, source: _Source) -> list[Record]:
    if not isinstance(data, dict):
        raise DatasetError(f"{source.path}: an R2Gen annotation file is an object "
                           f'{{"train": [...], "val": [...], "test": [...]}}, got a {type(data).__name__}')
    split = source.split or source.default_split or "train"
    if split not in data:
        default = "" if source.split else " (the default here)"
        raise DatasetError(f"{source.path}: no split {split!r}{default}; present: {sorted(data)}; "
                           f"pick one with --split")
    rows = data[split]
    labeled = _Source(source.path, source.image_root, None, [f"{split}[{i}]" for i in range(len(rows))]
                      if isinstance(rows, list) else None)
    for label, row, _ in labeled.rows(rows, f"a list of records under {split!r}"):
        rid = _text(row, ("id",), source, label, None)
        report = _text(row, ("report",), source, label, rid)
        paths = row.get("image_path")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths:
            raise source.fail(label, rid, "missing or empty 'image_path' (a list of image paths)")
        source.add(label, id=rid, images=tuple(source.key(p, label, rid) for p in paths),
                   turns=((REPORT_PROMPT, report),), task="report", split=split)
    return source.records


_LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}


def _vqa(data, source: _Source, image_fields, id_fields, by_language=False, default_suffix=None, split_of=None):
    languages = set()
    for index, (label, row, split) in enumerate(source.rows(data, split_of=split_of)):
        if by_language:
            language = str(row.get("q_lang", "en")).strip().lower()
            languages.add(language)
            if source.lang != "all" and language != source.lang:
                continue
        rid = _row_id(row, id_fields, index)
        image = _text(row, image_fields, source, label, rid)
        if default_suffix and not posixpath.splitext(image.replace("\\", "/"))[1]:
            image += default_suffix
        question = _strip_image_token(_text(row, ("question",), source, label, rid))
        answer = _text(row, ("answer",), source, label, rid)
        kind = _answer_type(row.get("answer_type"), answer, source, label, rid, infer=True)
        source.add(label, id=rid, images=(source.key(image, label, rid),), turns=((question, answer),),
                   task="vqa", answer_type=kind, split=split)
    if not source.records and by_language and languages:
        name = _LANGUAGE_NAMES.get(source.lang, source.lang)
        raise DatasetError(f"{source.path}: no {name} questions (q_lang {source.lang!r}); present: "
                           f"{sorted(languages)}; choose them with --lang ({', '.join(LANGUAGES)})")
    return source.records


def _vqa_rad_split(row: dict) -> str | None:
    """VQA-RAD's public JSON has no split field: its test questions are the
    phrase_type "test_freeform" / "test_para" ones, the rest ("freeform", "para")
    are training questions. A 'split' field, where a file has one, wins."""
    split = _split_field(row)
    phrase = row.get("phrase_type")
    if split is not None or phrase in (None, ""):
        return split
    return "test" if str(phrase).strip().lower().startswith("test") else "train"


@register_format("vqa-rad")
def _vqa_rad(data, source):
    return _vqa(data, source, ("image_name",), ("qid", "id"), split_of=_vqa_rad_split)


@register_format("slake")
def _slake(data, source):
    """SLAKE: the questions in `source.lang` (q_lang; "en" by default, "all" for both halves)."""
    return _vqa(data, source, ("img_name",), ("qid", "id"), by_language=True)


@register_format("pathvqa")
def _pathvqa(data, source):
    """PathVQA: an image name without suffix ("train_0422") gets ".jpg", the
    format PathVQA ships its images in."""
    return _vqa(data, source, ("image", "image_name", "img_name"), ("qid", "question_id", "id"),
                default_suffix=".jpg")


_CSV_COLUMNS = {
    "image": ("image", "image_path", "path", "filename", "file", "img_name", "image_name"),
    "question": ("question", "prompt", "instruction"),
    "answer": ("answer", "response"),
    "report": ("report", "findings", "impression"),
    "id": ("id", "qid", "question_id"),
}


@register_format("csv")
def _csv(data, source: _Source) -> list[Record]:
    """A table: image column (image/image_path/path/filename/...); with a report
    column -> task "report" (prompt: the question column or REPORT_PROMPT); with
    a question column -> "vqa"; image only -> task "image". Headers are matched
    case-insensitively."""
    return _table(data, source)


def _table(data, source: _Source, image_of=None) -> list[Record]:
    """`_csv`'s rows -> records; `image_of(label)`, when given, is the row's image key
    instead of its image column (the h5 format: rows aligned with an HDF5 dataset)."""
    rows = source.rows(data, "a table of rows")
    if not rows:
        return []
    header = {name.strip().lower(): name for name in rows[0][1] if isinstance(name, str)}
    columns = {role: [header[n] for n in names if n in header] for role, names in _CSV_COLUMNS.items()}
    if not columns["image"] and image_of is None:
        raise DatasetError(f"{source.path}: no image column; name one of {_CSV_COLUMNS['image']} "
                           f"(columns present: {sorted(header.values())})")
    for index, (label, row, split) in enumerate(rows):
        rid = _row_id(row, columns["id"], index)
        image = image_of(label) if image_of is not None else \
            source.key(_text(row, columns["image"], source, label, rid), label, rid)
        question = _text(row, columns["question"], source, label, rid, required=False)
        answer = _text(row, columns["answer"], source, label, rid, required=False, default="")
        report = _text(row, columns["report"], source, label, rid, required=False)
        if columns["report"]:
            turns, task, kind = ((question or REPORT_PROMPT, report or ""),), "report", None
        elif columns["question"]:
            if not question:
                raise source.fail(label, rid, f"empty question in column {columns['question'][0]!r}")
            kind = _answer_type(row.get(header.get("answer_type", "answer_type")), answer, source, label, rid,
                                infer=bool(answer))
            turns, task = ((_strip_image_token(question), answer),), "vqa"
        else:
            turns, task, kind = (), "image", None
        source.add(label, id=rid, images=(image,), turns=turns, task=task, answer_type=kind, split=split)
    return source.records


_H5_FIELDS = {"images", "texts"}


@register_format("h5")
def _h5(data, source: _Source) -> list[Record]:
    """{"images": "<file>::<dataset>", "texts": "<table>"}: image i is row i of the dataset
    (<file> relative to the image root; "::<dataset>" may be left out when the file holds
    one image stack), described by row i of the table (CSV/TSV/JSON/JSONL, path relative
    to this file; read like the csv format, any image column ignored; a JSON list of
    strings is a list of reports). Without "texts": images only. (An HDF5 file given as
    the dataset file itself is read by `_h5_file`.)"""
    if not isinstance(data, dict) or not isinstance(data.get("images"), str) or set(data) - _H5_FIELDS:
        raise DatasetError(f"{source.path}: an h5 dataset file is an HDF5 file, or a JSON object "
                           f'{{"images": "<file>::<dataset>", "texts": "<table of texts>"}} ("texts" optional)'
                           + (f"; unknown fields {sorted(set(data) - _H5_FIELDS)}" if isinstance(data, dict) else ""))
    ref = data["images"]
    where = f"{source.path}: 'images' {ref!r}"
    file_part, _, dataset = ref.partition("::")
    try:
        file = normalize_key(file_part, source.image_root)
        if dataset:
            dataset = parse_h5_key(f"{file}::{dataset}[0]")[1]
    except ValueError as e:
        raise DatasetError(f"{where}: {e}") from None
    container = Path(source.image_root) / file
    if not dataset:
        try:
            stacks = image_datasets(container)
        except H5OpenError as e:
            raise DatasetError(f"{where}: {container}: {e}") from None
        if len(stacks) != 1:
            raise DatasetError(f"{where}: {container} holds {len(stacks)} image stacks "
                               f"({', '.join(name for name, _ in stacks[:8]) or 'none'}); name one: "
                               f"\"{file}::<dataset>\"")
        dataset, n = stacks[0]
    else:
        try:
            n = dataset_length(container, dataset)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from None
    keys = [h5_key(file, dataset, i) for i in range(n)]
    if data.get("texts") is None:
        return [Record(id=key, images=(key,), turns=(), task="image") for key in keys]

    table = Path(source.path).parent / str(data["texts"])
    rows, labels, _ = _read(table)
    if isinstance(rows, list) and rows and all(isinstance(r, str) for r in rows):
        rows = [{"report": r} for r in rows]
    if not isinstance(rows, list) or len(rows) != n:
        count = f"{len(rows)} rows" if isinstance(rows, list) else f"a {type(rows).__name__}, not a list of rows"
        raise DatasetError(f"{table}: {count}, but {file}::{dataset} holds {n} images; row i of the texts "
                           f"describes image i, so there must be one row per image")
    labels = labels or [f"record {i}" for i in range(n)]
    image_at = dict(zip(labels, keys))
    texts = _Source(table, source.image_root, source.split, labels, source.default_split, source.lang)
    return _table(rows, texts, image_of=image_at.__getitem__)


def _h5_file(path: Path, image_root: Path) -> list[Record]:
    """--data x.h5: every image of every image stack in it (images only, like a folder)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(image_root))
    if rel == ".." or rel.startswith(".." + os.sep):
        raise DatasetError(f"{path}: HDF5 file is not inside the image root {image_root}; its images' keys are "
                           f"relative to it: pass its folder (or a folder above) as --image-root")
    keys = _h5_keys(path, normalize_key(rel.replace(os.sep, "/")))
    if not keys:
        raise DatasetError(f"{path}: no image stacks in this HDF5 file (numeric datasets [N,H,W], [N,H,W,C] or "
                           f"[N,C,H,W]); name a dataset with a JSON file "
                           f'{{"images": "<file>::<dataset>"}} (--format h5) if the layout was not recognised')
    return [Record(id=key, images=(key,), turns=(), task="image") for key in keys]


# ----------------------------------------------------------------------------- reading and detection

def _read(path: Path) -> tuple[object, list[str] | None, str]:
    """-> (parsed content, per-row labels for errors or None, kind json|jsonl|csv)."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Excel / Windows tools
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text (a pickle, parquet or spreadsheet?); "
                           f"convert it to JSON, JSONL or CSV") from None
    if not text.strip():
        raise DatasetError(f"{path}: empty file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        rows, labels = [], []
        for row in reader:
            if None in row:
                raise DatasetError(f"{path}: row {reader.line_num} has more cells than the header")
            rows.append(row)
            labels.append(f"row {reader.line_num}")
        return rows, labels, "csv"
    if suffix != ".jsonl":
        try:
            return json.loads(text), None, "json"
        except json.JSONDecodeError as e:
            # Several documents one per line: a .json that is really JSONL.
            if not (e.msg.startswith("Extra data") and e.lineno > 1):
                raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    rows, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {number}, column {e.colno}: invalid JSON: {e.msg}") from None
        labels.append(f"line {number}")
    return rows, labels, "jsonl"


_RECORD_FIELDS = {"image", "conversations", "question", "image_name", "img_name", "text", "question_id"}


def _object_hint(data) -> str:
    """What a JSON object given where a list of records belongs most likely is."""
    if not isinstance(data, dict):
        return ""
    if _RECORD_FIELDS & set(data):
        return " (this looks like ONE record: a dataset is a list of records, wrap it in [ ])"
    lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if lists:
        return f" (the records seem to be the list under {lists[0]!r}: save that list as the dataset file)"
    return ""


def detect_format(data, kind: str, path=None) -> str:
    """The format name for parsed content, from its shape and field names."""
    if kind == "csv":
        return "csv"
    if isinstance(data, dict):
        if isinstance(data.get("images"), str) and set(data) <= _H5_FIELDS:
            return "h5"
        for value in data.values():
            if isinstance(value, list) and value and isinstance(value[0], dict) and \
                    ("image_path" in value[0] or "report" in value[0]):
                return "r2gen"
        raise DatasetError(f"{path}: cannot tell the format of an object with keys {sorted(data)[:8]}"
                           f"{_object_hint(data)}; expected an R2Gen file "
                           f"{{\"train\": [{{\"id\", \"report\", \"image_path\"}}]}} "
                           f"or a list of records; choose one with --format ({', '.join(FORMATS)})")
    if isinstance(data, list):
        if not data:
            raise DatasetError(f"{path}: no records (empty list)")
        first = data[0]
        if not isinstance(first, dict):
            raise DatasetError(f"{path}: record 0 is a {type(first).__name__}, expected an object with fields")
        keys = set(first)
        if "conversations" in keys:
            return "llava"
        if "question_id" in keys and "text" in keys:
            return "llava-jsonl"
        if "img_name" in keys and "question" in keys:
            return "slake"
        if "image_name" in keys and "question" in keys:
            return "vqa-rad"
        if "image" in keys and "question" in keys:
            return "pathvqa"
        if "image" in keys and "text" in keys:
            return "llava-jsonl"
        raise DatasetError(f"{path}: cannot tell the format from record 0's fields {sorted(keys)}; "
                           f"choose one with --format ({', '.join(FORMATS)})")
    raise DatasetError(f"{path}: expected a list of records or an R2Gen object, got {type(data).__name__}")


def load_records(path, image_root, fmt: str = "auto", split: str | None = None, *,
                 default_split: str | None = None, lang: str = "en") -> list[Record]:
    """Read a dataset file (or, with path None or a directory, an image folder)
    into records. Checks the file, not the images: see `missing_images`.

    `split`: the split to read (an error where the file has none); `default_split`:
    the one read without `split` where the file holds splits (module docstring);
    `lang`: SLAKE's question language, one of LANGUAGES."""
    image_root = Path(image_root)
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if lang not in LANGUAGES:
        raise DatasetError(f"unknown question language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    if path is None or Path(path).is_dir() or fmt == "folder":
        if fmt not in ("auto", "folder"):
            raise DatasetError(f"{path or image_root}: format {fmt!r} needs a dataset file (--data), "
                               f"got {'a directory' if path is not None else 'none'}")
        source = _Source(None if path is None else Path(path), image_root, split)
        records = _folder(None, source)
        if not records:
            raise DatasetError(f"{path or image_root}: no image files ({', '.join(IMAGE_SUFFIXES + H5_SUFFIXES)}) "
                               f"found")
        return records

    path = Path(path)
    if fmt in ("auto", "h5") and is_hdf5(path):
        return _h5_file(path, image_root)
    data, labels, kind = _read(path)
    name = detect_format(data, kind, path) if fmt == "auto" else fmt
    records = FORMATS[name](data, _Source(path, image_root, split, labels, default_split, lang))
    if not records:
        raise DatasetError(f"{path}: no records")
    return records
