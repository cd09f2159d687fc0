"""Write examples/formats/: one tiny dataset per supported format, over the demo images.

    python examples/make_formats.py [OUT]      (default OUT: examples/formats; output committed)

Every file names images in examples/demo/images (the image root for all of them),
with the field names the public releases use (LLaVA-Med instruct JSON, LLaVA-Med
eval JSONL, R2Gen's IU-Xray annotation.json, VQA-RAD, SLAKE, PathVQA, a CSV table),
so `medalign-cache build` can be tried on each one. The same image appears in
several files, spelled differently where real files do (the CSV's "./"), and gets
one cache key: building two of them into one cache computes it once.
The answers are true for the images (see examples/demo/README.md for what they
are); this is plumbing material, not a benchmark. Deterministic: stdlib only,
fixed order, byte-identical output on every run. examples/formats/README.md is written by hand.
"""

import csv
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "examples" / "demo" / "images"

CT, MR, NM = "ct_thorax_axial.png", "mr_axial_t2.png", "nm_whole_body_bone.png"
AX10, AX30 = "mni_axial_z10.png", "mni_axial_z30.png"
COR10, COR40 = "mni_coronal_y10.png", "mni_coronal_y-40.png"
SAG0, SAG30 = "mni_sagittal_x0.png", "mni_sagittal_x30.png"
DEMO = (CT, MR, NM, AX10, AX30, COR10, COR40, SAG0, SAG30)


def turn(human, gpt, first=False):
    return [{"from": "human", "value": ("<image>\n" if first else "") + human}, {"from": "gpt", "value": gpt}]


# LLaVA / LLaVA-Med instruction tuning (llava_med_instruct_60k_inline_mention.json):
# [{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}], "<image>" in the first turn.
LLAVA = [
    {"id": "ct_thorax_axial-conv", "image": CT, "conversations": [
        *turn("Which imaging modality is this?", "CT (computed tomography).", first=True),
        *turn("Which bone is at the centre of the image?",
              "A thoracic vertebra: the vertebral body, spinal canal and posterior elements, "
              "with lung on both sides.")]},
    {"id": "mr_axial_t2-conv", "image": MR, "conversations": [
        *turn("Is this image T1- or T2-weighted?",
              "T2-weighted: a spin-echo sequence with long TR (4000 ms) and long TE (240 ms).", first=True)]},
    {"id": "nm_whole_body_bone-conv", "image": NM, "conversations": [
        *turn("What kind of study is this?", "A whole-body bone scan (planar scintigraphy).", first=True),
        *turn("What is the bright focus in the pelvis?", "Tracer excreted into the urinary bladder.")]},
    {"id": "mni_axial_z10-conv", "image": AX10, "conversations": [
        *turn("Describe the image.", "An axial T1-weighted MRI slice of the brain: white matter is brighter "
                                     "than grey matter.", first=True)]},
]

# LLaVA-Med evaluation questions (llava_med_eval_qa50_qa.jsonl): one JSON object per line.
_DOMAIN = {"chest_xray": False, "mri": False, "ct_scan": False, "histology": False, "gross": False}
LLAVA_MED_QA = [
    {"question_id": 1001, "image": CT, "domain": {**_DOMAIN, "ct_scan": True}, "type": "conversation",
     "fig_caption": "Axial CT of the thorax.", "text": "In which plane was this image acquired?",
     "gpt4_answer": "Axial."},
    {"question_id": 1002, "image": MR, "domain": {**_DOMAIN, "mri": True}, "type": "conversation",
     "fig_caption": "Axial T2-weighted MR image.", "text": "Which imaging modality is this?",
     "gpt4_answer": "MRI."},
    {"question_id": 1003, "image": COR10, "domain": {**_DOMAIN, "mri": True}, "type": "detailed",
     "fig_caption": "Coronal T1-weighted MRI of the brain (MNI152 template).",
     "text": "Which fluid spaces are seen as dark areas near the midline?",
     "gpt4_answer": "The lateral ventricles."},
]

# R2Gen annotation.json (IU-Xray layout): splits -> records with two views each
# ("image_path": [frontal, lateral] there; two planes of one brain volume here).
_BRAIN = ("T1-weighted MRI of the brain (MNI152 template), {views} views. Grey-white matter differentiation "
          "is preserved. The ventricles are normal in size. Midline structures are central.")
R2GEN = {
    "train": [
        {"id": "mni152_z10_x0", "report": _BRAIN.format(views="axial and sagittal"),
         "image_path": [AX10, SAG0], "split": "train"},
        {"id": "mni152_y10_x30", "report": _BRAIN.format(views="coronal and sagittal"),
         "image_path": [COR10, SAG30], "split": "train"},
    ],
    "val": [
        {"id": "mni152_z30_y-40", "report": _BRAIN.format(views="axial and coronal"),
         "image_path": [AX30, COR40], "split": "val"},
    ],
    "test": [
        {"id": "ct_thorax_axial", "report": "Axial CT of the thorax at the level of a thoracic vertebra. "
                                            "Lung parenchyma is seen on both sides.",
         "image_path": [CT], "split": "test"},
    ],
}

# VQA-RAD (VQA_RAD Dataset Public.json): answer_type CLOSED / OPEN.
_VQA_RAD_NULL = {"question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
                 "evaluation": "not evaluated"}
VQA_RAD = [
    {"qid": 0, "phrase_type": "freeform",
     "image_name": CT, "image_organ": "CHEST", "question": "Is this a CT scan?", "question_type": "MODALITY",
     "answer": "Yes", "answer_type": "CLOSED", **_VQA_RAD_NULL},
    {"qid": 1, "phrase_type": "freeform",
     "image_name": CT, "image_organ": "CHEST", "question": "In which plane is this image?",
     "question_type": "PLANE", "answer": "Axial", "answer_type": "OPEN", **_VQA_RAD_NULL},
    {"qid": 2, "phrase_type": "freeform",
     "image_name": AX10, "image_organ": "HEAD", "question": "What organ is shown?", "question_type": "ORGAN",
     "answer": "Brain", "answer_type": "OPEN", **_VQA_RAD_NULL},
    {"qid": 3, "phrase_type": "test_freeform",
     "image_name": SAG0, "image_organ": "HEAD", "question": "Is this an MRI?", "question_type": "MODALITY",
     "answer": "Yes", "answer_type": "CLOSED", **_VQA_RAD_NULL},
]

# SLAKE (train.json / validate.json / test.json): English and Chinese questions side by side
# (q_lang "en" / "zh"); MedAlign reads the English ones.
SLAKE = [
    {"img_id": 1, "img_name": COR10, "question": "Which modality is used to take this image?", "answer": "MRI",
     "q_lang": "en", "location": "Brain", "modality": "MRI", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 101},
    {"img_id": 1, "img_name": COR10, "question": "这张图片的成像方式是什么?", "answer": "MRI",
     "q_lang": "zh", "location": "脑", "modality": "MRI", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 102},
    {"img_id": 1, "img_name": COR10, "question": "In which plane is this image scanned?",
     "answer": "Coronal Plane", "q_lang": "en", "location": "Brain", "modality": "MRI", "answer_type": "OPEN",
     "base_type": "vqa", "content_type": "Plane", "triple": ["vhead", "_", "_"], "qid": 103},
    {"img_id": 2, "img_name": CT, "question": "Does the picture contain lung?", "answer": "Yes",
     "q_lang": "en", "location": "Chest", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
     "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 201},
]

# PathVQA as a JSON list (the release is pickles/parquet with these three fields); an image
# name without a suffix would get ".jpg", PathVQA's own format.
PATHVQA = [
    {"image": NM, "question": "Is this a whole-body scan?", "answer": "yes"},
    {"image": NM, "question": "where is the tracer excreted?", "answer": "into the urinary bladder"},
    {"image": MR, "question": "is this image t2-weighted?", "answer": "yes"},
    {"image": CT, "question": "what is at the centre of the image?", "answer": "a thoracic vertebra"},
]

# A spreadsheet export: image column "image_path" (spelled "./x.png": still the same cache key).
CSV_HEADER = ["id", "image_path", "question", "answer"]
CSV_ROWS = [
    ["case-001", "./" + CT, "Which imaging modality is this?", "CT"],
    ["case-002", "./" + SAG30, "In which plane is this slice?", "Sagittal"],
    ["case-003", "./" + COR40, "Which organ is shown?", "The brain"],
]


def _json(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def _csv() -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(CSV_ROWS)
    return buf.getvalue()


# file name -> (format name, content)
FILES = {
    "llava_instruct.json": ("llava", _json(LLAVA)),
    "llava_med_qa.jsonl": ("llava-jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in LLAVA_MED_QA)),
    "r2gen_annotation.json": ("r2gen", _json(R2GEN)),
    "vqa_rad.json": ("vqa-rad", _json(VQA_RAD)),
    "slake.json": ("slake", _json(SLAKE)),
    "pathvqa.json": ("pathvqa", _json(PATHVQA)),
    "table.csv": ("csv", _csv()),
}


def main(out: Path = ROOT / "examples" / "formats") -> None:
    absent = [name for name in DEMO if not (IMAGES / name).is_file()]
    if absent:
        raise SystemExit(f"{IMAGES} lacks {absent}: run examples/make_demo.py first")
    out.mkdir(parents=True, exist_ok=True)
    for filename, (fmt, text) in FILES.items():
        (out / filename).write_text(text, encoding="utf-8")
        print(f"{fmt:12s} {out / filename}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "formats")
