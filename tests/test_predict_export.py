"""A trained model in users' hands: `predict`, `export` and `load_medalign` answer like
`eval`; multi-image records (`--images all`) learn each image against its own targets."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distill import load_medalign
from distill.cli import main as distill_cli
from distill.data import DistillDataset, make_collate
from distill.losses import attention_distill_loss, visual_alignment_loss
from distill.student import AlignmentTransform, DistillTap, load_student, make_tiny_student
from distill.train import teacher_targets_on_device
from precompute import open_cache
from precompute.build import BuildConfig, build_cache
from precompute.datasets import load_records


def invoke(*args):
    return CliRunner().invoke(distill_cli, [str(a) for a in args])


def _scan(path, seed, size=(48, 64)):
    rng = np.random.default_rng(seed)
    img = (rng.random(size) * 60).astype(np.uint8)
    y, x = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
    img[y:y + 12, x:x + 12] = 250
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images; a LLaVA file (one image per record) and an R2Gen file (two views per study);
    one cache for all images; a short single-image run and a short two-view run."""
    tmp = tmp_path_factory.mktemp("hands")
    root = tmp / "images"
    root.mkdir()
    for i in range(12):
        _scan(root / f"s{i:02d}.png", i)
    qa = [{"id": f"q{i}", "image": f"s{i:02d}.png", "answer_type": "CLOSED" if i % 2 else "OPEN",
           "conversations": [{"from": "human", "value": "<image>\nWhere is the spot?"},
                             {"from": "gpt", "value": "yes" if i % 2 else "top left"}]} for i in range(8)]
    (tmp / "qa.json").write_text(json.dumps(qa))
    study = lambda i, split: {"id": f"st{i}", "report": "the spot is bright.", "split": split,  # noqa: E731
                              "image_path": [f"s{2 * i:02d}.png", f"s{2 * i + 1:02d}.png"]}
    (tmp / "r2gen.json").write_text(json.dumps({"train": [study(i, "train") for i in range(4)],
                                                "test": [study(i, "test") for i in range(4, 6)]}))
    cache = tmp / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=None, image_root=root,
                            num_workers=0), progress=False)
    common = ["--cache", cache, "--teacher", "tiny", "--student", "tiny", "--image-root", root, "--layer", 2,
              "--batch-size", 2, "--grad-accum", 1, "--max-steps", 3, "--lr", 3e-3, "--workers", 0, "--quiet"]
    r = invoke("run", *common, "--data", tmp / "qa.json", "--out", tmp / "run")
    assert r.exit_code == 0, r.output
    r = invoke("run", *common, "--data", tmp / "r2gen.json", "--images", "all", "--out", tmp / "views")
    assert r.exit_code == 0, r.output
    return {"tmp": tmp, "root": root, "cache": cache, "run": tmp / "run", "views": tmp / "views"}


def _predictions(folder, stem):
    return [json.loads(line)["prediction"] for line in (folder / "eval" / stem / "predictions.jsonl").open()]


def _eval(source, data, root, *extra):
    r = invoke("eval", "--run", source, "--data", data, "--image-root", root, "--workers", 0, "--batch-size", 3,
               "--max-new-tokens", 6, "--no-meteor", "--quiet", *extra)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("kind", ["run", "views"], ids=["single image", "two views"])
def test_predict_and_exports_answer_like_eval(world, kind, tmp_path):
    run, root = world[kind], world["root"]
    data = world["tmp"] / ("qa.json" if kind == "run" else "r2gen.json")
    stem = data.stem
    _eval(run, data, root)
    reference = _predictions(run, stem)
    assert len(reference) == (8 if kind == "run" else 2)

    # predict on the same file: answers streamed one at a time, the same tokens
    r = invoke("predict", "--run", run, "--data", data, "--image-root", root, "--max-new-tokens", 6)
    assert r.exit_code == 0, r.output
    streamed = [line[2:] for line in r.output.splitlines() if line.startswith("> ")]
    assert [s.strip() for s in streamed] == reference

    # exported folders, adapter kept and merged (fp32: merging is then exact up to float rounding)
    for name, flags in (("plain", []), ("merged", ["--merge", "--dtype", "fp32"])):
        out = tmp_path / name
        r = invoke("export", "--run", run, "--out", out, *flags)
        assert r.exit_code == 0, r.output
        assert (out / "alignment" / "alignment.safetensors").is_file() and (out / "README.md").is_file()
        assert (out / "adapter").is_dir() == (name == "plain")
        _eval(out, data, root)
        assert _predictions(out, stem) == reference, name

    # the public loader, as a user calls it: same answer for the first question
    first = load_records(data, root, default_split="test")[0]
    m = load_medalign(tmp_path / "merged", precision="fp32")
    images = [root / k for k in (first.images if kind == "views" else first.images[:1])]
    assert m.answer(images, first.prompt, max_new_tokens=6) == reference[0]


def test_the_loaded_model_generates_through_plain_transformers(world):
    """load_medalign's model is a transformers model whose generate() applies the alignment
    transform by itself: the processor's inputs give eval's answer."""
    m = load_medalign(world["run"], precision="fp32")
    assert m.tap is not None and m.kind == "trained"
    record = load_records(world["tmp"] / "qa.json", world["root"])[0]
    batch = m.collate()([m.dataset([record], world["root"])[0]])
    tok = m.student.processor.tokenizer
    out = m.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], max_new_tokens=6, do_sample=False,
                           pad_token_id=tok.pad_token_id, suppress_tokens=[m.student.image_token_id])
    plain = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert plain == m.answer([world["root"] / record.images[0]], record.prompt, max_new_tokens=6)
    m.tap.remove()  # without the transform the model is another one
    with torch.no_grad():
        a = m.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    m2 = load_medalign(world["run"], precision="fp32")
    with torch.no_grad():
        b = m2.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    assert not torch.allclose(a, b, atol=1e-5)


def test_predict_pairs_and_attention_picture(world, tmp_path):
    root = world["root"]
    r = invoke("predict", "--run", world["run"], "--image", root / "s01.png", "--image", root / "s02.png",
               "--question", "Where is the spot?", "--image-root", root, "--max-new-tokens", 4,
               "--attention", tmp_path / "att.png")
    assert r.exit_code == 0, r.output
    assert "s01.png" in r.output and "s02.png" in r.output
    assert (tmp_path / "att.png").is_file()
    width, height = Image.open(tmp_path / "att.png").size
    assert height > width / 2                          # two rows (one per image), three panels each
    r = invoke("predict", "--run", world["run"], "--image", root / "s01.png", "--question", "a", "--question", "b")
    assert r.exit_code != 0 and "1 --image but 2 --question" in r.output and "Traceback" not in r.output


def test_export_refuses_to_merge_into_a_quantized_base(world, tmp_path):
    run = tmp_path / "quant"
    import shutil
    shutil.copytree(world["run"], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "quantize": "4bit"}))
    r = invoke("export", "--run", run, "--out", tmp_path / "x", "--merge")
    assert r.exit_code == 1 and "quantized" in r.output and "without --merge" in r.output
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- several images per record

@torch.no_grad()
def test_each_image_is_learned_against_its_own_targets(world):
    """A batch with a two-view study and a one-image record: the batched losses equal the
    mean of per-image losses computed by hand (each block's states and attention from its
    own sample run alone, its target read with the public reader), and the captured
    attention equals eager attention weights averaged over the prompt rows by hand."""
    root, group = world["root"], open_cache(world["cache"])["tiny"]
    records = load_records(world["tmp"] / "r2gen.json", root)[:1] + load_records(world["tmp"] / "qa.json", root)[:1]
    assert [len(r.images) for r in records] == [2, 1]
    student = load_student(str(make_tiny_student(world["tmp"] / "s")), attn_implementation="eager")
    transform = AlignmentTransform(student.hidden_size)
    transform.weight.normal_(0, 0.05)                 # a trained-looking W, so the transform matters
    tap = DistillTap(student, 2, transform, capture_attention=True)
    dataset = DistillDataset(records, root, student.processor, student.num_visual_tokens, 1024, group, False,
                             images="all")
    collate = make_collate(student.processor.tokenizer.pad_token_id, student.image_token_id,
                           student.num_visual_tokens)
    batch = collate([dataset[0], dataset[1]])
    keys = [*records[0].images, records[1].images[0]]
    assert batch["image_rows"].tolist() == [0, 0, 1] and batch["pixel_values"].shape[0] == 3
    for i, key in enumerate(keys):                    # row i of the targets is image i's
        sim, attn = group.native_packed(key)
        assert np.array_equal(batch["teacher_sim"][i].numpy(), np.asarray(sim))
        assert np.array_equal(batch["teacher_attn"][i].numpy(), np.asarray(attn))

    def forward(b):
        tap.set_batch(b["visual_index"], b["query_mask"], b["image_rows"])
        return student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             pixel_values=b["pixel_values"], output_attentions=True)

    out = forward(batch)
    aligned, attention = tap.aligned_visual, tap.visual_attention
    assert aligned.shape[0] == attention.shape[0] == 3
    # the capture against eager attention probabilities, by hand
    probs = out.attentions[2]                          # [B, H, T, T], layer index 2
    for i, (row, cols) in enumerate(zip(batch["image_rows"].tolist(), batch["visual_index"])):
        q = batch["query_mask"][row]
        by_hand = probs[row][:, q][:, :, cols].mean(0).mean(0)
        torch.testing.assert_close(attention[i], by_hand, rtol=1e-4, atol=1e-6)
    # batched losses = mean over images of each image alone
    sim_t, attn_t = teacher_targets_on_device(batch, student.grid, group.native_grid, "cpu", True, True)
    vis = float(visual_alignment_loss(aligned, sim_t))
    att = float(attention_distill_loss(attention, attn_t))
    per_vis, per_att = [], []
    for s, (record, blocks) in enumerate(((records[0], [0, 1]), (records[1], [0]))):
        alone = collate([dataset[s]])
        forward(alone)
        for j in blocks:
            key = record.images[j]
            s_t, a_t = group.targets(key, grid=student.grid)
            x = tap.aligned_visual[j].double().numpy()
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            per_vis.append(np.mean((x @ x.T - s_t.double().numpy()) ** 2))
            a_s = tap.visual_attention[j].double().numpy()
            a_s, a_t = a_s / np.linalg.norm(a_s), a_t.double().numpy() / np.linalg.norm(a_t.double().numpy())
            per_att.append(np.mean(a_t * (np.log(a_t) - np.log(a_s))))
    assert vis == pytest.approx(np.mean(per_vis), rel=1e-4)
    assert att == pytest.approx(np.mean(per_att), rel=1e-4, abs=1e-7)
    tap.remove()


def test_two_view_run_trains_every_view(world):
    """The two-view run shows both views: its cache check covers every view, each step's
    losses are per image, and pictures draw each view within its study's prompt."""
    run = world["views"]
    config = json.loads((run / "config.json").read_text())
    assert config["images"] == "all"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert len(rows) == 3 and all(np.isfinite(r["vis"]) and np.isfinite(r["att"]) for r in rows)
    r = invoke("pictures", "--run", run, "--data", world["tmp"] / "r2gen.json", "--image-root", world["root"],
               "--n", 2, "--tsne-n", 4, "--out", run / "pictures")
    assert r.exit_code == 0, r.output
    shown = json.loads((run / "pictures" / "pictures.json").read_text())["samples"]
    assert [s["key"] for s in shown] == ["s00.png", "s01.png"]   # both views of the first study


# ----------------------------------------------------------------------------- grounding (eval --masks)

def test_mask_coverage_follows_the_student_geometry():
    from transformers import CLIPImageProcessor

    from distill.grounding import attention_in_mask, mask_on_grid
    proc = CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96})
    quadrant = np.zeros((96, 96), bool)
    quadrant[:48, :48] = True
    cover = mask_on_grid(quadrant, proc, False, 6).reshape(6, 6)
    expected = np.zeros((6, 6))
    expected[:3, :3] = 1
    np.testing.assert_allclose(cover, expected, atol=1e-6)
    # a 96 x 48 (w x h) image padded to square sits at rows 24..72: cell rows 1 and 4 half covered
    wide = np.ones((48, 96), bool)
    rows = mask_on_grid(wide, proc, True, 6).reshape(6, 6)[:, 0]
    np.testing.assert_allclose(rows, [0, 0.5, 1, 1, 0.5, 0], atol=1e-6)
    assert attention_in_mask(np.array([3.0, 1.0]), np.array([1.0, 0.0])) == 0.75


def test_eval_with_masks_scores_where_the_student_looks(world, tmp_path):
    masks = {f"s{i:02d}.png": np.zeros((48, 64), bool) for i in range(8)}
    for i in range(4):
        masks[f"s{i:02d}.png"][:24, :32] = True               # images 4-7 have empty masks: not scored
    np.savez(tmp_path / "masks.npz", **masks)
    r = invoke("eval", "--run", world["run"], "--data", world["tmp"] / "qa.json", "--image-root", world["root"],
               "--masks", tmp_path / "masks.npz", "--max-new-tokens", 2, "--no-meteor", "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert "attention inside the masks at layer 2" in r.output
    m = json.loads((world["run"] / "eval" / "qa" / "metrics.json").read_text())
    g = m["grounding"]
    assert g["n"] == 4 and g["layer"] == 2 and 0 <= g["attention_in_mask"] <= 1
    assert g["chance"] == pytest.approx(0.25, abs=0.02)       # a quadrant (after padding the 64 x 48 scans)
    rows = [json.loads(line) for line in (world["run"] / "eval" / "qa" / "predictions.jsonl").open()]
    assert sum("grounding" in row for row in rows) == 4
    r = invoke("compare", world["run"])
    assert "grounding" in r.output.splitlines()[0]


def test_attention_of_left_padded_prompts_equals_each_alone(world):
    """Generation batches are left-padded: a padded prompt's attention map is the one it has
    alone (a left-pad row attends to nothing; its NaN softmax must not leak into the mean)."""
    from distill.inference import student_attention
    from precompute.datasets import Record

    m = load_medalign(world["run"], precision="fp32")
    records = [Record(id=str(i), images=(f"s{i:02d}.png",), turns=((q, ""),), task="vqa")
               for i, q in enumerate(["Where?", "Where is the bright spot in this scan, please?", "Spot?"])]
    items = [m.dataset(records, world["root"])[i] for i in range(3)]
    batch = m.collate()(items)
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == 3       # really padded
    together = student_attention(m, batch, 2)
    assert torch.isfinite(together).all()
    for i, item in enumerate(items):
        torch.testing.assert_close(together[i], student_attention(m, m.collate()([item]), 2)[0],
                                   rtol=1e-4, atol=1e-6)
