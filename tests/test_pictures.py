"""Pictures: `medalign-cache show` (teacher targets over the image) and
`medalign-distill pictures` (student attention before/after, loss curves, t-SNE),
on a real tiny cache and a real 5-step tiny run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distill.cli import main as distill_cli
from distill.config import RunConfig
from distill.data import DistillDataset, make_collate
from distill.pictures import embed_2d, image_labels, knn_agreement
from distill.student import DistillTap, load_student
from distill.train import train
from precompute.build import BuildConfig, build_cache
from precompute.cli import main as cache_cli
from precompute.datasets import load_records
from precompute.show import parse_patch, show_targets, teacher_view


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread gains nothing and, on a busy
    2-core machine, spin-waiting makes each forward ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """8 noisy images with a bright block in one quadrant, in two folders; closed yes/no
    questions; a tiny random-init cache and a 5-step tiny run on them."""
    tmp = tmp_path_factory.mktemp("pictures")
    root = tmp / "images"
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        q = i % 4
        img = (rng.random((64, 80)) * 60).astype(np.uint8)          # not square: exercises the crop
        y, x = 6 + 32 * (q // 2), 8 + 40 * (q % 2)
        img[y:y + 18, x:x + 22] = 250
        key = f"{'left' if q % 2 == 0 else 'right'}/scan_{i}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / key)
        items.append({"id": f"q{i}", "image": key, "answer_type": "closed", "conversations": [
            {"from": "human", "value": "<image>\nIs the bright block on the left?"},
            {"from": "gpt", "value": "yes" if q % 2 == 0 else "no"}]})
    data = tmp / "train.json"
    data.write_text(json.dumps(items))
    cache = tmp / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=data, image_root=root,
                            num_workers=0), progress=False)
    config = RunConfig(cache=cache, teacher="tiny", student="tiny", data=data, image_root=root, out=tmp / "run",
                       layer=2, max_steps=5, batch_size=4, grad_accum=1, lr=5e-3, beta=0.5, num_workers=0)
    trained = train(config, progress=False)
    return {"tmp": tmp, "root": root, "data": data, "cache": cache, "run": tmp / "run", "trained": trained,
            "keys": [it["image"] for it in items]}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def assert_not_blank(arr: np.ndarray):
    assert arr.std() > 20, arr.std()
    assert len(np.unique(arr.reshape(-1, 3).astype(np.uint8), axis=0)) > 100


def crop(arr: np.ndarray, box, like=None) -> np.ndarray:
    """The panel inside `box`; with `like`, cut to the smaller of the two boxes (sub-pixel
    layout can make equal panels differ by one pixel)."""
    left, top, right, bottom = box
    if like is not None:
        right = left + min(right - left, like[2] - like[0])
        bottom = top + min(bottom - top, like[3] - like[1])
    return arr[top:bottom, left:right]


def panel_difference(arr, box_a, box_b) -> float:
    a, b = crop(arr, box_a, box_b), crop(arr, box_b, box_a)
    assert a.shape == b.shape and min(a.shape[:2]) > 100
    return float(np.abs(a - b).mean())


# ----------------------------------------------------------------------------- medalign-cache show

def test_show_cli_png(setup):
    out = setup["tmp"] / "show.png"
    k1, k2 = setup["keys"][0], setup["keys"][3]
    r = CliRunner().invoke(cache_cli, ["show", "--cache", str(setup["cache"]), "--teacher", "tiny",
                                       "--image-root", str(setup["root"]), "--key", k1, "--key", k2,
                                       "--patch-xy", "1,1", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "800x770 px, grid 7, 2 images" in r.output
    arr = pixels(out)
    assert arr.shape == (770, 800, 3)  # 2 panels x 4.0 in, 2 rows x 3.6 in + 0.5 in title, at 100 dpi
    assert_not_blank(arr)


def test_show_depends_on_the_data(setup):
    k1, k2 = setup["keys"][0], setup["keys"][3]          # block top-left vs bottom-right
    res = show_targets(setup["cache"], "tiny", setup["root"], [k1, k2], setup["tmp"] / "show2.png", patch=24)
    arr = pixels(res.out)
    assert res.patches == [24, 24] and res.grid == 7
    for col in (0, 1):  # attention panels differ between the keys, and so do similarity panels
        assert panel_difference(arr, res.panels[(0, col)], res.panels[(1, col)]) > 10, col
    # default patch = the attention's argmax, which follows the block
    res = show_targets(setup["cache"], "tiny", setup["root"], [k1, k2], setup["tmp"] / "show3.png", grid=12)
    assert res.grid == 12 and res.patches[0] != res.patches[1]
    assert res.size == (800, 770)


def test_show_teacher_view_and_patch_parsing(setup):
    from precompute import open_cache
    md = open_cache(setup["cache"])["tiny"].metadata["preprocessing"]
    img = Image.open(setup["root"] / setup["keys"][0]).convert("RGB")
    view = teacher_view(img, md)
    assert view.size == (md["image_size"], md["image_size"])
    assert teacher_view(img, {**md, "resize_mode": "longest"}).size == view.size
    assert teacher_view(img, {**md, "pad_to_square": True}).size == view.size
    assert parse_patch(None, "3,2", 7) == 17 and parse_patch(5, None, 7) == 5 and parse_patch(None, None, 7) is None
    for bad in [(None, "7,0"), (49, None), (1, "1,1"), (None, "a,b")]:
        with pytest.raises(ValueError):
            parse_patch(*bad, 7)
    r = CliRunner().invoke(cache_cli, ["show", "--cache", str(setup["cache"]), "--teacher", "tiny",
                                       "--image-root", str(setup["root"]), "--key", "nope.png",
                                       "--out", str(setup["tmp"] / "x.png")])
    assert r.exit_code == 1 and "nope.png" in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------- medalign-distill pictures

@pytest.fixture(scope="module")
def pics(setup):
    out = setup["tmp"] / "pics"
    keys = [setup["keys"][0], setup["keys"][3]]
    r = CliRunner().invoke(distill_cli, ["pictures", "--run", str(setup["run"]), "--data", str(setup["data"]),
                                         "--image-root", str(setup["root"]), "--keys", ",".join(keys),
                                         "--out", str(out), "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, keys


def test_pictures_cli_pngs(pics):
    out, keys = pics
    sizes = {"attention.png": (660, 1280, 3),   # 4 x 3.0 in + 0.8 in colour bars; 2 rows x 3.0 + 0.6 in
             "tsne.png": (480, 1260, 3),         # 3 x 4.2 in; 4.2 + 0.6 in
             "loss_curves.png": (280, 1280, 3)}  # plot_loss_curves: 4 terms x 3.2 in; 2.8 in
    for name, shape in sizes.items():
        arr = pixels(out / name)
        assert arr.shape == shape, name
        assert_not_blank(arr)
    summary = json.loads((out / "pictures.json").read_text())
    assert [s["key"] for s in summary["samples"]] == keys
    assert summary["label_rule"] == "answer" and set(summary["labels"].values()) == {"yes", "no"}
    assert summary["embedding"] == "t-SNE" and len(summary["labels"]) == 8


def test_pictures_attention_is_the_students(setup):
    """The panels hold the teacher target, the base student's attention and the trained
    student's attention (the training run's own model), and differ between images."""
    from distill.pictures import make_pictures
    from precompute import open_cache

    keys = [setup["keys"][1], setup["keys"][2]]
    res = make_pictures(setup["run"], setup["data"], setup["root"], setup["tmp"] / "pics2", keys=keys,
                        tsne_n=4, device="cpu", label_by="folder")
    assert res.method == "PCA"  # 4 images: too few for t-SNE
    assert set(res.labels.values()) == {"left", "right"}
    arr = pixels(res.files["attention"])
    for col in (1, 2, 3):
        assert panel_difference(arr, res.panels[(0, col)], res.panels[(1, col)]) > 5, col

    group = open_cache(setup["cache"])["tiny"]
    trained = setup["trained"]
    student = trained.student
    teacher = np.stack([group.targets(k, student.grid)[1].numpy() for k in keys])
    np.testing.assert_allclose(res.attention["teacher"], teacher / teacher.max(1, keepdims=True), rtol=1e-5)

    records = {r.images[0]: r for r in reversed(load_records(setup["data"], setup["root"]))}
    ds = DistillDataset([records[k] for k in keys], setup["root"], student.processor, student.num_visual_tokens,
                        1024, None, False)
    batch = make_collate(student.processor.tokenizer.pad_token_id, student.image_token_id,
                         student.num_visual_tokens)([ds[0], ds[1]])

    def attention(model, tap):
        model.eval()
        tap.set_batch(batch["visual_index"], batch["query_mask"])
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
        return tap.visual_attention.numpy()

    np.testing.assert_allclose(res.attention["after"], attention(student.model, trained.tap), rtol=1e-4,
                               atol=1e-6)
    base = load_student(str(setup["run"] / "tiny-student"))
    tap = DistillTap(base, 2, None, capture_attention=True)
    before = attention(base.model, tap)
    np.testing.assert_allclose(res.attention["before"], before, rtol=1e-4, atol=1e-6)
    assert not np.allclose(res.attention["before"], res.attention["after"])  # training changed something


def test_pictures_errors(setup, tmp_path):
    base = ["pictures", "--data", str(setup["data"]), "--image-root", str(setup["root"]), "--out", str(tmp_path)]
    r = CliRunner().invoke(distill_cli, [*base, "--run", str(tmp_path)])
    assert r.exit_code == 1 and "not a run directory" in r.output
    r = CliRunner().invoke(distill_cli, [*base, "--run", str(setup["run"]), "--keys", "missing.png"])
    assert r.exit_code == 1 and "missing.png" in r.output and "Traceback" not in r.output


def test_embedding_helpers():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (10, 20)) + 5, rng.normal(0, 1, (10, 20)) - 5])
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    labels = ["a"] * 10 + ["b"] * 10
    assert knn_agreement(X, labels) == 1.0 and knn_agreement(X, ["a"] * 20) is None
    Y, method = embed_2d(X)
    assert Y.shape == (20, 2) and method == "t-SNE" and np.isfinite(Y).all()
    Y, method = embed_2d(X[:3])
    assert Y.shape == (3, 2) and method == "PCA"


def test_embedding_falls_back_to_pca_without_scikit_learn(monkeypatch):
    """scikit-learn is optional (t-SNE): without it the embedding is the top two
    principal components, and the method says so."""
    monkeypatch.setitem(sys.modules, "sklearn", None)             # `import sklearn...` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (20, 6)) * np.array([5.0, 2.0, 0.1, 0.1, 0.1, 0.1])   # variance in two axes
    Y, method = embed_2d(X)
    assert method == "PCA" and Y.shape == (20, 2)
    centred = X - X.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(Y), np.abs(centred @ vt[:2].T), rtol=1e-8, atol=1e-10)


def test_image_labels_rules():
    from precompute.datasets import Record
    recs = {"a/1.png": [Record("1", ("a/1.png",), (("q", "Yes"),), "vqa", "closed")],
            "b/2.png": [Record("2", ("b/2.png",), (("q", "a lung"),), "vqa", "open"),
                        Record("3", ("b/2.png",), (("q", "no"),), "vqa", "closed")],
            "b/3.png": [Record("4", ("b/3.png",), (("q", "heart"),), "vqa", "open")]}
    labels, rule = image_labels(list(recs), recs)
    assert rule == "answer" and labels == {"a/1.png": "yes", "b/2.png": "no", "b/3.png": "(no closed question)"}
    labels, rule = image_labels(list(recs), recs, "folder")
    assert labels == {"a/1.png": "a", "b/2.png": "b", "b/3.png": "b"}
    labels, _ = image_labels(list(recs), recs, "field", {"1": "CT", "3": "MR"})
    assert labels == {"a/1.png": "CT", "b/2.png": "MR", "b/3.png": "(missing)"}
