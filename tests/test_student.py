"""The student on a tiny random LLaVA: loading, LoRA placement, the alignment transform,
the one-layer attention capture (against eager attention), checkpointing, saving."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from distill.losses import attention_distill_loss, visual_alignment_loss
from distill.student import (AlignmentTransform, DistillTap, StudentError, apply_lora,
                             decoder_layers, load_alignment, load_student, make_tiny_student,
                             prompt_visual_attention, save_alignment)

LAYER = 2  # transform at decoder layer index 1, attention at index 2 (the tiny student has 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("tiny-student"), seed=0)


def _image(seed, size=(50, 70)):
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def make_batch(student, questions, answers):
    """Chat-template prompts with one image each, right-padded by the processor.

    Returns the processor's encoding (+ labels) and what DistillTap.set_batch wants:
    the visual positions and the prompt rows between the image and the answer.
    """
    proc = student.processor
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                        add_generation_prompt=True, tokenize=False) for q in questions]
    images = [_image(i) for i in range(len(questions))]
    enc = proc(text=[p + a for p, a in zip(prompts, answers)], images=images, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    B, T = ids.shape
    visual_index = (ids == student.image_token_id).nonzero()[:, 1].view(B, -1)
    query_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, im) in enumerate(zip(prompts, images)):
        prompt_len = proc(text=p, images=im, return_tensors="pt")["input_ids"].shape[1]
        query_mask[b, visual_index[b, -1] + 1:prompt_len] = True
    enc["labels"] = torch.where(enc["attention_mask"].bool(), ids, -100)
    return enc, visual_index, query_mask


PADDED = (["What is shown?", "Describe the lesion in detail, please."], [" A lung.", " No."])
UNPADDED = (["What is shown?", "Where is it???"], [" A lung.", " Lobe."])  # equal byte lengths


# ----------------------------------------------------------------------------- tiny student + loading

def test_tiny_student_small_and_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_student(tmp_path / "a", seed=3)
    b = make_tiny_student(tmp_path / "b", seed=3)
    c = make_tiny_student(tmp_path / "c", seed=4)
    assert sum(f.stat().st_size for f in a.iterdir()) < 5 * 2 ** 20
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert json.loads((a / "config.json").read_text())["model_type"] == "llava"


def test_load_student_and_forward_padded_batch(tiny):
    s = load_student(str(tiny))
    assert (s.grid, s.num_visual_tokens, s.num_layers, s.hidden_size) == (6, 36, 4, 64)
    assert s.image_token_id == s.processor.tokenizer.convert_tokens_to_ids("<image>")
    # the processor inserts exactly as many image tokens as the model fills
    enc = s.processor(text="<image>\nhi", images=_image(0), return_tensors="pt")
    assert int((enc["input_ids"] == s.image_token_id).sum()) == s.num_visual_tokens
    # a batch of 2 prompts of different lengths, right padded
    enc, visual_index, query_mask = make_batch(s, *PADDED)
    assert enc["attention_mask"].sum(1).tolist()[0] < enc["input_ids"].shape[1]  # the first one is padded
    assert visual_index.shape == (2, 36)
    with torch.no_grad():
        out = s.model(**enc)
    assert out.logits.shape == (*enc["input_ids"].shape, len(s.processor.tokenizer))
    assert torch.isfinite(out.loss)
    # right padding leaves the real tokens' logits as in an unpadded forward of that sample alone
    n = int(enc["attention_mask"][0].sum())
    with torch.no_grad():
        alone = s.model(input_ids=enc["input_ids"][:1, :n], attention_mask=enc["attention_mask"][:1, :n],
                        pixel_values=enc["pixel_values"][:1]).logits
    assert torch.allclose(out.logits[0, :n], alone[0], atol=1e-5)


def test_load_student_refuses_what_it_cannot_load(tiny, tmp_path):
    for bad in ["tiny", str(tmp_path / "missing")]:
        with pytest.raises(StudentError, match="llava-med-v1.5-mistral-7b"):
            load_student(bad)
    original = tmp_path / "llava-med"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    with pytest.raises(StudentError, match="llava_mistral") as err:
        load_student(str(original))
    # the original format gets the exact conversion command (tests/test_convert.py runs it)
    assert isinstance(err.value, ValueError) and "medalign-distill convert --model" in str(err.value)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny / "config.json").read_text())
    with pytest.raises(StudentError, match="could not be loaded"):
        load_student(str(config_only))


# ----------------------------------------------------------------------------- LoRA

def test_apply_lora_only_on_language_model_linears(tiny):
    s = load_student(str(tiny))
    apply_lora(s, r=4, alpha=8, dropout=0.0)
    names = [n for n, _ in s.model.named_modules()]
    adapted = {n.rsplit(".lora_A", 1)[0] for n in names if n.endswith(".lora_A")}
    assert adapted and all(".language_model.layers." in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"}
    assert len(adapted) == 4 * 7
    for part in ("vision_tower", "multi_modal_projector", "lm_head"):
        assert not any(part in n and "lora_" in n for n in names), part
    trainable = [(n, p) for n, p in s.model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) > 0
    assert all("lora_" in n for n, _ in trainable)
    assert len(decoder_layers(s.model)) == 4  # the layers are still found through the peft wrapper
    with pytest.raises(StudentError, match="already"):
        apply_lora(s)


def test_apply_lora_short_names_never_reach_the_vision_tower(tiny):
    s = load_student(str(tiny))
    # CLIP names its projections q_proj too: a plain ["q_proj"] for peft would adapt them
    assert any("vision_tower" in n and n.endswith(".q_proj") for n, _ in s.model.named_modules())
    apply_lora(s, target_modules=["q_proj", "v_proj"])
    adapted = [n for n, _ in s.model.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 8 and all("language_model" in n for n in adapted)
    with pytest.raises(StudentError, match="available"):
        apply_lora(load_student(str(tiny)), target_modules=["qkv"])


# ----------------------------------------------------------------------------- attention capture

def _eager_reference(tiny, enc, visual_index, query_mask, layer):
    """Eager attention weights of decoder layer `layer`: heads averaged, rows selected and averaged."""
    e = load_student(str(tiny), attn_implementation="eager")
    with torch.no_grad():
        attn = e.model(**enc, output_attentions=True).attentions[layer]      # [B, H, T, S]
    rows = []
    for b in range(attn.shape[0]):
        a = attn[b].mean(0)                                                   # heads
        rows.append(a[query_mask[b]][:, visual_index[b]].mean(0))             # rows, then visual columns
    return torch.stack(rows)


@pytest.mark.parametrize("batch,base,lora", [(PADDED, "sdpa", False), (UNPADDED, "sdpa", False),
                                             (PADDED, "eager", False), (PADDED, "sdpa", True)])
def test_attention_capture_equals_eager_attention(tiny, batch, base, lora):
    s = load_student(str(tiny), attn_implementation=base)
    if lora:
        apply_lora(s, dropout=0.0)  # LoRA B starts at zero: same function as the base model
    enc, visual_index, query_mask = make_batch(s, *batch)
    tap = DistillTap(s, LAYER, None, capture_attention=True)
    tap.set_batch(visual_index, query_mask)
    with torch.no_grad():
        logits = s.model(**enc).logits
    assert tap.aligned_visual is None and tap.visual_attention.shape == (2, 36)
    assert tap.visual_attention.dtype == torch.float32
    want = _eager_reference(tiny, enc, visual_index, query_mask, LAYER)
    assert torch.allclose(tap.visual_attention, want, atol=1e-5), (tap.visual_attention - want).abs().max()
    # the capture changes nothing in the model's output, and remove() restores the implementation
    plain = load_student(str(tiny), attn_implementation=base)
    with torch.no_grad():
        assert torch.allclose(logits, plain.model(**enc).logits, atol=1e-5)
    tap.remove()
    assert decoder_layers(s.model)[LAYER].self_attn.config._attn_implementation == base


def _attention_by_loops(q, k, allowed, scaling, query_mask, visual_index):
    """Independent computation: per sample, head and row, a softmax over the allowed keys."""
    B, H, T, hd = q.shape
    n_rep = H // k.shape[1]
    out = torch.zeros(B, visual_index.shape[1], dtype=torch.float64)
    for b in range(B):
        rows = query_mask[b].nonzero()[:, 0].tolist()
        for t in rows:
            for h in range(H):
                logits = (k[b, h // n_rep].double() @ q[b, h, t].double()) * scaling
                logits[~allowed[b, t]] = float("-inf")
                out[b] += logits.softmax(0)[visual_index[b]] / (H * len(rows))
    return out


def test_prompt_visual_attention_every_mask_form():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, hd = 2, 4, 2, 12, 8
    q, k = torch.randn(B, H, T, hd, generator=g), torch.randn(B, Hkv, T, hd, generator=g)
    lengths = torch.tensor([9, 12])
    visual_index = torch.tensor([[1, 2, 3], [2, 3, 4]])
    query_mask = torch.zeros(B, T, dtype=torch.bool)
    query_mask[0, 4:7] = True
    query_mask[1, 5:12] = True
    pad = torch.arange(T)[None, :] < lengths[:, None]                      # [B, S]
    causal = torch.ones(T, T).tril().bool()
    allowed = causal[None] & pad[:, None, :]                               # [B, T, S]
    want = _attention_by_loops(q, k, allowed, 0.3, query_mask, visual_index)
    forms = {
        "bool 4D (sdpa)": allowed[:, None],
        "float 4D (eager)": torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None],
        "2D padding (flash)": pad.long(),
    }
    for name, mask in forms.items():
        got = prompt_visual_attention(q, k, mask, 0.3, query_mask, visual_index)
        assert torch.allclose(got.double(), want, atol=1e-6), name
    # None: pure causal, nothing padded
    want = _attention_by_loops(q, k, causal[None].expand(B, T, T), 0.3, query_mask, visual_index)
    got = prompt_visual_attention(q, k, None, 0.3, query_mask, visual_index)
    assert torch.allclose(got.double(), want, atol=1e-6)
    # a sliding window on the implicit masks (Mistral-style: key within the last `window` positions)
    window = 3
    near = torch.arange(T)[None, :] > torch.arange(T)[:, None] - window
    want = _attention_by_loops(q, k, (causal & near)[None].expand(B, T, T), 0.3, query_mask, visual_index)
    got = prompt_visual_attention(q, k, None, 0.3, query_mask, visual_index, sliding_window=window)
    assert torch.allclose(got.double(), want, atol=1e-6)
    with pytest.raises(StudentError, match="no query rows"):
        prompt_visual_attention(q, k, None, 0.3, torch.zeros(B, T, dtype=torch.bool), visual_index)


def test_tap_requires_set_batch_and_a_valid_layer(tiny):
    s = load_student(str(tiny))
    for layer in (0, 4):
        with pytest.raises(StudentError, match="layer"):
            DistillTap(s, layer, AlignmentTransform(s.hidden_size), True)
    tap = DistillTap(s, LAYER, AlignmentTransform(s.hidden_size), True)
    enc, _, _ = make_batch(s, *PADDED)
    with pytest.raises(StudentError, match="set_batch"):
        s.model(**enc)
    with pytest.raises(StudentError, match="already"):
        DistillTap(s, LAYER, None, True)
    tap.remove()
    DistillTap(s, LAYER, None, True).remove()


def test_tap_with_nothing_to_do_installs_nothing(tiny):
    s = load_student(str(tiny))
    tap = DistillTap(s, LAYER, None, capture_attention=False)
    assert s.model.config.text_config._attn_implementation == "sdpa"
    enc, _, _ = make_batch(s, *PADDED)
    with torch.no_grad():
        s.model(**enc)  # no set_batch needed: nothing is hooked
    assert tap.aligned_visual is None and tap.visual_attention is None


# ----------------------------------------------------------------------------- alignment transform

def test_alignment_transform_zero_init_then_exact_formula(tiny):
    s = load_student(str(tiny))
    enc, visual_index, query_mask = make_batch(s, *PADDED)
    with torch.no_grad():
        plain = s.model(**enc, output_hidden_states=True)
    X_in = plain.hidden_states[LAYER]  # output of decoder layer index LAYER - 1, untouched model
    rows = torch.arange(2)[:, None]

    transform = AlignmentTransform(s.hidden_size, eps=0.5)
    tap = DistillTap(s, LAYER, transform, capture_attention=True)
    tap.set_batch(visual_index, query_mask)
    with torch.no_grad():
        logits = s.model(**enc).logits
    assert torch.equal(logits, plain.logits)  # W = 0: exactly the base model
    assert torch.equal(tap.aligned_visual, X_in[rows, visual_index])

    torch.nn.init.normal_(transform.weight, std=0.2)
    seen = {}
    handle = decoder_layers(s.model)[LAYER].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        logits = s.model(**enc).logits
    handle.remove()
    X = X_in[rows, visual_index]
    want = X + 0.5 * X @ transform.weight.T
    assert torch.allclose(tap.aligned_visual, want, atol=1e-5)
    # what the next layer receives: transformed visual rows, every other position as before
    visual = torch.zeros(2, X_in.shape[1], dtype=torch.bool)
    visual[rows, visual_index] = True
    assert torch.allclose(seen["x"][visual], want.reshape(-1, s.hidden_size), atol=1e-5)
    assert torch.equal(seen["x"][~visual], X_in[~visual])
    assert not torch.allclose(logits, plain.logits, atol=1e-3)
    # tokens before the first visual token cannot see the change (causal attention)
    first = int(visual_index.min())
    assert torch.allclose(logits[:, :first], plain.logits[:, :first], atol=1e-6)
    tap.remove()
    with torch.no_grad():
        assert torch.equal(s.model(**enc).logits, plain.logits)


def test_low_rank_alignment_transform():
    t = AlignmentTransform(16, eps=2.0, rank=4)
    x = torch.randn(3, 5, 16)
    assert torch.equal(t(x), x) and t.matrix().shape == (16, 16)
    torch.nn.init.normal_(t.B)
    assert torch.allclose(t.matrix(), t.B @ t.A)
    assert torch.allclose(t(x), x + 2.0 * x @ t.matrix().T, atol=1e-5)
    assert sum(p.numel() for p in t.parameters()) == 2 * 16 * 4
    # bf16 activations stay bf16 while W stays float32
    assert t(x.bfloat16()).dtype == torch.bfloat16 and t.A.dtype == torch.float32


@pytest.mark.parametrize("rank", [None, 3])
def test_save_load_alignment_round_trip(tmp_path, rank):
    t = AlignmentTransform(8, eps=0.7, rank=rank)
    for p in t.parameters():
        torch.nn.init.normal_(p)
    save_alignment(t, tmp_path / "alignment", layer=20)
    back = load_alignment(tmp_path / "alignment")
    assert (back.dim, back.eps, back.rank, back.layer) == (8, 0.7, rank, 20)
    x = torch.randn(2, 8)
    assert torch.equal(back(x), t(x))
    assert json.loads((tmp_path / "alignment" / "alignment_config.json").read_text())["layer"] == 20
    with pytest.raises(StudentError):
        load_alignment(tmp_path / "nothing")


# ----------------------------------------------------------------------------- gradients, checkpointing

def _losses_and_grads(tiny, checkpointing, terms=("ntp", "vis", "att")):
    """The loss (a sum of `terms` among NTP, L_vis, L_att), the captured attention, and the
    gradient of every trainable parameter (zero where the loss does not reach it)."""
    s = load_student(str(tiny))
    torch.manual_seed(1)
    apply_lora(s, r=4, alpha=8, dropout=0.0)
    for n, p in s.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # so LoRA A gets gradients too
    transform = AlignmentTransform(s.hidden_size)
    torch.nn.init.normal_(transform.weight, std=0.05)
    tap = DistillTap(s, LAYER, transform, capture_attention=True)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecated alias the trainer calls
            s.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    s.model.train()
    enc, visual_index, query_mask = make_batch(s, *PADDED)
    tap.set_batch(visual_index, query_mask)
    out = s.model(**enc)
    g = torch.Generator().manual_seed(0)
    sim_t, attn_t = torch.rand(2, 36, 36, generator=g), torch.rand(2, 36, generator=g)
    aligned, attention = tap.aligned_visual, tap.visual_attention
    parts = {"ntp": out.loss, "vis": visual_alignment_loss(aligned, sim_t),
             "att": 10 * attention_distill_loss(attention, attn_t)}
    loss = sum(parts[t] for t in terms)
    loss.backward()
    # the recomputation in backward did not replace what the losses were computed from
    assert tap.aligned_visual is aligned and tap.visual_attention is attention
    params = dict(s.model.named_parameters(), W=transform.weight)
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in params.items() if p.requires_grad}
    return loss.detach(), attention, grads


def test_gradients_identical_with_non_reentrant_checkpointing(tiny):
    loss0, _, g0 = _losses_and_grads(tiny, None)
    loss1, _, g1 = _losses_and_grads(tiny, "non-reentrant")
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-7, rtol=1e-5), name
    assert g0["W"].abs().sum() > 0
    # LoRA below the attention layer gets a gradient; above it only through the NTP loss
    assert all(g0[n].abs().sum() > 0 for n in g0 if "lora_A" in n)


def test_reentrant_checkpointing_silently_drops_the_attention_gradient(tiny):
    """The trap the trainer avoids. L_att's own gradient (loss = L_att only) is the same
    with non-reentrant checkpointing as without; reentrant checkpointing runs a layer's
    forward without autograd, so the attention captured inside it is a constant: L_att
    then has no gradient at all, and added to the loss it changes no gradient."""
    _, attention, g_plain = _losses_and_grads(tiny, None, terms=("att",))
    _, _, g_non = _losses_and_grads(tiny, "non-reentrant", terms=("att",))
    assert attention.requires_grad and g_plain["W"].abs().sum() > 0
    assert any(g.abs().sum() > 0 for n, g in g_plain.items() if "lora_A" in n)
    for name in g_plain:
        assert torch.allclose(g_non[name], g_plain[name], atol=1e-7, rtol=1e-5), name

    _, attention, g_with_att = _losses_and_grads(tiny, "reentrant", terms=("ntp", "vis", "att"))
    _, _, g_without_att = _losses_and_grads(tiny, "reentrant", terms=("ntp", "vis"))
    assert not attention.requires_grad
    for name in g_with_att:
        assert torch.equal(g_with_att[name], g_without_att[name]), name
    # (L_vis survives: transformers >= 5.24 checkpoints a layer's forward, and the transform's
    # forward hook runs outside it; the trainer uses non-reentrant checkpointing regardless.)


# ----------------------------------------------------------------------------- inference

def test_generation_with_the_transform_matches_a_full_forward(tiny):
    """The transform is part of the model at inference: KV-cached decoding (prefill
    transformed, decode steps left alone) gives the logits of a full forward."""
    s = load_student(str(tiny))
    transform = AlignmentTransform(s.hidden_size)
    torch.nn.init.normal_(transform.weight, std=0.2)
    tap = DistillTap(s, LAYER, transform, capture_attention=True)
    enc, visual_index, query_mask = make_batch(s, ["What is shown?"], [""])
    T = enc["input_ids"].shape[1]
    tap.set_batch(visual_index, query_mask)
    enc.pop("labels")
    with torch.no_grad():
        gen = s.model.generate(**enc, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=s.processor.tokenizer.pad_token_id)
    seq = gen.sequences
    n = seq.shape[1] - T
    tap.set_batch(visual_index, torch.nn.functional.pad(query_mask, (0, n)))
    with torch.no_grad():
        full = s.model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=enc["pixel_values"]).logits
    for i, step_logits in enumerate(gen.logits):
        assert torch.allclose(step_logits[0], full[0, T - 1 + i], atol=1e-4), i


# ----------------------------------------------------------------------------- adapter round trip

@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
def test_lora_adapter_reloads_with_plain_peft(tiny, tmp_path):
    from peft import PeftModel

    s = load_student(str(tiny))
    apply_lora(s, r=4, alpha=8, dropout=0.0)
    for n, p in s.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    enc, _, _ = make_batch(s, *PADDED)
    s.model.eval()
    with torch.no_grad():
        want = s.model(**enc).logits
    s.model.save_pretrained(tmp_path / "adapter")
    base = load_student(str(tiny)).model
    with torch.no_grad():
        assert not torch.allclose(base(**enc).logits, want, atol=1e-4)  # the adapter does something
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**enc).logits, want, atol=1e-6)
