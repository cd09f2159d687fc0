"""Stage two end to end: the real `medalign-distill run` on a tiny student,
streaming targets from a real cache built by stage one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distill.cli import main as distill_cli
from distill.config import RunConfig
from distill.data import encode
from distill.student import DistillTap, load_alignment, load_student
from precompute.build import BuildConfig, build_cache
from precompute.datasets import load_records

QUESTIONS = [("Where is the bright spot?", lambda q: "top" if q < 2 else "bottom"),
             ("Is the spot on the left or the right?", lambda q: "left" if q % 2 == 0 else "right")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images with a bright blob in one of four quadrants; answers depend on it."""
    tmp = tmp_path_factory.mktemp("distill")
    root = tmp / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(16):
        quadrant = i % 4
        img = (rng.random((64, 64)) * 60).astype(np.uint8)
        y, x = (8 + 32 * (quadrant // 2), 8 + 32 * (quadrant % 2))
        img[y:y + 16, x:x + 16] = 250
        key = f"scan_{i:02d}.png"
        Image.fromarray(img).save(root / key)
        question, answer = QUESTIONS[i % 2]
        items.append({"id": f"q{i}", "image": key, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer(quadrant)}]})
    train = tmp / "train.json"
    train.write_text(json.dumps(items))
    cache = tmp / "cache"
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=cache, data=train, image_root=root,
                            num_workers=0), progress=False)
    return {"root": root, "train": train, "cache": cache, "tmp": tmp}


def run(data, out, *extra):
    args = ["run", "--cache", data["cache"], "--teacher", "tiny", "--student", "tiny",
            "--data", data["train"], "--image-root", data["root"], "--out", out, "--layer", "2",
            "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3", "--workers", "0", "--quiet", *extra]
    result = CliRunner().invoke(distill_cli, [str(a) for a in args], catch_exceptions=False)
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_losses_fall_and_run_directory(data):
    out = data["tmp"] / "both"
    # beta well above the reference 0.03 so the (small) attention term visibly trains in 200 steps
    r = run(data, out, "--max-steps", 200, "--warmup-ratio", 0.05, "--save-every", 100, "--beta", 0.5)
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 201))
    first, last = rows[:10], rows[-10:]
    for term in ("ntp", "vis", "att", "loss"):
        a, b = np.mean([x[term] for x in first]), np.mean([x[term] for x in last])
        assert b < 0.7 * a, (term, a, b)
    assert all(x["tokens_per_s"] > 0 and x["peak_memory_mb"] > 0 for x in rows)
    for name in ("config.json", "cache_metadata.json", "versions.json", "train.log", "loss_curves.png",
                 "adapter/adapter_config.json", "alignment/alignment.safetensors"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["alpha"] == 1.0 and config["beta"] == 0.5 and config["layer"] == 2
    assert "random-init or tiny teacher" in (out / "train.log").read_text()


@pytest.mark.parametrize("alpha,beta,present,absent", [
    (1.0, 0.0, ["vis"], ["att"]),
    (0.0, 0.05, ["att"], ["vis"]),
    (0.0, 0.0, [], ["vis", "att"]),
])
def test_each_loss_switches_off(data, alpha, beta, present, absent):
    out = data["tmp"] / f"a{alpha}-b{beta}"
    r = run(data, out, "--max-steps", 40, "--alpha", alpha, "--beta", beta)
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    for term in present:
        assert np.mean([x[term] for x in rows[-5:]]) < np.mean([x[term] for x in rows[:5]]), term
    for term in absent:
        assert term not in rows[0]
    assert (out / "alignment").exists() == (alpha > 0)
    assert np.mean([x["ntp"] for x in rows[-5:]]) < np.mean([x["ntp"] for x in rows[:5]])


def test_adapter_reloads_with_plain_peft(data):
    """The saved adapter loads with plain peft (+ our alignment file) and gives the
    logits the trained model gives."""
    from peft import PeftModel

    from distill.data import DistillDataset, make_collate
    from distill.train import train

    out = data["tmp"] / "reload"
    config = RunConfig(cache=data["cache"], teacher="tiny", student="tiny", data=data["train"],
                       image_root=data["root"], out=out, layer=2, max_steps=20, batch_size=4, grad_accum=1,
                       lr=3e-3, num_workers=0)
    trained = train(config, progress=False)
    student = trained.student
    records = load_records(data["train"], data["root"])
    ds = DistillDataset(records[:2], data["root"], student.processor, student.num_visual_tokens, 512, None, False)
    batch = make_collate(student.processor.tokenizer.pad_token_id, student.image_token_id,
                         student.num_visual_tokens)([ds[0], ds[1]])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    student.model.eval()
    trained.tap.set_batch(batch["visual_index"], batch["query_mask"])
    with torch.no_grad():
        expected = student.model(**inputs).logits
    trained.tap.remove()

    base = load_student(str(out / "tiny-student"))
    with torch.no_grad():
        base_logits = base.model(**inputs).logits
    base.model = PeftModel.from_pretrained(base.model, out / "adapter").eval()
    transform = load_alignment(out / "alignment")
    tap = DistillTap(base, transform.layer, transform, capture_attention=False)
    tap.set_batch(batch["visual_index"], batch["query_mask"])
    with torch.no_grad():
        reloaded = base.model(**inputs).logits
    assert torch.allclose(reloaded, expected, atol=1e-5)
    assert not torch.allclose(reloaded, base_logits, atol=1e-3)


def test_resume_equals_uninterrupted(data):
    import shutil
    full = data["tmp"] / "full"
    assert run(data, full, "--max-steps", 12, "--save-every", 6).exit_code == 0
    # A crash right after the step-6 checkpoint leaves exactly this on disk:
    crashed = data["tmp"] / "crashed"
    shutil.copytree(full, crashed)
    for name in ("adapter", "alignment", "loss_curves.png", "checkpoints/step-0000012"):
        shutil.rmtree(crashed / name, ignore_errors=True) if (crashed / name).is_dir() else \
            (crashed / name).unlink(missing_ok=True)
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:9]) + "\n")  # 3 steps past the checkpoint
    cfg = json.loads((crashed / "config.json").read_text())
    cfg["out"] = str(crashed)
    (crashed / "config.json").write_text(json.dumps(cfg))

    r = run(data, crashed, "--max-steps", 12, "--save-every", 6, "--resume")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [m["loss"] for m in metrics(full)] == pytest.approx([m["loss"] for m in metrics(crashed)], abs=1e-5)


def test_refuses_missing_targets_and_existing_run(data, tmp_path):
    items = json.loads(data["train"].read_text())
    Image.new("L", (64, 64), 128).save(data["root"] / "not_cached.png")
    items.append({"id": "extra", "image": "not_cached.png", "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "top"}]})
    train = tmp_path / "more.json"
    train.write_text(json.dumps(items))
    r = CliRunner().invoke(distill_cli, ["run", "--cache", str(data["cache"]), "--teacher", "tiny",
                                         "--student", "tiny", "--layer", "2", "--data", str(train), "--image-root",
                                         str(data["root"]), "--out", str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 1
    assert "not_cached.png" in r.output and "medalign-cache build" in r.output

    out = data["tmp"] / "exists"
    assert run(data, out, "--max-steps", 1).exit_code == 0
    r = run(data, out, "--max-steps", 1)
    assert r.exit_code == 1 and "--resume" in r.output


def test_config_file_with_flag_override(data, tmp_path):
    cfg = tmp_path / "ablation.json"
    cfg.write_text(json.dumps({"layer": 3, "beta": 0.0, "lora_r": 4}))
    out = data["tmp"] / "cfg"
    r = run(data, out, "--config", cfg, "--max-steps", 2, "--lora-r", 8)
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["layer"], saved["beta"], saved["lora_r"]) == (2, 0.0, 8)  # run() passes --layer 2


@pytest.mark.parametrize("change,message", [
    ({"layer": 0}, "layer must be >= 1"),
    ({"alpha": -1}, "alpha and beta"),
    ({"attn_loss": "mse"}, "attn_loss"),
    ({"precision": "fp8"}, "precision"),
    ({"batch_size": 0}, "batch_size"),
])
def test_config_validation(change, message):
    base = dict(cache="c", teacher="t", student="tiny", data="d", image_root="i", out="o")
    with pytest.raises(ValueError, match=message):
        RunConfig(**base, **change)


def test_encode_masks_all_but_the_answer(data, tmp_path):
    from distill.student import make_tiny_student
    student = load_student(str(make_tiny_student(tmp_path / "s")))
    record = load_records(data["train"], data["root"])[0]
    enc = encode(student.processor, record, student.num_visual_tokens, 1024)
    tok = student.processor.tokenizer
    learned = [t for t, l in zip(enc.input_ids, enc.labels) if l != -100]
    assert tok.decode(learned).strip() == record.answer + tok.eos_token
    lo, hi = enc.query_rows
    assert tok.decode(enc.input_ids[lo:hi]).strip() == f"{record.prompt} [/INST]".strip()
    assert enc.input_ids[lo - 1] == student.image_token_id
    assert sum(t == student.image_token_id for t in enc.input_ids) == student.num_visual_tokens


def test_training_never_imports_the_teacher(data, tmp_path):
    code = (
        "import sys\n"
        "from distill.config import RunConfig\nfrom distill.train import train\n"
        f"train(RunConfig(cache={str(data['cache'])!r}, teacher='tiny', student='tiny', data={str(data['train'])!r},"
        f" image_root={str(data['root'])!r}, out={str(tmp_path / 'run')!r}, layer=2, max_steps=1, batch_size=2,"
        " grad_accum=1, num_workers=0), progress=False)\n"
        "bad = [m for m in sys.modules if m.startswith(('open_clip', 'precompute.teachers', 'timm'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_broken_image_mid_run_keeps_progress(data, tmp_path):
    """A sample that breaks mid-run stops training with its name, after saving the
    steps done so far; --resume continues once it is fixed."""
    import shutil

    from distill.train import micro_batches
    root = tmp_path / "images"
    shutil.copytree(data["root"], root)
    items = json.loads(data["train"].read_text())[:16]
    sixth = micro_batches(len(items), 1, 0, 0)[5][0]          # the 6th sample the run will see
    broken = items[sixth]["image"]
    good = (root / broken).read_bytes()
    (root / broken).write_bytes(good[: len(good) // 3])       # truncated PNG
    train = tmp_path / "train.json"
    train.write_text(json.dumps(items))
    out = tmp_path / "run"
    args = ["run", "--student", "tiny", "--layer", "2", "--alpha", "0", "--beta", "0", "--data", train,
            "--image-root", root, "--out", out, "--batch-size", 1, "--grad-accum", 1, "--max-steps", 10,
            "--workers", 0, "--quiet"]
    r = CliRunner().invoke(distill_cli, [str(a) for a in args])
    assert r.exit_code == 1
    assert broken in r.output and "--resume" in r.output and "Traceback" not in r.output
    assert (out / "checkpoints" / "step-0000005").is_dir()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]

    (root / broken).write_bytes(good)
    r = CliRunner().invoke(distill_cli, [str(a) for a in args] + ["--resume"])
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in metrics(out)] == list(range(1, 11))


@pytest.mark.parametrize("template,closing", [("mistral_instruct", "[/INST]"), ("llava_v1", "ASSISTANT:")])
def test_named_chat_templates_mask_all_but_the_answer(data, tmp_path, template, closing):
    """For converted checkpoints without a chat template: LLaVA-Med's two styles."""
    from distill.student import make_tiny_student
    student = load_student(str(make_tiny_student(tmp_path / "s")), chat_template=template)
    record = load_records(data["train"], data["root"])[0]
    enc = encode(student.processor, record, student.num_visual_tokens, 1024)
    tok = student.processor.tokenizer
    learned = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tok.decode(learned).strip() == record.answer + tok.eos_token
    lo, hi = enc.query_rows
    assert tok.decode(enc.input_ids[lo:hi]).strip() == f"{record.prompt} {closing}"


def test_missing_chat_template_names_the_flag(tmp_path):
    from distill.student import StudentError, make_tiny_student
    path = make_tiny_student(tmp_path / "s")
    for f in path.glob("*"):
        if f.name == "chat_template.jinja" or f.name == "chat_template.json":
            f.unlink()
    cfg = path / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "chat_template"}))
    with pytest.raises(StudentError, match="--chat-template"):
        load_student(str(path))
