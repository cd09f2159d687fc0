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
from distill.student import DistillTap, apply_lora, load_alignment, load_student
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
    schedule = ("--max-steps", 200, "--warmup-ratio", 0.05)
    r = run(data, out, *schedule, "--save-every", 100, "--beta", 0.5)
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 201))
    first, last = rows[:10], rows[-10:]
    for term in ("ntp", "vis", "att", "loss"):
        a, b = np.mean([x[term] for x in first]), np.mean([x[term] for x in last])
        assert b < 0.7 * a, (term, a, b)
    # The fall above could come from next-token training alone. A control run, same seed,
    # with both terms still computed and logged but weighted ~0, shows each distillation
    # term ends well below where training without it leaves it. (L_att can go below 0:
    # the reference's KL of L2-normalised maps is not a true KL.)
    control = data["tmp"] / "control"
    assert run(data, control, *schedule, "--alpha", 1e-9, "--beta", 1e-9).exit_code == 0
    for term in ("vis", "att"):
        trained, untrained = (np.mean([x[term] for x in metrics(o)[-20:]]) for o in (out, control))
        assert trained < untrained - 0.5 * abs(untrained), (term, trained, untrained)
    assert all(x["tokens_per_s"] > 0 and x["peak_memory_mb"] > 0 for x in rows)
    for name in ("config.json", "cache_metadata.json", "versions.json", "train.log", "loss_curves.png",
                 "adapter/adapter_config.json", "alignment/alignment.safetensors", "run.lock"):
        assert (out / name).exists(), name
    assert json.loads((out / "finished.json").read_text()) == {"step": 200, "adapter": "adapter",
                                                                "alignment": "alignment"}
    assert not list(out.glob("*.tmp*"))
    config = json.loads((out / "config.json").read_text())
    assert config["alpha"] == 1.0 and config["beta"] == 0.5 and config["layer"] == 2
    log = (out / "train.log").read_text()
    assert "randomly initialised teacher" in log and "meaningless for research" in log
    assert "medalign-cache verify" in log


def test_the_lm_head_projects_only_the_learned_positions(data, tmp_path, monkeypatch):
    """Training asks the LM head for the logits of the answer positions only
    (logits_to_keep = learned_positions): the next-token loss sees [N, V], N the learned
    tokens of the batch, and the run's losses equal, step for step, a run that computes
    every position's logits."""
    import distill.train as train_module
    real, shapes = train_module.next_token_loss, []

    def next_token_loss(logits, labels, **kwargs):
        shapes.append((tuple(logits.shape), int((labels[:, 1:] != -100).sum())))
        return real(logits, labels, **kwargs)
    monkeypatch.setattr(train_module, "next_token_loss", next_token_loss)
    assert train_module.LOGITS_BY_MASK  # the pinned transformers has slice_logits_to_keep
    assert run(data, tmp_path / "kept", "--max-steps", 4).exit_code == 0
    assert shapes and all(len(shape) == 2 and shape[0] == n for shape, n in shapes), shapes
    shapes.clear()
    monkeypatch.setattr(train_module, "LOGITS_BY_MASK", False)
    assert run(data, tmp_path / "all", "--max-steps", 4).exit_code == 0
    assert all(len(shape) == 3 for shape, _ in shapes)
    for kept, every in zip(metrics(tmp_path / "kept"), metrics(tmp_path / "all"), strict=True):
        for term in ("ntp", "vis", "att", "loss"):
            assert kept[term] == pytest.approx(every[term], rel=1e-5, abs=1e-7), (term, kept, every)


@pytest.mark.parametrize("alpha,beta,present,absent", [
    (1.0, 0.0, ["vis"], ["att"]),
    (0.0, 0.05, ["att"], ["vis"]),
    (0.0, 0.0, [], ["vis", "att"]),
])
def test_each_loss_switches_off(data, monkeypatch, alpha, beta, present, absent):
    """A loss at weight 0 is gone: not logged, and its target is never read from the cache
    (the packed similarity is the large one). That the terms train is shown by the 200-step test."""
    from distill.data import DistillDataset
    from precompute.cache import _RowReader
    item_keys, arrays_read = set(), set()  # what the samples carry; which cache arrays were read
    get_item, read_row = DistillDataset.__getitem__, _RowReader.read

    def recording_get_item(dataset, i):
        item = get_item(dataset, i)
        item_keys.update(item)
        return item

    def recording_read_row(reader, *args):
        arrays_read.add(reader.path.name)
        return read_row(reader, *args)

    monkeypatch.setattr(DistillDataset, "__getitem__", recording_get_item)
    monkeypatch.setattr(_RowReader, "read", recording_read_row)
    out = data["tmp"] / f"a{alpha}-b{beta}"
    r = run(data, out, "--max-steps", 3, "--alpha", alpha, "--beta", beta)
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    assert all(term in rows[0] for term in present) and not any(term in rows[0] for term in absent)
    assert (out / "alignment").exists() == (alpha > 0)
    assert ("teacher_sim" in item_keys) == ("similarity" in arrays_read) == (alpha > 0)
    assert ("teacher_attn" in item_keys) == ("attention" in arrays_read) == (beta > 0)


def test_adapter_reloads_with_plain_peft(data):
    """The saved adapter loads with plain peft (+ our alignment file) and gives the
    logits the trained model gives."""
    from peft import PeftModel

    from distill.data import DistillDataset, make_collate
    from distill.train import train

    out = data["tmp"] / "reload"
    # Trained with (non-reentrant) gradient checkpointing, the GPU default: the same run as without.
    trained = train(config_for(data, out, max_steps=10, gradient_checkpointing=True), progress=False)
    student = trained.student
    assert student.model.is_activation_checkpointing and "gradient checkpointing on" in (out / "train.log").read_text()
    assert trained.tap.visual_attention.requires_grad  # L_att's gradient flowed through the checkpointed layers
    plain = train(config_for(data, data["tmp"] / "reload-plain", max_steps=10, gradient_checkpointing=False),
                  progress=False)
    assert not plain.student.model.is_activation_checkpointing
    for term in ("ntp", "vis", "att"):
        assert [m[term] for m in metrics(out)] == pytest.approx([m[term] for m in metrics(plain.out)], abs=1e-6)
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
    for name in ("finished.json", "adapter", "alignment", "loss_curves.png", "checkpoints/step-0000012"):
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


def config_for(data, out, **changes) -> RunConfig:
    """The in-process twin of run(): the same small run as a RunConfig."""
    settings = dict(cache=data["cache"], teacher="tiny", student="tiny", data=data["train"], image_root=data["root"],
                    out=out, layer=2, batch_size=4, grad_accum=1, lr=3e-3, num_workers=0)
    return RunConfig(**{**settings, **changes})


def test_resume_after_an_interrupt_mid_forward_equals_uninterrupted(data, tmp_path, monkeypatch):
    """Ctrl-C inside a step (its first micro-batch done, the second one's forward
    half-way, LoRA dropout masks drawn): the crash checkpoint holds the end of the last
    finished step, RNG included, so --resume gives the uninterrupted run."""
    import distill.train as train_module
    from safetensors.torch import load_file

    from distill.student import decoder_layers
    settings = dict(max_steps=8, grad_accum=2, lora_dropout=0.1)
    train_module.train(config_for(data, tmp_path / "full", **settings), progress=False)

    calls = []

    def apply_lora_then_interrupt_in_step_6(student, **kw):
        apply_lora(student, **kw)

        def interrupt(module, args):  # decoder layer 3: layers 0-2 have drawn their dropout masks
            calls.append(1)
            if len(calls) == 5 * 2 + 2:  # step 6, second micro-batch
                raise KeyboardInterrupt
        decoder_layers(student.model)[3].register_forward_pre_hook(interrupt)

    monkeypatch.setattr(train_module, "apply_lora", apply_lora_then_interrupt_in_step_6)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config_for(data, stopped, **settings), progress=False)
    monkeypatch.undo()
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-0000005"]
    assert [m["step"] for m in metrics(stopped)] == [1, 2, 3, 4, 5]

    train_module.train(config_for(data, stopped, resume=True, **settings), progress=False)
    assert [m["loss"] for m in metrics(stopped)] == pytest.approx([m["loss"] for m in metrics(tmp_path / "full")],
                                                                  abs=1e-6)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_without_a_checkpoint_keeps_each_step_once(data):
    """kill -9 before the first checkpoint: --resume starts again at step 0 and
    metrics.jsonl holds each step once (a half-written last line dropped too)."""
    import shutil
    out = data["tmp"] / "no-checkpoint"
    assert run(data, out, "--max-steps", 3).exit_code == 0
    first = metrics(out)
    for name in ("adapter", "alignment"):
        shutil.rmtree(out / name)
    (out / "finished.json").unlink()
    assert not (out / "checkpoints").exists()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.')
    r = run(data, out, "--max-steps", 3, "--resume")
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in first], abs=1e-6)


def refuse_to_load_the_student(monkeypatch):
    """Cache and data problems must be reported before the (minutes-long) student load."""
    import distill.train as train_module

    def load_student(*args, **kwargs):
        raise AssertionError("the student was loaded before the cache and data checks")
    monkeypatch.setattr(train_module, "load_student", load_student)


def cache_with(data, path: Path, **attributes) -> Path:
    """A copy of the test cache whose group metadata has `attributes` changed."""
    import shutil
    shutil.copytree(data["cache"], path)
    meta = path / "tiny" / "zarr.json"
    group = json.loads(meta.read_text())
    group["attributes"].update(attributes)
    meta.write_text(json.dumps(group))
    return path


def test_refuses_missing_targets_and_existing_run(data, tmp_path, monkeypatch):
    items = json.loads(data["train"].read_text())
    Image.new("L", (64, 64), 128).save(data["root"] / "not_cached.png")
    items.append({"id": "extra", "image": "not_cached.png", "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "top"}]})
    train = tmp_path / "more.json"
    train.write_text(json.dumps(items))
    with monkeypatch.context() as m:
        refuse_to_load_the_student(m)
        r = CliRunner().invoke(distill_cli, ["run", "--cache", str(data["cache"]), "--teacher", "tiny",
                                             "--student", "tiny", "--layer", "2", "--data", str(train),
                                             "--image-root", str(data["root"]), "--out", str(tmp_path / "r"),
                                             "--quiet"])
    assert r.exit_code == 1
    assert "not_cached.png" in r.output and "medalign-cache build" in r.output

    out = data["tmp"] / "exists"
    assert run(data, out, "--max-steps", 1).exit_code == 0
    r = run(data, out, "--max-steps", 1)
    assert r.exit_code == 1 and "--resume" in r.output


@pytest.mark.parametrize("attributes,flags,message", [
    ({"recipe": "last_block_tokens+cls_attention/v2"}, [],
     ["target recipe 'last_block_tokens+cls_attention/v2'", "'last_block_tokens+cls_attention/v1' only"]),
    ({"recipe": None}, [], ["no target recipe"]),
    ({}, ["--pad-to-square"], ["--pad-to-square needs teacher targets of images padded",
                               "preprocessing.pad_to_square=False", "--group tiny-pad", "--pad-to-square`",
                               "--teacher tiny-pad", "drop --pad-to-square"]),
])
def test_refuses_targets_that_do_not_fit(data, tmp_path, monkeypatch, attributes, flags, message):
    """An unknown target recipe, or padding other than the teacher's: refused, before the student loads."""
    cache = cache_with(data, tmp_path / "cache", **attributes)
    refuse_to_load_the_student(monkeypatch)
    r = CliRunner().invoke(distill_cli, ["run", "--cache", str(cache), "--teacher", "tiny", "--student", "tiny",
                                         "--layer", "2", "--data", str(data["train"]), "--image-root",
                                         str(data["root"]), "--out", str(tmp_path / "r"), "--quiet", *flags])
    assert r.exit_code == 1 and all(m in r.output for m in message), r.output


def test_teacher_warnings_follow_random_init_not_the_name(data, tmp_path):
    """A tiny teacher with trained weights (examples/grounding) is legitimate: it only
    gets a note that the architecture is a toy; random weights are what is meaningless."""
    from distill.train import preflight
    from precompute.cache import open_cache
    records = load_records(data["train"], data["root"])
    config = config_for(data, tmp_path / "r")
    random = preflight(config, records, open_cache(data["cache"])["tiny"])
    assert len(random) == 1 and "randomly initialised" in random[0] and "meaningless" in random[0]
    trained = cache_with(data, tmp_path / "trained", random_init=False, seed=None, checkpoint="/w/tiny_teacher.pt")
    warnings = preflight(config, records, open_cache(trained)["tiny"])
    assert len(warnings) == 1 and "toy architecture" in warnings[0] and "/w/tiny_teacher.pt" in warnings[0]
    assert "meaningless" not in warnings[0]


def test_config_file_with_flag_override(data, tmp_path):
    cfg = tmp_path / "ablation.json"
    cfg.write_text(json.dumps({"layer": 3, "beta": 0.0, "lora_r": 4}))
    out = data["tmp"] / "cfg"
    r = run(data, out, "--config", cfg, "--max-steps", 2, "--lora-r", 8)
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["layer"], saved["beta"], saved["lora_r"]) == (2, 0.0, 8)  # run() passes --layer 2


def test_defaults_follow_the_reference():
    """docs/method.md's recipe: layer 20, alpha 1, beta 0.03, LoRA 32/16/0.05, lr 2e-4 cosine
    with 3% warmup, no weight decay, effective batch 32, max length 1024, 9-12 epochs."""
    c = RunConfig(cache="c", teacher="t", student="tiny", data="d", image_root="i", out="o")
    assert (c.layer, c.alpha, c.beta, c.eps) == (20, 1.0, 0.03, 1.0)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (32, 16, 0.05)
    assert (c.lr, c.warmup_ratio, c.weight_decay, c.max_length) == (2e-4, 0.03, 0.0, 1024)
    assert c.batch_size * c.grad_accum == 32 and 9 <= c.epochs <= 12 and c.max_steps is None


@pytest.mark.parametrize("change,message", [
    ({"layer": 0}, "layer must be >= 1"),
    ({"alpha": -1}, "alpha and beta"),
    ({"attn_loss": "mse"}, "attn_loss"),
    ({"precision": "fp8"}, "precision"),
    ({"quantize": "3bit"}, "quantize must be one of 4bit, 8bit"),
    ({"report_to": "tensorboard,mlflow"}, r"unknown tracker\(s\) \['mlflow'\]"),
    ({"batch_size": 0}, "batch_size"),
    ({"lang": "fr"}, "lang must be one of"),
    ({"eps": float("inf")}, "eps must be a finite number, got inf"),
    ({"alpha": float("nan")}, "alpha must be a finite number, got nan"),
    ({"lr": float("-inf")}, "lr must be a finite number"),
    ({"layer": [1, 2]}, r"layer must be an integer, got \[1, 2\] \(list\)"),
    ({"layer": 2.5}, "layer must be an integer"),
    ({"pad_to_square": "yes"}, "pad_to_square must be true or false or null"),
    ({"lora_targets": ["q_proj", 3]}, "lora_targets must be a list of strings or null"),
    ({"lr": "1e-3"}, "write 1.0e-3"),
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
    assert tok.decode(learned) == f" {record.answer} {tok.eos_token}"     # mistral_instruct: " A </s>"
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


@pytest.mark.parametrize("template,closing,learned", [
    ("mistral_instruct", " [/INST]", " {a} </s>"), ("llava_v1", " ASSISTANT:", " {a}</s>"),
    ("vicuna_v1", " ASSISTANT:", " {a}</s>"), ("huatuo_v1", " <|assistant|>:", " {a}<|endoftext|>"),
    ("huatuo", "\n<|assistant|>\n", "{a} \n")])
def test_named_chat_templates_mask_all_but_the_answer(data, tmp_path, template, closing, learned):
    """Every named template: only the answer and its end marker are learned; the query rows
    are the prompt text after the image up to where the answer starts."""
    from distill.student import make_tiny_student
    student = load_student(str(make_tiny_student(tmp_path / "s")), chat_template=template)
    record = load_records(data["train"], data["root"])[0]
    enc = encode(student.processor, record, student.num_visual_tokens, 1024)
    tok = student.processor.tokenizer
    assert tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]) == \
        learned.format(a=record.answer)
    lo, hi = enc.query_rows
    assert tok.decode(enc.input_ids[lo:hi]) == f"\n{record.prompt}{closing}"


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


def test_a_url_cache_trains_like_the_local_one(data, tmp_path, memory_url):
    """--cache may be an fsspec URL: the targets stream through fsspec range reads and the
    run is the same as from the local folder (memory:// stands in for s3:// here)."""
    url = memory_url
    build_cache(BuildConfig(teacher="tiny", random_init=True, cache=url, data=data["train"],
                            image_root=data["root"], num_workers=0), progress=False)
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run(data, local, "--max-steps", "3").exit_code == 0
    r = run(data, remote, "--max-steps", "3", "--cache", url)   # the last --cache wins
    assert r.exit_code == 0, r.output
    assert json.loads((remote / "config.json").read_text())["cache"] == url
    for a, b in zip(metrics(local), metrics(remote), strict=True):
        for term in ("ntp", "vis", "att"):
            assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-9), term


def test_rebuild_command_for_an_exported_h5_cache_builds_a_zarr_cache(tmp_path):
    """An .h5 cache is read-only: the command that completes its targets builds into the
    Zarr folder beside it (to export again), never into the .h5 file."""
    from types import SimpleNamespace

    from distill.train import rebuild_command
    group = SimpleNamespace(name="tiny", metadata={"teacher": "tiny", "random_init": True, "seed": 0,
                                                   "preprocessing": {"pad_to_square": True}})
    config = config_for({"train": tmp_path / "t.json", "root": tmp_path, "cache": tmp_path / "cache.h5"},
                        tmp_path / "r")
    command = rebuild_command(config, group)
    assert f"--cache {tmp_path / 'cache'} " in command + " " and ".h5" not in command
    assert command.endswith("--pad-to-square")


# ----------------------------------------------------------------------------- nothing wrong reaches training


def test_a_damaged_target_stops_training_with_its_one_line(data, tmp_path):
    import shutil

    from tests.test_cache import chunk_span, flip
    from precompute.cache import open_cache
    cache = tmp_path / "cache"
    shutil.copytree(data["cache"], cache)
    group = open_cache(cache)["tiny"]
    row = group.index("scan_05.png")
    shard, offset, nbytes = chunk_span(cache, "similarity", row, group.shard_size, group="tiny")
    flip(shard, offset + nbytes // 2)
    out = tmp_path / "run"
    r = run(data, out, "--max-steps", 4, "--cache", cache)       # one epoch: every sample is read
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.count("Error:") == 1 and "'scan_05.png'" in r.output and str(shard) in r.output
    assert "fails its checksum" in r.output and f"cache {cache}, group 'tiny'" in r.output
    assert not (out / "finished.json").exists() and not (out / "adapter").exists()


def test_one_writer_per_run_directory(data, tmp_path, monkeypatch):
    """A second run (or --resume) on a folder a running run writes is refused, naming
    the writer's pid, before it writes anything."""
    import distill.train as train_module
    from distill.rundir import RunDirError
    out = tmp_path / "run"
    refused = []
    save = train_module.save_checkpoint

    def save_and_start_two_more(*args, **kwargs):
        for changes in ({"lr": 1e-2}, {"resume": True}):         # while the first run is at step 2
            with pytest.raises(RunDirError) as e:
                train_module.train(config_for(data, out, max_steps=4, **changes), progress=False)
            refused.append(str(e.value))
        return save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_start_two_more)
    train_module.train(config_for(data, out, max_steps=4, save_every=2), progress=False)
    assert len(refused) == 2
    for message in refused:
        assert f"another `medalign-distill run` is writing {out} (pid {os.getpid()}" in message
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-3      # the first run's, alone
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]

    # the same through the CLI, with the folder held by another process
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom distill.rundir import run_lock\n"
                               f"with run_lock({str(held)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            r = run(data, held, "--max-steps", 1, *extra)
            assert r.exit_code == 1 and r.output.count("Error:") == 1 and "Traceback" not in r.output
            assert f"is writing {held} (pid {holder.pid}, lock {held / 'run.lock'})" in r.output
        assert [p.name for p in held.iterdir()] == ["run.lock"]          # nothing else written
    finally:
        holder.communicate("")


@pytest.mark.parametrize("flags,yaml_text,message", [
    (["--eps", "inf", "--layer", "2"], None, "invalid run config: eps must be a finite number, got inf"),
    (["--alpha", "nan", "--layer", "2"], None, "invalid run config: alpha must be a finite number, got nan"),
    ([], "layer: [1, 2]\n", "run.yaml (with the flags given): invalid run config: layer must be an integer, "
                            "got [1, 2] (list)"),
    ([], "beta: 0.1\nalpha: [oops\n", "run.yaml: not valid YAML (line 3, column 1: expected ',' or ']'"),
])
def test_bad_settings_are_one_line_before_any_work(data, tmp_path, flags, yaml_text, message):
    if yaml_text is not None:
        (tmp_path / "run.yaml").write_text(yaml_text)
        flags = ["--config", tmp_path / "run.yaml"]
    out = tmp_path / "run"
    args = ["run", "--cache", data["cache"], "--teacher", "tiny", "--student", "tiny", "--data", data["train"],
            "--image-root", data["root"], "--out", out, "--max-steps", 2, "--workers", 0, "--quiet", *flags]
    r = CliRunner().invoke(distill_cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("Error: ") and message in r.output and len(r.output.splitlines()) == 1
    assert not out.exists()


def test_check_finite():
    from distill.train import RunError, check_finite
    check_finite({"ntp": 1.0, "vis": 0.0, "grad_norm": 3e38}, 7, ["a"])
    with pytest.raises(RunError, match=r"non-finite vis = nan, att = inf at step 7 \(samples 'a', 'b'\)"):
        check_finite({"ntp": 1.0, "vis": float("nan"), "att": float("inf")}, 7, ["a", "b"])
    with pytest.raises(RunError, match=r"samples 's0', .*'s7' and 2 more\)"):
        check_finite({"ntp": float("-inf")}, 1, [f"s{i}" for i in range(10)])


def test_a_nan_loss_stops_the_run_naming_step_samples_and_checkpoint(data, tmp_path, monkeypatch):
    import distill.train as train_module
    from safetensors.torch import load_file
    calls = []
    real = train_module.attention_distill_loss

    def nan_in_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "attention_distill_loss", nan_in_step_3)
    out = tmp_path / "run"
    r = run(data, out, "--max-steps", 6, "--save-every", 2)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    step3 = [f"q{i}" for i in train_module.micro_batches(16, 4, 0, 0)[2]]
    assert f"non-finite att = nan at step 3 (samples {', '.join(map(repr, step3))})" in r.output
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step-0000002'} (step 2)" in r.output
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert all(torch.isfinite(t).all() for t in
               load_file(out / "checkpoints" / "step-0000002" / "adapter" / "adapter_model.safetensors").values())
    assert not (out / "finished.json").exists()
    assert "non-finite att = nan at step 3" in (out / "train.log").read_text()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumable(data, tmp_path, monkeypatch):
    import errno

    import distill.train as train_module
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full_in_step_4(obj, f, *args, **kwargs):
        if "step-0000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_module.torch, "save", disk_full_in_step_4)
        r = run(data, out, "--max-steps", 6, "--save-every", 2)
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("Error:") == 1, r.output
    line = r.output.splitlines()[0]
    assert line.startswith(f"Error: training stopped at step 4: {out / 'checkpoints' / 'step-0000004.tmp'}")
    assert line.endswith(": No space left on device; free space or move the run to a larger disk")
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step-0000002'} (step 2)" in r.output
    assert "No space left on device" in (out / "train.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]   # no half-written one
    r = run(data, out, "--max-steps", 6, "--save-every", 2, "--resume")
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6] and (out / "finished.json").is_file()


def test_a_half_written_tiny_student_never_blocks_a_rerun(data, tmp_path, monkeypatch):
    import errno

    import distill.student as student_module
    import distill.train as train_module
    real = student_module.make_tiny_student

    def disk_full_after_the_weights(out_dir, seed=0):
        real(out_dir, seed=seed)
        for f in Path(out_dir).iterdir():         # as if the processor's files never made it
            if f.name not in ("config.json", "model.safetensors"):
                f.unlink()
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / "tokenizer.json"))

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(student_module, "make_tiny_student", disk_full_after_the_weights)
        m.setattr(train_module, "make_tiny_student", disk_full_after_the_weights, raising=False)
        r = run(data, out, "--max-steps", 2)
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("Error:") == 1, r.output
    assert "tokenizer.json: No space left on device; free space" in r.output and "--resume" in r.output
    assert not [p.name for p in out.iterdir() if p.name.startswith("tiny-student")]
    r = run(data, out, "--max-steps", 2, "--resume")
    assert r.exit_code == 0, r.output
    assert (out / "finished.json").is_file()


def test_a_huge_text_field_is_cut_or_refused_before_tokenisation(data, tmp_path):
    """A 4 MB question is refused and a 4 MB answer cut by characters, before the
    tokenizer sees them: memory stays far below the text's size (tokenising it whole
    took 22.7 GB for a 200 MB line). A cut answer gives exactly the tokens of the
    uncut one truncated to max_length."""
    import tracemalloc

    from distill.data import DistillDataset
    from distill.student import make_tiny_student
    from precompute.datasets import Record
    student = load_student(str(make_tiny_student(tmp_path / "s")))
    proc, V = student.processor, student.num_visual_tokens
    big = "the lesion is small and round. " * (4 * 2**20 // 31)
    records = [Record("huge-question", ("scan_00.png",), ((big, "top"),), "vqa"),
               Record("huge-answer", ("scan_00.png",), (("Where is the bright spot?", big),), "vqa")]
    dataset = DistillDataset(records, data["root"], proc, V, 128, None, False)
    tracemalloc.start()
    try:
        refused, cut = dataset[0], dataset[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(big) / 8, peak
    from distill.data import text_limit
    assert "record 'huge-question': its question has 4,194," in refused["error"]
    assert f"more than the {text_limit(proc.tokenizer, 128):,} that fit in the student's" in refused["error"]
    assert len(cut["input_ids"]) == 128
    # against the uncut text, where tokenising it whole is cheap: the same tokens
    limit = text_limit(proc.tokenizer, 128)
    long = Record("long", ("scan_00.png",), (("Where is the bright spot?", big[:3 * limit]),), "vqa")
    whole = encode(proc, long, V, 128)
    assert (cut["input_ids"], cut["labels"]) == (whole.input_ids, whole.labels)
