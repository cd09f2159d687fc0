"""Memory-saving number formats on the tiny student, on CPU: 4-bit and 8-bit students
(QLoRA through bitsandbytes), fp16 with its loss scaler, the stop on NaN/inf losses, and
how `--precision auto` resolves."""

import functools
import json
import shutil
import sys

import bitsandbytes as bnb  # the test extra installs it, so CI runs the 4-bit tests
import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from safetensors.torch import load_file

import distill.train as train_module
from distill.cli import main as distill_cli
from distill.inference import generate_batch, left_pad_collate, load_medalign
from distill.precision import (LossScaler, quantized_linears, resolve_precision)
from distill.student import decoder_layers
from distill.train import micro_batches, train
from precompute.datasets import load_records
from tests import test_train
from tests.test_train import config_for, metrics, run

data = test_train.data  # the module-scoped fixture of images and cache, shared by name



def falls(rows, term, factor=0.7, n=5) -> bool:
    a, b = np.mean([x[term] for x in rows[:n]]), np.mean([x[term] for x in rows[-n:]])
    return b < factor * a


def same_adapter(a_dir, b_dir):
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def crash_after(full, crashed, checkpoint: int, steps_done: int, last: int):
    """What a crash `steps_done` steps into a run leaves when its last checkpoint is `checkpoint`."""
    shutil.copytree(full, crashed)
    for name in ("adapter", "alignment", f"checkpoints/step-{last:07d}"):
        shutil.rmtree(crashed / name, ignore_errors=True)
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:steps_done]) + "\n")
    cfg = json.loads((crashed / "config.json").read_text())
    cfg["out"] = str(crashed)
    (crashed / "config.json").write_text(json.dumps(cfg))
    assert (crashed / "checkpoints" / f"step-{checkpoint:07d}").is_dir()


# ----------------------------------------------------------------------------- 4-bit students

@pytest.fixture(scope="module")
def q4(data):
    """A 4-bit run of 40 steps (checkpoint at 20), trained in this process."""
    out = data["tmp"] / "q4"
    result = train(config_for(data, out, quantize="4bit", max_steps=40, save_every=20, warmup_ratio=0.05, beta=0.5),
                   progress=False)
    return out, result


def assert_really_4bit(model, compute_dtype):
    """Every linear layer of the decoder is a bitsandbytes NF4 layer with double quantisation
    whose packed weight holds two 4-bit codes per byte, and its forward is x @ dequant(W)^T;
    the vision tower, projector and lm_head are not quantized."""
    decoder = {id(m) for m in decoder_layers(model).modules()}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    inside = [(n, m) for n, m in linears if id(m) in decoder]
    assert inside and all(isinstance(m, bnb.nn.Linear4bit) for _, m in inside)
    for name, m in inside:
        w = m.weight
        assert type(w).__name__ == "Params4bit" and w.dtype == torch.uint8, name
        assert 2 * w.numel() == m.in_features * m.out_features, name
        state = w.quant_state
        assert state.quant_type == "nf4" and state.nested and state.dtype == compute_dtype, name
    name, m = inside[0]
    dense = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    # (an input that needs no gradient would let bitsandbytes repack the weight for its CPU
    # inference kernel, which computes in bf16)
    x = torch.randn(3, m.in_features, dtype=compute_dtype, requires_grad=True)
    assert torch.allclose(m(x).float(), x.detach().float() @ dense.float().T, atol=1e-4)
    assert len(torch.unique(dense[0])) <= 16 * 64  # NF4: 16 codes x one scale per 64-value block
    outside = [(n, m) for n, m in linears if id(m) not in decoder]
    assert {n.split(".")[-1] for n, _ in outside} >= {"lm_head", "linear_1", "linear_2", "q_proj", "fc1"}
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for _, m in outside)
    assert all(m.weight.dtype in (torch.float32, torch.float16, torch.bfloat16) for _, m in outside)


def test_4bit_run_trains_with_falling_losses_on_4bit_layers(q4):
    out, result = q4
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for term in ("ntp", "vis", "att", "loss"):
        assert falls(rows, term), term
    model = result.student.model
    assert_really_4bit(model, torch.float32)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert result.transform.weight.dtype == torch.float32  # W stays fp32
    assert json.loads((out / "config.json").read_text())["quantize"] == "4bit"
    assert json.loads((out / "student.json").read_text())["quantize"] == "4bit"
    assert "language model 4bit" in (out / "train.log").read_text()


def test_4bit_resume_equals_uninterrupted(data, q4):
    full, _ = q4
    crashed = data["tmp"] / "q4-crashed"
    crash_after(full, crashed, checkpoint=20, steps_done=25, last=40)
    r = run(data, crashed, "--quantize", "4bit", "--max-steps", 40, "--save-every", 20, "--warmup-ratio", 0.05,
            "--beta", 0.5, "--resume")
    assert r.exit_code == 0, r.output
    for key in ("loss", "ntp", "vis", "att", "lr", "grad_norm"):
        assert [m[key] for m in metrics(crashed)] == pytest.approx([m[key] for m in metrics(full)], abs=1e-6), key
    assert same_adapter(full / "adapter", crashed / "adapter")


def test_4bit_run_evaluates_as_trained_and_its_adapter_loads_unquantized(data, q4, tmp_path):
    out, _ = q4
    r = CliRunner().invoke(distill_cli, ["eval", "--run", str(out), "--data", str(data["train"]), "--image-root",
                                         str(data["root"]), "--limit", "4", "--max-new-tokens", "4", "--workers", "0",
                                         "--no-meteor", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "eval" / "train" / "metrics.json").read_text())
    assert m["model"]["quantize"] == "4bit" and m["n"] == 4

    as_trained = load_medalign(out)
    assert_really_4bit(as_trained.student.model, torch.float32)
    plain = load_medalign(out, quantize="none")
    assert not quantized_linears(plain.student.model)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    lora = {n: p for n, p in plain.student.model.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved)
    for name, p in lora.items():  # peft names the loaded adapter ".default"
        assert torch.equal(p.detach(), saved[name.replace(".default", "")]), name
    # ... and it generates on the 16-bit base, as the 4-bit model does
    records = load_records(data["train"], data["root"])[:2]
    for em in (as_trained, plain):
        s = em.student
        ds = em.dataset(records, data["root"])
        batch = left_pad_collate(s.processor.tokenizer.pad_token_id, s.image_token_id,
                                 s.num_visual_tokens)([ds[0], ds[1]])
        assert generate_batch(em, batch, max_new_tokens=3).shape[0] == 2


def test_4bit_run_pictures(data, q4, tmp_path):
    from distill.pictures import make_pictures
    out, _ = q4
    result = make_pictures(out, data["train"], data["root"], tmp_path / "pics", n=2, tsne_n=8, batch_size=4)
    assert (tmp_path / "pics" / "attention.png").is_file() and "attention" in result.files


def test_8bit_run_trains_on_8bit_layers(data):
    out = data["tmp"] / "q8"
    result = train(config_for(data, out, quantize="8bit", max_steps=20, warmup_ratio=0.05, beta=0.5),
                   progress=False)
    assert falls(metrics(out), "ntp")
    found = quantized_linears(result.student.model)
    n_decoder = sum(isinstance(m, nn.Linear) and "lora_" not in n
                    for n, m in decoder_layers(result.student.model).named_modules())
    assert len(found) == n_decoder and set(found.values()) == {"8bit"}
    assert all(m.weight.dtype == torch.int8 for m in result.student.model.modules()
               if isinstance(m, bnb.nn.Linear8bitLt))


def test_missing_bitsandbytes_is_one_line(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    r = run(data, data["tmp"] / "no-bnb", "--quantize", "4bit", "--max-steps", 1)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("Error: --quantize 4bit needs the bitsandbytes package")
    assert 'pip install "medalign[quant]"' in lines[-1] and "Traceback" not in r.output
    assert not (data["tmp"] / "no-bnb" / "config.json").exists()  # refused before the student load


# ----------------------------------------------------------------------------- fp16 and its scaler

def test_fp16_trains_with_its_loss_scaler_and_resumes_exactly(data, tmp_path, monkeypatch):
    """A scale too large for fp16 (2^24): the first steps overflow, are skipped (weights and
    schedule untouched, counted in metrics.jsonl) and halve the scale until it fits; then
    the run trains. A resume from a checkpoint restores the scaler: the same run."""
    monkeypatch.setattr(train_module, "LossScaler", functools.partial(LossScaler, init_scale=2.0 ** 24))
    full = tmp_path / "fp16"
    result = train(config_for(data, full, precision="fp16", max_steps=24, save_every=12, warmup_ratio=0.05),
                   progress=False)
    rows = metrics(full)
    skipped = [r["skipped_steps"] for r in rows]
    n = skipped[-1]
    assert 1 <= n <= 10 and skipped == sorted(skipped)
    assert [r["loss_scale"] for r in rows[:n]] == [2.0 ** (24 - k) for k in range(1, n + 1)]
    assert all(r["lr"] == 0.0 and not np.isfinite(r["grad_norm"]) for r in rows[:n])  # schedule held
    assert rows[n]["lr"] > 0 and all(np.isfinite(r["grad_norm"]) for r in rows[n:])
    assert falls(rows[n:], "ntp")
    model = result.student.model
    base = [p for n_, p in model.named_parameters() if "q_proj.base_layer" in n_]
    assert base and all(p.dtype == torch.float16 for p in base)                     # fp16 weights
    assert all(p.dtype == torch.float32 for n_, p in model.named_parameters() if "lora_" in n_)  # fp32 LoRA
    assert "fp16" in (full / "train.log").read_text()

    crashed = tmp_path / "fp16-crashed"
    crash_after(full, crashed, checkpoint=12, steps_done=15, last=24)
    assert (crashed / "checkpoints" / "step-0000012" / "scaler.pt").is_file()
    train(config_for(data, crashed, precision="fp16", max_steps=24, save_every=12, warmup_ratio=0.05, resume=True),
          progress=False)
    for key in ("loss", "ntp", "loss_scale", "skipped_steps", "lr"):
        assert [m[key] for m in metrics(crashed)] == pytest.approx([m[key] for m in rows], abs=1e-6), key
    assert same_adapter(full / "adapter", crashed / "adapter")


# ----------------------------------------------------------------------------- NaN / inf

class _InfGradient(torch.autograd.Function):
    """Identity forward, inf gradient backward: a finite loss whose update would be inf."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_loss(monkeypatch, at_call: int):
    real, calls = train_module.next_token_loss, []

    def next_token_loss(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == at_call else loss
    monkeypatch.setattr(train_module, "next_token_loss", next_token_loss)


def poison_gradient(monkeypatch, at_call: int):
    real, calls = train_module.AlignmentTransform, []

    class Transform(real):
        def forward(self, x):
            calls.append(1)
            return _InfGradient.apply(super().forward(x)) if len(calls) == at_call else super().forward(x)
    monkeypatch.setattr(train_module, "AlignmentTransform", Transform)


@pytest.mark.parametrize("poison,precision,what", [
    (poison_loss, "fp32", "non-finite ntp = nan at step 3 (samples "),
    (poison_loss, "fp16", "non-finite ntp = nan at step 3 (samples "),  # not a skipped step
    (poison_gradient, "fp32", "non-finite grad_norm = nan at step 3 (samples "),
])
def test_nonfinite_stops_the_run_naming_step_samples_and_checkpoint(data, tmp_path, monkeypatch, poison, precision,
                                                                    what):
    out = tmp_path / "nan"
    poison(monkeypatch, at_call=3)
    r = run(data, out, "--max-steps", 5, "--precision", precision)
    assert r.exit_code == 1
    error = r.output[r.output.index("Error: "):]
    assert what in error and "Traceback" not in r.output
    if poison is poison_loss:
        records = load_records(data["train"], data["root"])
        ids = [records[i].id for i in micro_batches(len(records), 4, 0, 0)[2]]
        assert f"(samples {', '.join(map(repr, ids))})" in error
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step-0000002'} (step 2)" in error
    assert [m["step"] for m in metrics(out)] == [1, 2]
    saved = load_file(out / "checkpoints" / "step-0000002" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())  # nothing of step 3 reached the weights
    monkeypatch.undo()
    r = run(data, out, "--max-steps", 5, "--precision", precision, "--resume")
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- precision auto

@pytest.mark.parametrize("asked,device,capability,expected", [
    ("auto", "cpu", None, "fp32"),
    ("auto", "cuda", (8, 0), "bf16"),    # A100
    ("auto", "cuda", (9, 0), "bf16"),    # H100
    ("auto", "cuda", (7, 0), "fp16"),    # V100: no bf16
    ("auto", "cuda", (7, 5), "fp16"),    # T4
    ("fp16", "cpu", None, "fp16"),
    ("bf16", "cuda", (7, 0), "bf16"),    # asked explicitly: the user's choice
])
def test_precision_auto(monkeypatch, asked, device, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision(asked, device) == expected


def test_precision_refuses_unknown():
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32"):
        resolve_precision("fp8", "cpu")
