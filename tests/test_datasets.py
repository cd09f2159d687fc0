"""load_records: each real-world format from a small realistic fixture (real field
names), auto-detection, one key per image across formats, and every validation
error naming the file and the record."""
import json
import os

import pytest

from precompute.datasets import (FORMATS, LANGUAGES, REPORT_PROMPT, DatasetError, Record, cache_keys,
                                 load_records, missing_images, register_format, resolve_image)

# ----------------------------------------------------------------------------- fixtures (real field names)

LLAVA = [  # LLaVA-Med instruction data (llava_med_instruct_60k style)
    {"id": "PMC4983521_F2", "image": "xmlab1/source.jpg",
     "conversations": [
         {"from": "human", "value": "<image>\nWhat imaging modality was used?"},
         {"from": "gpt", "value": "The image is an axial CT scan of the chest."},
         {"from": "human", "value": "Is there a pleural effusion?"},
         {"from": "gpt", "value": "No pleural effusion is visible."}]},
    {"id": "PMC3160480_F1", "image": "./synpic54610.jpg",
     "conversations": [
         {"from": "human", "value": "What is shown in this image?\n<image>"},
         {"from": "gpt", "value": "An MRI of the brain."}]},
]

LLAVA_JSONL = [  # LLaVA-Med eval question file (llava_med_eval_qa50_qa.jsonl style)
    {"question_id": 0, "image": "xmlab1/source.jpg", "domain": {"chest_xray": False, "ct_scan": True},
     "type": "conversation", "text": "<image>\nWhat organ is shown?", "gpt4_answer": "The lungs."},
    {"question_id": 1, "image": "synpic54610.jpg", "type": "detailed", "text": "Describe the image."},
]

R2GEN = {  # IU-Xray annotation.json (R2Gen)
    "train": [
        {"id": "CXR2384_IM-0942", "report": "The heart size and pulmonary vascularity appear within normal "
         "limits. The lungs are free of focal airspace disease.", "image_path":
         ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"},
        {"id": "CXR2926_IM-1328", "report": "Cardiomediastinal silhouette is normal. No pneumothorax.",
         "image_path": ["CXR2926_IM-1328/0.png", "CXR2926_IM-1328/1.png"], "split": "train"}],
    "val": [{"id": "CXR1000_IM-0003", "report": "No acute cardiopulmonary abnormality.",
             "image_path": ["CXR1000_IM-0003/0.png"], "split": "val"}],
    "test": [{"id": "CXR1001_IM-0004", "report": "Mild cardiomegaly.",
              "image_path": ["CXR1001_IM-0004/0.png", "CXR1001_IM-0004/1.png"], "split": "test"}],
}

VQA_RAD = [  # VQA_RAD Dataset Public.json
    {"qid": 1, "phrase_type": "freeform", "qid_linked_id": "03f451ca-de62-4617-9679-e836026a7642",
     "image_case_url": "https://medpix.nlm.nih.gov/case?id=48e1dd0e-8552-46ad-a354-5eb55be86de6",
     "image_name": "synpic54610.jpg", "image_organ": "HEAD", "evaluation": "not evaluated",
     "question": "Are regions of the brain infarcted?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED"},
    {"qid": 2, "image_name": "synpic29265.jpg", "image_organ": "CHEST", "question": "How many ribs are seen?",
     "question_type": "COUNT", "answer": 12, "answer_type": "OPEN "},
]

SLAKE = [  # Slake1.0/train.json
    {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which part of the body does this image belong to?",
     "answer": "Chest", "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN",
     "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 0},
    {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "这张图片属于身体的哪个部位?", "answer": "胸部",
     "q_lang": "zh", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 1},
    {"img_id": 2, "img_name": "xmlab2/source.jpg", "question": "Does the picture contain liver?", "answer": "No",
     "q_lang": "en", "location": "Abdomen", "modality": "MRI", "answer_type": "CLOSED", "base_type": "vqa",
     "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 2},
]

PATHVQA = [  # PathVQA qa pairs exported to JSON
    {"image": "train_0422", "question": "Does this image show the cortex?", "answer": "yes"},
    {"image": "train_0423.jpg", "question": "What is present?", "answer": "endocrine"},
]

CSV = ("image_path,question,answer,answer_type\n"
       "xmlab1\\source.jpg,What modality is this?,CT,OPEN\n"
       "synpic54610.jpg,Is this a brain MRI?,yes,\n")


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in content) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


FIXTURES = {  # format -> (file name, content)
    "llava": ("train.json", LLAVA),
    "llava-jsonl": ("questions.jsonl", LLAVA_JSONL),
    "r2gen": ("annotation.json", R2GEN),
    "vqa-rad": ("VQA_RAD Dataset Public.json", VQA_RAD),
    "slake": ("train.json", SLAKE),
    "pathvqa": ("train_qa.json", PATHVQA),
    "csv": ("questions.csv", CSV),
}


@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_auto_detection_picks_each_format(tmp_path, fmt):
    path = write(tmp_path, *FIXTURES[fmt])
    auto = load_records(path, tmp_path / "images")
    assert auto == load_records(path, tmp_path / "images", fmt=fmt)


def test_llava(tmp_path):
    first, second = load_records(write(tmp_path, *FIXTURES["llava"]), tmp_path)
    assert first == Record("PMC4983521_F2", ("xmlab1/source.jpg",),
                           (("What imaging modality was used?", "The image is an axial CT scan of the chest."),
                            ("Is there a pleural effusion?", "No pleural effusion is visible.")), "instruct")
    assert second.prompt == "What is shown in this image?" and second.answer == "An MRI of the brain."
    assert second.images == ("synpic54610.jpg",)


def test_llava_jsonl(tmp_path):
    a, b = load_records(write(tmp_path, *FIXTURES["llava-jsonl"]), tmp_path)
    assert (a.id, a.images, a.prompt, a.answer, a.task) == ("0", ("xmlab1/source.jpg",), "What organ is shown?",
                                                            "The lungs.", "instruct")
    assert b.answer == ""                                 # inference question files carry no answer


def test_r2gen_splits(tmp_path):
    path = write(tmp_path, *FIXTURES["r2gen"])
    train = load_records(path, tmp_path)
    assert [r.id for r in train] == ["CXR2384_IM-0942", "CXR2926_IM-1328"]
    assert train[0].images == ("CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png")
    assert train[0].turns == ((REPORT_PROMPT, R2GEN["train"][0]["report"]),) and train[0].task == "report"
    assert [r.id for r in load_records(path, tmp_path, split="test")] == ["CXR1001_IM-0004"]
    assert {r.split for r in train} == {"train"}


def test_r2gen_default_split_is_the_callers(tmp_path):
    """Evaluation asks for "test" when no split is given; build and training keep "train"."""
    path = write(tmp_path, *FIXTURES["r2gen"])
    (record,) = load_records(path, tmp_path, default_split="test")
    assert (record.id, record.split) == ("CXR1001_IM-0004", "test")
    assert [r.id for r in load_records(path, tmp_path, split="val", default_split="test")] == ["CXR1000_IM-0003"]
    with pytest.raises(DatasetError, match=r"no split 'test' \(the default here\); present: \['train'\]"):
        load_records(write(tmp_path, "a.json", {"train": R2GEN["train"]}), tmp_path, default_split="test")


def test_vqa_rad(tmp_path):
    a, b = load_records(write(tmp_path, *FIXTURES["vqa-rad"]), tmp_path)
    assert (a.id, a.images, a.prompt, a.answer, a.task, a.answer_type) == (
        "1", ("synpic54610.jpg",), "Are regions of the brain infarcted?", "Yes", "vqa", "closed")
    assert (b.answer, b.answer_type) == ("12", "open")   # numeric answer, padded answer type


VQA_RAD_PHRASES = [dict(VQA_RAD[0], qid=i, phrase_type=phrase) for i, phrase in
                   enumerate(["freeform", "para", "test_freeform", "test_para"])]


def test_vqa_rad_phrase_type_is_the_split(tmp_path):
    """The public VQA-RAD JSON has no split field: phrase_type test_* marks the test set."""
    path = write(tmp_path, "VQA_RAD Dataset Public.json", VQA_RAD_PHRASES)
    assert [r.id for r in load_records(path, tmp_path, split="test")] == ["2", "3"]
    assert [(r.id, r.split) for r in load_records(path, tmp_path, split="train")] == [("0", "train"),
                                                                                       ("1", "train")]
    assert [r.split for r in load_records(path, tmp_path)] == ["train", "train", "test", "test"]
    assert [r.id for r in load_records(path, tmp_path, default_split="test")] == ["2", "3"]
    own = write(tmp_path, "own.json", [dict(VQA_RAD_PHRASES[2], split="train")])   # a split field wins
    assert [r.split for r in load_records(own, tmp_path)] == ["train"]


def test_default_split_reads_a_file_without_splits_whole(tmp_path):
    path = write(tmp_path, *FIXTURES["pathvqa"])
    assert len(load_records(path, tmp_path, default_split="test")) == 2
    assert {r.split for r in load_records(path, tmp_path)} == {None}


def test_slake_keeps_english_unless_asked(tmp_path):
    path = write(tmp_path, *FIXTURES["slake"])
    records = load_records(path, tmp_path)
    assert [(r.id, r.answer_type) for r in records] == [("0", "open"), ("2", "closed")]
    (zh,) = load_records(path, tmp_path, lang="zh")
    assert (zh.id, zh.answer) == ("1", "胸部")
    assert [r.id for r in load_records(path, tmp_path, lang="all")] == ["0", "1", "2"]
    assert LANGUAGES == ("en", "zh", "all")
    with pytest.raises(DatasetError, match=r"no Chinese questions \(q_lang 'zh'\); present: \['en'\]; "
                                           r"choose them with --lang"):
        load_records(write(tmp_path, "en.json", [SLAKE[0]]), tmp_path, lang="zh")
    with pytest.raises(DatasetError, match="unknown question language 'fr'"):
        load_records(path, tmp_path, lang="fr")


def test_pathvqa_suffix_and_inferred_answer_type(tmp_path):
    a, b = load_records(write(tmp_path, *FIXTURES["pathvqa"]), tmp_path)
    assert (a.images, a.answer_type, a.id) == (("train_0422.jpg",), "closed", "0")
    assert (b.images, b.answer_type) == (("train_0423.jpg",), "open")


def test_csv(tmp_path):
    a, b = load_records(write(tmp_path, *FIXTURES["csv"]), tmp_path)
    assert (a.images, a.prompt, a.answer, a.answer_type, a.task) == (
        ("xmlab1/source.jpg",), "What modality is this?", "CT", "open", "vqa")
    assert b.answer_type == "closed"


def test_csv_report_and_image_only_tables(tmp_path):
    (rep,) = load_records(write(tmp_path, "r.csv", "\ufeffFilename,Findings\na.png,Clear lungs.\n"), tmp_path)
    assert (rep.task, rep.prompt, rep.answer) == ("report", REPORT_PROMPT, "Clear lungs.")
    (img,) = load_records(write(tmp_path, "i.tsv", "image\tlabel\nb.png\t1\n"), tmp_path)
    assert (img.task, img.turns, img.prompt) == ("image", (), "")


def test_same_image_same_key_across_formats(tmp_path):
    root = tmp_path / "images"
    (root / "xmlab1").mkdir(parents=True)
    (root / "xmlab1" / "source.jpg").write_bytes(b"")
    keys = {fmt: {k for k in cache_keys(load_records(write(tmp_path, *FIXTURES[fmt]), root)) if "xmlab1" in k}
            for fmt in ("llava", "llava-jsonl", "slake", "csv")}
    keys["folder"] = set(cache_keys(load_records(None, root)))
    keys["absolute"] = {r.images[0] for r in load_records(write(tmp_path, "abs.json", [
        {"image": str(root / "xmlab1" / "source.jpg"), "question": "q", "answer": "a"}]), root)}
    assert all(k == {"xmlab1/source.jpg"} for k in keys.values()), keys


def test_folder_lists_images_sorted(tmp_path):
    root = tmp_path / "images"
    for name in ["b/2.PNG", "b/1.jpg", "a.dcm", "c/d/e.tiff", "notes.txt", ".DS_Store", "b/._1.jpg", ".cache/x.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    expected = ["a.dcm", "b/1.jpg", "b/2.PNG", "c/d/e.tiff"]
    records = load_records(None, root)
    assert [r.id for r in records] == expected and cache_keys(records) == expected
    assert all(r.task == "image" and r.turns == () and r.images == (r.id,) for r in records)
    assert [r.id for r in load_records(root / "b", root)] == ["b/1.jpg", "b/2.PNG"]   # a sub-folder, keys from root


def test_folder_finds_dicom_by_suffix_and_by_magic(tmp_path):
    """The scan takes what load_image reads: .dicom, and any name (IM0001, a UID whose
    "suffix" is ".3") holding the DICM magic at byte 128."""
    root = tmp_path / "images"
    root.mkdir()
    dicm = b"\0" * 128 + b"DICM" + b"\2\0" * 8
    for name in ["IM0001", "1.2.840.113619.2.55.3", "b.DICOM"]:
        (root / name).write_bytes(dicm)
    (root / "README").write_text("study notes, not an image\n")
    (root / "short").write_bytes(b"DICM")                         # too short to hold the magic at 128
    assert cache_keys(load_records(None, root)) == ["1.2.840.113619.2.55.3", "IM0001", "b.DICOM"]


def test_split_field_filters_record_lists(tmp_path):
    rows = [dict(VQA_RAD[0], split="train"), dict(VQA_RAD[1], split="test")]
    assert [r.id for r in load_records(write(tmp_path, "all.json", rows), tmp_path, split="test")] == ["2"]


def test_json_file_holding_jsonl(tmp_path):
    path = write(tmp_path, "questions.json", "\n".join(json.dumps(r) for r in LLAVA_JSONL))
    assert len(load_records(path, tmp_path)) == 2


def test_missing_images_and_resolve(tmp_path):
    records = load_records(write(tmp_path, *FIXTURES["r2gen"]), tmp_path / "images")
    (tmp_path / "images" / "CXR2384_IM-0942").mkdir(parents=True)
    (tmp_path / "images" / "CXR2384_IM-0942" / "0.png").write_bytes(b"")
    assert missing_images(records, tmp_path / "images") == [
        "CXR2384_IM-0942/1.png", "CXR2926_IM-1328/0.png", "CXR2926_IM-1328/1.png"]
    assert resolve_image(tmp_path / "images", "a/b.png") == tmp_path / "images" / "a" / "b.png"


@pytest.mark.parametrize("key", ["../secret.png", "a/../../secret.png", "/etc/passwd", "C:\\data\\x.png", ""])
def test_resolve_image_refuses_escapes(tmp_path, key):
    with pytest.raises(DatasetError, match="image key"):
        resolve_image(tmp_path, key)


def test_symlink_out_of_the_root_is_allowed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"x")
    root = tmp_path / "images"
    root.mkdir()
    os.symlink(outside, root / "linked")
    assert resolve_image(root, "linked/x.png").is_file()
    assert cache_keys(load_records(None, root)) == ["linked/x.png"]


# ----------------------------------------------------------------------------- validation errors

def llava_row(i, image="a.png", **extra):
    return {"id": f"r{i}", "image": image, **extra,
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}


ERRORS = [  # (name, file name, content, fmt, split, message pattern)
    ("malformed json", "x.json", '[\n  {"id": "a",}\n]', "auto", None, r"invalid JSON at line 2, column"),
    ("malformed jsonl line", "x.jsonl", '{"question_id": 1, "image": "a.png", "text": "q"}\n{"oops"\n',
     "auto", None, r"line 2, column \d+: invalid JSON"),
    ("empty file", "x.json", "  \n", "auto", None, "empty file"),
    ("empty list", "x.json", [], "auto", None, "no records"),
    ("llava top level object", "x.json", {"data": [llava_row(0)]}, "llava", None, "expected a JSON list"),
    ("r2gen given a list", "x.json", [llava_row(0)], "r2gen", None, "R2Gen annotation file is an object"),
    ("unknown shape", "x.json", [{"path": "a.png", "caption": "c"}], "auto", None, "cannot tell the format"),
    ("row not an object", "x.json", [llava_row(0), "a.png"], "llava", None, "record 1: expected an object"),
    ("missing question", "x.json", [{"qid": 7, "image_name": "a.jpg", "answer": "yes"}], "vqa-rad", None,
     r"record 0 \(id '7'\): missing field 'question'"),
    ("empty answer", "x.json", [{"qid": 7, "image_name": "a.jpg", "question": "q", "answer": " "}], "vqa-rad",
     None, "field 'answer' is empty"),
    ("missing image_path", "x.json", {"train": [{"id": "c1", "report": "r"}]}, "r2gen", None,
     r"train\[0\] \(id 'c1'\): missing or empty 'image_path'"),
    ("absent split", "x.json", R2GEN, "r2gen", "valid", r"no split 'valid'; present: \['test', 'train', 'val'\]"),
    ("split on a file without splits", "x.json", PATHVQA, "auto", "test", "no 'split' field"),
    ("text-only llava", "x.json", [llava_row(0), {"id": "t1", "conversations": []}], "llava", None,
     r"record 1 \(id 't1'\): text-only record"),
    ("trailing human turn", "x.json", [{"id": "h", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}]}], "llava", None, "ends with a human turn"),
    ("roles out of order", "x.json", [{"id": "h", "image": "a.png", "conversations": [
        {"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}], "llava", None,
     r"conversations\[0\] is from 'gpt'"),
    ("duplicate ids", "x.json", [llava_row(0), llava_row(1), llava_row(0, "b.png")], "auto", None,
     r"duplicate id 'r0' \(record 0 and record 2\)"),
    ("duplicate qids in jsonl", "x.jsonl", [{"question_id": 5, "image": "a.png", "text": "q"}] * 2, "auto", None,
     r"duplicate id '5' \(line 1 and line 2\)"),
    ("key escapes root", "x.json", [llava_row(0, "../../etc/passwd")], "auto", None, "leaves the image root"),
    ("absolute key outside root", "x.json", [llava_row(0, "/data/other/a.png")], "auto", None,
     "is not under the image root"),
    ("bad answer type", "x.json", [{"qid": 1, "image_name": "a.jpg", "question": "q", "answer": "a",
                                    "answer_type": "MAYBE"}], "vqa-rad", None, "answer_type 'MAYBE'"),
    ("slake without english", "x.json", [SLAKE[1]], "slake", None, "no English questions"),
    ("csv without image column", "x.csv", "question,answer\nq,a\n", "auto", None, "no image column"),
    ("csv ragged row", "x.csv", "image,question\na.png,q,extra\n", "auto", None, "row 2 has more cells"),
    ("not text", "x.json", b"\x80\x03]q\x00.".decode("latin-1"), "auto", None, None),
]


@pytest.mark.parametrize("name, filename, content, fmt, split, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_validation_errors_name_the_file_and_record(tmp_path, name, filename, content, fmt, split, message):
    path = write(tmp_path, filename, content)
    if message is None:                                   # a pickle: not UTF-8
        path.write_bytes(b"\x80\x03]q\x00.")
        message = "not UTF-8 text"
    with pytest.raises(DatasetError, match=message) as info:
        load_records(path, tmp_path / "images", fmt=fmt, split=split)
    assert str(info.value).startswith(f"{path}: "), str(info.value)


def test_missing_file_unknown_format_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_records(tmp_path / "nope.json", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset format 'coco'"):
        load_records(tmp_path / "nope.json", tmp_path, fmt="coco")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_records(None, tmp_path / "images")
    with pytest.raises(DatasetError, match="not inside the image root"):
        load_records(tmp_path, tmp_path / "images")


def test_registry_refuses_duplicates():
    with pytest.raises(KeyError, match="already registered"):
        register_format("llava")(lambda data, source: [])
    assert {"folder", "llava", "llava-jsonl", "r2gen", "vqa-rad", "slake", "pathvqa", "csv"} <= set(FORMATS)


@pytest.mark.parametrize("fields, message", [
    (dict(id="", images=("a.png",), turns=(("q", "a"),), task="vqa"), "non-empty string"),
    (dict(id="x", images=(), turns=(("q", "a"),), task="vqa"), "at least one image"),
    (dict(id="x", images=("a.png",), turns=(), task="instruct"), "at least one"),
    (dict(id="x", images=("a.png",), turns=(("q", "a"),), task="caption"), "task 'caption'"),
    (dict(id="x", images=("a.png",), turns=(("q", "a"),), task="vqa", answer_type="yes"), "answer_type"),
    (dict(id="x", images=("a.png",), turns=(("q", "a", "extra"),), task="vqa"), "pairs"),
])
def test_record_validates_itself(fields, message):
    with pytest.raises(DatasetError, match=message):
        Record(**fields)


def test_record_accepts_lists_and_is_hashable():
    r = Record("x", "a.png", [["q", "a"]], "vqa")
    assert r.images == ("a.png",) and r.turns == (("q", "a"),) and hash(r) == hash(Record("x", ("a.png",),
                                                                                        (("q", "a"),), "vqa"))


def test_committed_demo_dataset_loads():
    from pathlib import Path

    from precompute.images import load_image
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo"
    train = load_records(demo / "train.json", demo / "images")
    test = load_records(demo / "test.json", demo / "images")
    assert len(train) >= 10 and len(test) >= 2 and all(r.task == "instruct" for r in train + test)
    assert missing_images(train + test, demo / "images") == []
    assert not set(cache_keys(train)) & set(cache_keys(test))        # held-out images
    for key in cache_keys(train + test):
        img = load_image(resolve_image(demo / "images", key))
        assert img.mode == "RGB" and max(img.size) <= 256
