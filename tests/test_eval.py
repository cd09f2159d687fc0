"""Evaluation: metrics on hand-checked cases, `medalign-distill eval` on trained and
base tiny students (real cache, real runs), generation against full forwards,
`medalign-distill compare` over an alpha/beta ablation of three runs sharing one cache,
and eval's handling of broken and missing images and of files holding several splits."""

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distill import metrics as M
from distill.cli import main as distill_cli
from distill.config import RunConfig
from distill.inference import decode, generate_batch, left_pad_collate, load_medalign
from distill.train import train
from precompute.build import BuildConfig, build_cache
from precompute.datasets import load_records

# ----------------------------------------------------------------------------- metrics, by hand


def test_normalize_answer_follows_llava_med():
    assert M.normalize_answer("Yes, it is.") == "yes it is"
    assert M.normalize_answer("The lesion is in the LEFT lung") == "lesion is in left lung"
    assert M.normalize_answer("left-sided") == "left sided"          # no space next to '-': a separator
    assert M.normalize_answer("No - left-sided") == "no leftsided"   # ' -' present: every '-' deleted
    assert M.normalize_answer("3.5 cm.") == "3.5 cm"                 # decimal point kept, full stop gone
    assert M.normalize_answer("1,000 mm") == "1000 mm"
    assert M.normalize_answer("two") == "2" and M.normalize_answer("None") == "0"
    assert M.normalize_answer("Is it (CT)?") == "is it ct"


# strict: closed_hit (ours); llava_med: run_eval_batch.py's substring rule; medalign: MedAlign's
# run_eval.py (Aofei-Chang/MedAlign@fbefd179 llava-med-1.5/llava/eval/run_eval.py evaluate():
# "yes" or "no" somewhere in the normalised prediction AND the reference in it). Hand-computed.
@pytest.mark.parametrize("prediction,reference,strict,llava_med,medalign", [
    ("Yes", "yes", 1, 1, 1),
    ("yes.", "Yes", 1, 1, 1),
    ("No, there is no effusion.", "no", 1, 1, 1),
    ("The heart is normal.", "no", 0, 1, 1),        # 'no' inside 'normal': both substring rules count it
    ("Yes, there is no doubt.", "no", 0, 1, 1),     # first yes/no word is 'yes'
    ("yes or no", "no", 0, 1, 1),
    ("nothing", "no", 0, 1, 1),
    ("It is not enlarged", "no", 0, 1, 1),          # 'not' is not 'no' (but holds it as a substring)
    ("Maybe", "yes", 0, 0, 0),
    ("", "yes", 0, 0, 0),                           # empty prediction
    ("", "no", 0, 0, 0),
    # choice answers: MedAlign's gate wants a yes/no somewhere, so a right choice alone scores 0
    ("The lesion is on the left.", "left", 1, 1, 0),
    ("right", "left", 0, 0, 0),
    ("leftward", "left", 0, 1, 0),
    ("CT scan", "CT", 1, 1, 0),
    ("MRI", "CT", 0, 0, 0),
    ("It is an MRI scan, not CT", "MRI", 1, 1, 1),  # the gate passes on the 'no' in 'not'
    ("a nodule on the right", "right", 1, 1, 1),    # ... or in 'nodule'
    ("I know: it is on the left", "left", 1, 1, 1),  # ... or in 'know'
    ("I don't know", "dont know", 1, 1, 1),         # contraction table: 'dont' -> "don't"
    ("There are two lesions", "2", 1, 1, 0),        # number words become digits
    ("是", "是", 1, 1, 0),                           # SLAKE's Chinese yes: no yes/no for the gate
])
def test_closed_rules(prediction, reference, strict, llava_med, medalign):
    assert M.closed_hit(prediction, reference) == strict
    assert M.closed_hit_llava_med(prediction, reference) == llava_med
    assert M.closed_hit_medalign(prediction, reference) == medalign


def test_normalize_answer_has_the_contraction_table():
    # eval_metrics/glossary.py normalize_word: contractions after the articles are dropped
    assert M.normalize_answer("The lesion isnt enlarged, I dont think") == "lesion isn't enlarged i don't think"
    assert M.normalize_answer("Im sure") == "im sure"   # capitalised keys never apply (words are lowercased)
    assert M.open_recall("I don't know", "dont know") == 1.0


def test_open_recall_and_f1_by_hand():
    assert M.open_recall("left lung", "left lung") == 1.0
    assert M.open_recall("the left upper lobe", "left lung") == 0.5          # 'left' of {left, lung}
    assert M.open_recall("Left lobe", "left upper lobe") == pytest.approx(2 / 3)
    assert M.open_recall("x x x", "x y") == 0.75   # LLaVA-Med counts the prediction's repeats: 3 / (3 + 1)
    assert M.open_recall("", "left") == 0.0 and M.open_recall("right", "left") == 0.0
    # f1: 'the' is dropped as an article; tp 1 (left), fp 2 (upper, lobe), fn 1 (lung): P 1/3, R 1/2
    assert M.open_f1("the left upper lobe", "left lung") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_vqa_metrics_per_type_and_overall():
    preds = ["yes", "No.", "normal", "left lung", "right"]
    refs = ["yes", "yes", "no", "left upper lung", "left"]
    types = ["closed", "closed", "closed", "open", "open"]
    m = M.vqa_metrics(preds, refs, types)
    assert m["closed"] == {"n": 3, "accuracy": pytest.approx(1 / 3), "accuracy_llava_med": pytest.approx(2 / 3),
                           "accuracy_medalign": pytest.approx(2 / 3)}
    assert m["open"]["n"] == 2 and m["open"]["recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["overall"] == {"n": 5, "score": pytest.approx((1 + 0 + 0 + 2 / 3 + 0) / 5)}
    empty = M.vqa_metrics(["a"], ["b"], ["open"])
    assert empty["closed"] == {"n": 0, "accuracy": None, "accuracy_llava_med": None, "accuracy_medalign": None}
    # run_eval.py counts a question without answer_type as closed: only its own block sees it
    untyped = M.vqa_metrics(preds + ["no"], refs + ["no"], types + [None])
    assert untyped["closed"]["n"] == 3 and untyped["overall"]["n"] == 5
    assert untyped["medalign"] == {"closed_n": 4, "closed_accuracy": pytest.approx(3 / 4), "open_n": 2,
                                   "open_recall": pytest.approx(1 / 3)}


def test_bleu_rouge_cider_by_hand():
    same = M.report_metrics(["The heart is normal in size.", "No acute disease"],
                            ["the heart is normal in size", "no acute disease"], meteor=False)
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"):
        assert same[k] == pytest.approx(1.0, abs=1e-6), k
    # "the cat sat on the mat" vs "the cat is on the mat": equal lengths (brevity penalty 1);
    # clipped n-gram precisions 5/6, 3/5, 1/4, 0/3 -> BLEU-1 5/6, BLEU-2 sqrt(1/2),
    # BLEU-3 (1/8)^(1/3) = 1/2, BLEU-4 ~0 (pycocoevalcap smooths a zero count to 1e-15).
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 both ways -> F = 5/6.
    m = M.report_metrics(["the cat sat on the mat"], ["the cat is on the mat"], meteor=False)
    assert m["BLEU_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert m["BLEU_2"] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert m["BLEU_3"] == pytest.approx(0.5, abs=1e-6)
    assert m["BLEU_4"] < 1e-3
    assert m["ROUGE_L"] == pytest.approx(5 / 6)
    # Brevity penalty: "the cat" against a 6-word reference: p1 = 1, BP = exp(1 - 6/2) = e^-2.
    short = M.report_metrics(["the cat"], ["the cat is on the mat"], meteor=False)
    assert short["BLEU_1"] == pytest.approx(math.exp(-2), abs=1e-6)
    # CIDEr: two documents, disjoint words, hypothesis = reference: every n-gram has idf
    # log 2; cosine 1 for n = 1..4 when the text has 4-grams -> 10 x mean(1,1,1,1) = 10,
    # and 10 x mean(1,1,0,0) = 5 for two-word texts (no 3- or 4-grams).
    assert M.report_metrics(["a b c d", "e f g h"], ["a b c d", "e f g h"], meteor=False)["CIDEr"] \
        == pytest.approx(10.0)
    assert M.report_metrics(["ab cd", "ef gh"], ["ab cd", "ef gh"], meteor=False)["CIDEr"] == pytest.approx(5.0)
    assert M.tokenize_report("Heart size is NORMAL; 3.5 cm.") == "heart size is normal 3.5 cm"


def test_meteor_or_its_reason():
    m = M.report_metrics(["the heart is normal", "no effusion"], ["the heart is normal", "no effusion"])
    if M.java_version() is None:
        assert m["METEOR"] is None and "Java" in m["unavailable"]["METEOR"]
        pytest.skip("no Java here: METEOR is reported unavailable, as it should be")
    assert m["METEOR"] == pytest.approx(1.0)
    assert M.report_metrics(["alpha beta"], ["gamma delta"])["METEOR"] == pytest.approx(0.0)
    part = M.report_metrics(["the heart is normal"], ["the heart is normal in size"])["METEOR"]
    assert 0.3 < part < 1.0
    assert "meteor-1.5.jar" in M.implementations(True)["METEOR"]


def test_score_predictions_oracle_and_groups():
    from distill.evaluate import score_predictions
    rows = [{"answer": "yes", "prediction": "Yes.", "answer_type": "closed"},
            {"answer": "left", "prediction": "left", "answer_type": "closed"},
            {"answer": "upper lobe", "prediction": "upper lobe", "answer_type": "open"},
            {"answer": "", "prediction": "anything", "answer_type": None}]      # a question without reference
    m = score_predictions(rows, meteor=False)
    assert (m["n"], m["n_with_reference"]) == (4, 3)
    assert m["vqa"]["closed"]["accuracy"] == 1.0 and m["vqa"]["open"]["recall"] == 1.0
    assert m["vqa"]["overall"] == {"n": 3, "score": 1.0}
    assert set(m["text"]) == {"all", "closed", "open"} and m["text"]["all"]["n"] == 3
    assert m["text"]["all"]["BLEU_1"] == pytest.approx(1.0, abs=1e-6)
    assert m["text"]["all"]["METEOR"] is None and "not computed" in m["implementations"]["METEOR"]


# ----------------------------------------------------------------------------- runs to evaluate

QUESTIONS = [("Where is the bright spot?", lambda q: "top" if q < 2 else "bottom", None),
             ("Is the spot on the left or the right?", lambda q: "left" if q % 2 == 0 else "right", None)]


def _images(root: Path, n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        quadrant = i % 4
        img = (rng.random((64, 64)) * 60).astype(np.uint8)
        y, x = (8 + 32 * (quadrant // 2), 8 + 32 * (quadrant % 2))
        img[y:y + 16, x:x + 16] = 250
        Image.fromarray(img).save(root / f"scan_{i:02d}.png")


# The ablation: both losses, no attention loss, no visual alignment loss. All three read the cache.
ABLATION = {"both": (1.0, 0.05), "no-attn": (1.0, 0.0), "no-vis": (0.0, 0.05)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Images, a LLaVA training file, a tiny cache and three short runs (an alpha/beta
    ablation sharing that cache); a test file with closed (yes/no and choice) and open questions."""
    tmp = tmp_path_factory.mktemp("eval")
    root = tmp / "images"
    root.mkdir()
    _images(root, 8)
    items = []
    for i in range(8):
        question, answer, _ = QUESTIONS[i % 2]
        items.append({"id": f"q{i}", "image": f"scan_{i:02d}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer(i % 4)}]})
    train_json = tmp / "train.json"
    train_json.write_text(json.dumps(items))
    test = []
    for i in range(4):
        q = i % 4
        key = f"scan_{i:02d}.png"
        test += [
            {"id": f"open{i}", "image": key, "answer_type": "OPEN", "conversations": [
                {"from": "human", "value": "<image>\nWhere is the bright spot?"},
                {"from": "gpt", "value": "top" if q < 2 else "bottom"}]},
            {"id": f"choice{i}", "image": key, "answer_type": "CLOSED", "conversations": [
                {"from": "human", "value": "<image>\nIs the spot on the left or the right?"},
                {"from": "gpt", "value": "left" if q % 2 == 0 else "right"}]},
            {"id": f"yesno{i}", "image": key, "answer_type": "CLOSED", "conversations": [
                {"from": "human", "value": "<image>\nIs the spot at the top?"},
                {"from": "gpt", "value": "yes" if q < 2 else "no"}]},
        ]
    test_json = tmp / "test.json"
    test_json.write_text(json.dumps(test))
    cache = tmp / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=train_json, image_root=root,
                            num_workers=0), progress=False)
    out = {}
    for name, (alpha, beta) in ABLATION.items():
        config = RunConfig(cache=cache, teacher="tiny", student="tiny", data=train_json, image_root=root,
                           out=tmp / "runs" / name, layer=2, alpha=alpha, beta=beta, max_steps=2, batch_size=2,
                           grad_accum=1, lr=3e-3, warmup_ratio=0.0, num_workers=0)
        out[name] = train(config, progress=False).out
    return {"tmp": tmp, "root": root, "test": test_json, "runs": out}


def _eval(*args):
    r = CliRunner().invoke(distill_cli, ["eval", *map(str, args), "--max-new-tokens", "6", "--workers", "0",
                                         "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_compare_end_to_end(runs):
    tmp, root, test = runs["tmp"], runs["root"], runs["test"]
    both, no_attn, no_vis = (runs["runs"][name] for name in ABLATION)
    r = _eval("--run", both, "--data", test, "--image-root", root, "--batch-size", 5)
    assert "closed accuracy" in r.output and "open recall" in r.output
    _eval("--run", no_attn, "--data", test, "--image-root", root, "--batch-size", 4, "--num-beams", 2,
          "--no-meteor")
    _eval("--run", no_vis, "--data", test, "--image-root", root, "--batch-size", 6, "--no-meteor")
    _eval("--run", both, "--base-only", "--data", test, "--image-root", root, "--no-meteor")
    _eval("--student", "tiny", "--out", tmp / "runs" / "base", "--data", test, "--image-root", root,
          "--limit", 5, "--no-meteor")

    for d, n, kind in [(both / "eval" / "test", 12, "trained"), (no_attn / "eval" / "test", 12, "trained"),
                       (no_vis / "eval" / "test", 12, "trained"), (both / "base" / "eval" / "test", 12, "base"),
                       (tmp / "runs" / "base" / "eval" / "test", 5, "base")]:
        rows = _rows(d / "predictions.jsonl")
        assert len(rows) == n
        assert set(rows[0]) >= {"id", "image", "question", "answer", "prediction", "task", "answer_type"}
        assert {r["answer_type"] for r in rows} == ({"open", "closed"})
        m = json.loads((d / "metrics.json").read_text())
        assert m["model"]["kind"] == kind
        assert m["data"]["split"] is None and m["data"]["skipped"] == 0   # a file without splits, read whole
        assert not (d / "skipped.jsonl").exists()
        assert m["vqa"]["closed"]["n"] + m["vqa"]["open"]["n"] == n
        for v in (m["vqa"]["closed"]["accuracy"], m["vqa"]["open"]["recall"], m["text"]["all"]["BLEU_1"]):
            assert 0.0 <= v <= 1.0
        assert "pycocoevalcap" in m["implementations"]["BLEU_1-4"]
        recomputed = M.vqa_metrics([r["prediction"] for r in rows], [r["answer"] for r in rows],
                                   [r["answer_type"] for r in rows])
        assert recomputed == m["vqa"]
        assert [r["score"] for r in rows] == [M.question_score(r["prediction"], r["answer"], r["answer_type"])
                                              for r in rows]
    assert json.loads((tmp / "runs" / "base" / "base.json").read_text())["student"] == "tiny"
    trained = json.loads((both / "eval" / "test" / "metrics.json").read_text())
    assert trained["model"]["alignment"]["layer"] == 2 and trained["model"]["adapter"].endswith("adapter")
    assert trained["generation"]["padding"] == "left"
    if M.java_version() is not None:
        assert trained["text"]["all"]["METEOR"] is not None and "METEOR" in trained["implementations"]
    assert json.loads((no_attn / "eval" / "test" / "metrics.json").read_text())["generation"]["num_beams"] == 2
    base = json.loads((both / "base" / "eval" / "test" / "metrics.json").read_text())
    assert base["model"]["adapter"] is None and base["model"]["alignment"] is None

    table_md, table_csv = tmp / "table.md", tmp / "table.csv"
    runs_dir = sorted((tmp / "runs").iterdir())
    r = CliRunner().invoke(distill_cli, ["compare", *map(str, runs_dir), "--data-stem", "test",
                                         "--out", str(table_md), "--csv", str(table_csv)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["run", "model"]
    assert "alpha" in header and "beta" in header          # differ between the runs
    assert "layer" not in header and "lora_r" not in header and "out" not in header  # same for all / bookkeeping
    assert "teacher" not in header and "cache" not in header                      # one cache for the ablation
    assert {"closed_acc", "closed_acc_llava_med", "open_recall", "BLEU_4", "loss", "vis", "att"} <= set(header)
    body = lines[2:]
    assert len(body) == 5                                   # 3 runs + the run's base + the standalone base
    by_run = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in body)}
    for name, (alpha, beta) in ABLATION.items():
        row = by_run[str(runs["runs"][name])]
        assert row[1] == "trained"
        assert (row[header.index("alpha")], row[header.index("beta")]) == (f"{alpha:g}", f"{beta:g}")
        assert row[header.index("closed_acc")] != "—" and row[header.index("loss")] != "—"
    assert by_run[f"{both} (base)"][1] == "base" and by_run[str(tmp / "runs" / "base")][1] == "base"
    assert table_md.read_text() == r.output
    rows = list(csv.reader(io.StringIO(table_csv.read_text())))
    assert rows[0] == header and len(rows) == 6

    # a dataset no run was evaluated on: each run is still a row, with its training losses
    r = CliRunner().invoke(distill_cli, ["compare", *map(str, runs_dir), "--data-stem", "other"],
                           catch_exceptions=False)
    body = [[x.strip() for x in line.strip("|").split("|")] for line in r.output.splitlines()
            if line.startswith("|")][2:]
    assert sorted(c[0] for c in body) == sorted(str(p) for p in runs["runs"].values())
    assert {c[1] for c in body} == {"trained (not evaluated)"}


@torch.no_grad()
def test_generation_equals_full_forward_argmax(runs):
    """Batched, left-padded generation with the KV cache and the alignment transform gives,
    token by token, the argmax of a full forward of each prompt alone (no padding, no cache,
    the transform applied to the visual tokens)."""
    em = load_medalign(runs["runs"]["both"])
    assert em.tap is not None and em.kind == "trained"
    s = em.student
    records = load_records(runs["test"], runs["root"])
    records = [records[0], records[2], records[4]]          # three different prompt lengths
    ds = em.dataset(records, runs["root"])
    items = [ds[i] for i in range(len(records))]
    pad = s.processor.tokenizer.pad_token_id
    batch = left_pad_collate(pad, s.image_token_id, s.num_visual_tokens)(items)
    lengths = [it["query_rows"][1] for it in items]
    assert len(set(lengths)) == 3 and bool((batch["attention_mask"][:, 0] == 0).any())  # really padded
    steps = 4
    new = generate_batch(em, batch, max_new_tokens=steps)
    eos = s.processor.tokenizer.eos_token_id
    for b, it in enumerate(items):
        ids = torch.tensor(it["input_ids"][:lengths[b]])[None]
        for t in range(steps):  # the loaded tap finds the image in each forward's ids itself
            logits = s.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=it["pixel_values"]).logits[0, -1]
            token = int(logits.argmax())
            assert int(new[b, t]) == token, (b, t)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert all(isinstance(t, str) for t in decode(em, new))
    # the transform matters: without it the first-token logits change (checked last: it
    # removes the tap, which the comparisons above need)
    it = items[0]
    prompt = torch.tensor(it["input_ids"][:lengths[0]])[None]
    aligned = s.model(input_ids=prompt, pixel_values=it["pixel_values"]).logits[0, -1]
    em.tap.remove()
    plain = s.model(input_ids=prompt, pixel_values=it["pixel_values"]).logits[0, -1]
    assert not torch.allclose(plain, aligned, atol=1e-4)


def test_eval_refuses_what_it_cannot_do(runs, tmp_path):
    root, test = runs["root"], runs["test"]
    r = CliRunner().invoke(distill_cli, ["eval", "--data", str(test), "--image-root", str(root)])
    assert r.exit_code != 0 and "--run" in r.output
    r = CliRunner().invoke(distill_cli, ["eval", "--run", str(tmp_path), "--data", str(test), "--image-root",
                                         str(root), "--workers", "0", "--quiet"])
    assert r.exit_code == 1 and "config.json" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(distill_cli, ["compare", str(tmp_path)])
    assert r.exit_code == 1 and "no run directories" in r.output


# ----------------------------------------------------------------------------- broken inputs, splits

def _invoke_eval(*args):
    """eval as a user runs it; the result must never carry a traceback."""
    r = CliRunner().invoke(distill_cli, ["eval", *map(str, args), "--max-new-tokens", "4", "--no-meteor",
                                         "--quiet"])
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def _question(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs the spot at the top?"}, {"from": "gpt", "value": "yes"}]}


@pytest.fixture(scope="module")
def broken(runs):
    """Six questions, the fourth on a text file named .png; one more file naming a missing image."""
    root = runs["tmp"] / "broken-images"
    shutil.copytree(runs["root"], root)
    (root / "notes.png").write_text("not an image\n")
    images = ["scan_00.png", "scan_01.png", "scan_02.png", "notes.png", "scan_03.png", "scan_04.png"]
    data = runs["tmp"] / "broken.json"
    data.write_text(json.dumps([_question(f"q{i}", image) for i, image in enumerate(images)]))
    missing = runs["tmp"] / "missing.json"
    missing.write_text(json.dumps([_question("m0", "scan_00.png"), _question("m1", "gone/lost.png")]))
    return {"root": root, "data": data, "missing": missing, "out": runs["tmp"] / "broken-eval"}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_broken_image_skip_then_fail(broken, workers):
    """skip: the broken sample is listed and the rest scored; fail: one line naming the
    image, the predictions made before it kept, no stale metrics.json. With DataLoader
    workers too: no worker traceback text reaches the user."""
    name = f"w{workers}"
    common = ["--student", "tiny", "--out", broken["out"], "--data", broken["data"], "--image-root",
              broken["root"], "--batch-size", 2, "--workers", workers, "--name", name]
    dest = broken["out"] / "eval" / name
    r = _invoke_eval(*common, "--on-error", "skip")
    assert r.exit_code == 0, r.output
    assert f"skipped 1 of 6 samples (broken or missing images), scored the other 5: see {dest / 'skipped.jsonl'}" \
        in r.output
    (skipped,) = _rows(dest / "skipped.jsonl")
    assert skipped["id"] == "q3" and skipped["image"] == "notes.png" and "not a readable image" in skipped["error"]
    assert [row["id"] for row in _rows(dest / "predictions.jsonl")] == ["q0", "q1", "q2", "q4", "q5"]
    m = json.loads((dest / "metrics.json").read_text())
    assert (m["n"], m["data"]["skipped"], m["data"]["samples"], m["data"]["on_error"]) == (5, 1, 6, "skip")

    r = _invoke_eval(*common)                                 # --on-error fail, the default
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert line.startswith("Error: sample 'q3': ") and "\n" not in line, r.output
    assert f"{broken['root'] / 'notes.png'}: not a readable image" in line and "--on-error skip" in line
    assert f"the 2 predictions made before it are in {dest / 'predictions.jsonl'}" in line
    assert [row["id"] for row in _rows(dest / "predictions.jsonl")] == ["q0", "q1"]   # the batch before it
    assert not (dest / "metrics.json").exists() and not (dest / "skipped.jsonl").exists()


def test_eval_checks_images_before_loading_the_model(broken, tmp_path):
    common = ["--student", "tiny", "--data", broken["missing"], "--image-root", broken["root"], "--workers", 0]
    r = _invoke_eval(*common, "--out", tmp_path / "fail")
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {broken['missing']}: 1 image not found: "
                                f"{broken['root'] / 'gone' / 'lost.png'}; check --image-root, or pass "
                                f"--on-error skip to evaluate the rest")
    assert not (tmp_path / "fail" / "tiny-student").exists()            # refused before the model loaded
    r = _invoke_eval(*common, "--out", tmp_path / "skip", "--on-error", "skip")
    assert r.exit_code == 0 and "skipped 1 of 2 samples" in r.output, r.output
    dest = tmp_path / "skip" / "eval" / "missing"
    assert [row["id"] for row in _rows(dest / "skipped.jsonl")] == ["m1"]
    assert "no such file" in _rows(dest / "skipped.jsonl")[0]["error"]
    assert [row["id"] for row in _rows(dest / "predictions.jsonl")] == ["m0"]
    r = CliRunner().invoke(distill_cli, ["compare", str(tmp_path / "skip")], catch_exceptions=False)
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in r.output.splitlines() if line.startswith("|")]
    assert lines[0][-1] == "skipped" and lines[2][-1] == "1"          # scores over fewer samples are flagged


def test_collate_turns_broken_items_into_errors():
    item = {"input_ids": [5, 9, 9, 7, 8], "labels": [], "query_rows": (3, 5), "pixel_values": torch.zeros(1, 3, 4, 4),
            "index": 0}
    collate = left_pad_collate(0, 9, 2)
    batch = collate([item, {"index": 1, "id": "b", "key": "b.png", "error": "b.png: empty file"},
                     dict(item, input_ids=[5, 9, 7, 8], query_rows=(2, 4), index=2)])
    assert batch["index"].tolist() == [0] and batch["input_ids"].shape == (1, 5)
    assert [e["index"] for e in batch["errors"]] == [1, 2]
    assert "expected 2 image tokens in its prompt, found 1" in batch["errors"][1]["error"]
    assert collate([{"index": 3, "error": "x"}]) == {"errors": [{"index": 3, "error": "x"}]}


def test_eval_reads_the_test_split_of_an_r2gen_file(runs, tmp_path):
    """Without --split an R2Gen annotation.json is scored on its test split (not train),
    and metrics.json says so."""
    def study(i):
        return {"id": f"s{i}", "report": "the spot is at the top.", "image_path": [f"scan_{i:02d}.png"]}
    data = tmp_path / "annotation.json"
    data.write_text(json.dumps({"train": [study(0), study(1)], "val": [study(2)], "test": [study(3), study(4)]}))
    r = _invoke_eval("--student", "tiny", "--out", tmp_path, "--data", data, "--image-root", runs["root"],
                     "--workers", 0, "--lang", "en")
    assert r.exit_code == 0, r.output
    dest = tmp_path / "eval" / "annotation"
    assert [row["id"] for row in _rows(dest / "predictions.jsonl")] == ["s3", "s4"]
    assert json.loads((dest / "metrics.json").read_text())["data"]["split"] == "test"
    r = _invoke_eval("--student", "tiny", "--out", tmp_path, "--data", data, "--image-root", runs["root"],
                     "--workers", 0, "--split", "val")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "eval" / "annotation-val" / "metrics.json").read_text())
    assert m["data"]["split"] == "val" and m["n"] == 1


def test_eval_and_pictures_refuse_a_run_killed_before_its_final_files(runs, tmp_path, monkeypatch):
    """Killed after adapter/ and before alignment/: not a result. eval and pictures say
    what is missing and how to finish it; --resume does, and then eval scores it."""
    import distill.train as train_module
    tmp, root, test = runs["tmp"], runs["root"], runs["test"]
    out = tmp_path / "killed"
    config = dict(cache=tmp / "cache", teacher="tiny", student="tiny", data=tmp / "train.json", image_root=root,
                  out=out, layer=2, max_steps=2, batch_size=2, grad_accum=1, num_workers=0)
    real = train_module.save_alignment

    def killed_before_the_final_alignment(transform, path, **kw):
        if Path(path).parent == out:
            raise KeyboardInterrupt
        return real(transform, path, **kw)

    with monkeypatch.context() as m:
        m.setattr(train_module, "save_alignment", killed_before_the_final_alignment)
        with pytest.raises(KeyboardInterrupt):
            train(RunConfig(**config), progress=False)
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "alignment").exists()
    for command, doing in ((["eval", "--data", test, "--image-root", root, "--workers", 0], "evaluate it"),
                           (["pictures", "--data", test, "--image-root", root, "--out", tmp_path / "pics"],
                            "draw its pictures")):
        r = CliRunner().invoke(distill_cli, [*map(str, command), "--run", str(out)], catch_exceptions=False)
        assert r.exit_code == 1 and r.output.count("Error:") == 1 and "Traceback" not in r.output
        assert f"run {out} has not finished (finished.json is missing" in r.output
        assert "after adapter/ and alignment/; missing too: alignment/;" in r.output
        assert "it has no checkpoint yet" in r.output and f"with --resume, then {doing}" in r.output
    assert not (out / "eval").exists() and not (tmp_path / "pics").exists()

    train(RunConfig(**config, resume=True), progress=False)
    _eval("--run", out, "--data", test, "--image-root", root, "--limit", 2, "--no-meteor")
    metrics = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    assert metrics["model"]["alignment"]["path"] == str(out / "alignment")


def test_eval_refuses_a_prompt_longer_than_the_context_before_tokenising(tmp_path):
    from distill.data import text_limit
    from precompute.datasets import Record
    em = load_medalign(student="tiny", home=tmp_path)
    Image.new("L", (64, 64)).save(tmp_path / "x.png")
    huge = Record("huge", ("x.png",), (("why? " * 200_000, "yes"),), "vqa")        # 1 MB of question
    item = em.dataset([huge], tmp_path)[0]
    assert "record 'huge': its question has 1,000,000 characters" in item["error"]
    context = em.student.model.config.get_text_config().max_position_embeddings
    assert f"more than the {text_limit(em.student.processor.tokenizer, context):,} that fit" in item["error"]
