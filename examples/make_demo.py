"""Build examples/demo/ from real medical images that ship inside PyPI packages.

    python examples/make_demo.py        (needs pydicom and nilearn; run once, output committed)

- three DICOM files from pydicom's test data (CT, MR, nuclear medicine), decoded
  by precompute.images.load_image, so the demo exercises the DICOM path;
- six slices of nilearn's MNI152 T1 template (axial, coronal, sagittal);
- train.json / test.json in LLaVA format: short questions whose answers are true
  for the image (modality, plane, body part, what the DICOM header says).
Deterministic: the same packages give byte-identical files.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from precompute.images import load_image  # noqa: E402

OUT = ROOT / "examples" / "demo"
MAX_SIDE = 256

# name -> (pydicom test file, [(question, answer)]); answers checked against the image and its header.
DICOM = {
    "ct_thorax_axial": ("CT_small.dcm", [
        ("Which imaging modality is this?", "CT (computed tomography)."),
        ("In which plane was this image acquired?", "Axial."),
        ("Which bone is at the centre of the image?",
         "A thoracic vertebra: the vertebral body, spinal canal and posterior elements, with lung on both sides."),
    ]),
    "mr_axial_t2": ("MR_small.dcm", [
        ("Which imaging modality is this?", "MRI."),
        ("Is this image T1- or T2-weighted?", "T2-weighted: a spin-echo sequence with long TR (4000 ms) "
                                              "and long TE (240 ms)."),
    ]),
    "nm_whole_body_bone": ("JPEG2000.dcm", [
        ("Which imaging modality is this?", "Nuclear medicine: planar scintigraphy."),
        ("What kind of study is this?", "A whole-body bone scan."),
        ("What is the bright focus in the pelvis?", "Tracer excreted into the urinary bladder."),
    ]),
}

BRAIN = [
    ("Which imaging modality is this?", "MRI, T1-weighted."),
    ("Which organ is shown?", "The brain."),
]
# name -> (plane, MNI coordinate in mm, extra [(question, answer)]), held out -> test.json
MNI = {
    "mni_axial_z10": ("axial", 10, [("How does white matter appear compared with grey matter?",
                                      "Brighter, as expected on a T1-weighted image.")], False),
    "mni_axial_z30": ("axial", 30, [], True),
    "mni_coronal_y10": ("coronal", 10, [("Which fluid spaces are seen as dark areas near the midline?",
                                          "The lateral ventricles.")], False),
    "mni_coronal_y-40": ("coronal", -40, [], True),
    "mni_sagittal_x0": ("sagittal", 0, [("Which curved white-matter band crosses the midline above the "
                                         "ventricles?", "The corpus callosum.")], False),
    "mni_sagittal_x30": ("sagittal", 30, [], False),
}


def fit(img: Image.Image) -> Image.Image:
    """Shrink so the long side is at most MAX_SIDE (keeps the demo small)."""
    scale = MAX_SIDE / max(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def dicom_images():
    from pydicom.data import get_testdata_file
    for name, (filename, questions) in DICOM.items():
        # load_image gives RGB with equal channels for grayscale DICOM; store one channel.
        yield name, fit(load_image(get_testdata_file(filename)).convert("L")), questions, False


def mni_images():
    from nilearn.datasets import load_mni152_template
    template = load_mni152_template(resolution=1)            # ships with nilearn, no download
    volume = np.asarray(template.dataobj, dtype=np.float32)  # RAS, values 0..1
    to_voxel = np.linalg.inv(template.affine)
    for name, (plane, mm, extra, held_out) in MNI.items():
        axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
        point = [0.0, 0.0, 0.0, 1.0]
        point[axis] = mm
        index = int(round((to_voxel @ point)[axis]))
        # Radiological display: anterior / superior up, patient's right on the viewer's left,
        # sagittal facing left.
        if plane == "axial":
            pixels = volume[::-1, :, index].T[::-1]
        elif plane == "coronal":
            pixels = volume[::-1, index, :].T[::-1]
        else:
            pixels = volume[index, ::-1, :].T[::-1]
        gray = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
        plane_answer = {"axial": "Axial.", "coronal": "Coronal.", "sagittal": "Sagittal."}[plane]
        questions = BRAIN + [("In which plane is this slice?", plane_answer)] + extra
        yield name, fit(Image.fromarray(gray, "L")), questions, held_out


def llava_record(name, n, question, answer):
    return {"id": f"{name}-q{n}", "image": f"{name}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                              {"from": "gpt", "value": answer}]}


def main():
    images = OUT / "images"
    images.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for name, img, questions, held_out in [*dicom_images(), *mni_images()]:
        img.save(images / f"{name}.png", optimize=True)
        split = test if held_out else train
        split += [llava_record(name, n, q, a) for n, (q, a) in enumerate(questions)]
        print(f"{name}.png  {img.size[0]}x{img.size[1]}  {len(questions)} questions  {'test' if held_out else 'train'}")
    for filename, records in (("train.json", train), ("test.json", test)):
        (OUT / filename).write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(train)} train / {len(test)} test records -> {OUT}")


if __name__ == "__main__":
    main()
