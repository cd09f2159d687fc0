"""Teachers: registry, shapes, an independent recomputation of both targets, strict loading.

Everything is built from real architectures with random weights: no downloads. The
independent checks run the transformer blocks by hand and get the attention from
nn.MultiheadAttention(need_weights=True) / timm's own Attention math, not from the code
under test.
"""
import json
import warnings

import pytest
import torch
from PIL import Image

from precompute import teachers
from precompute.teachers import (RECIPE, TeacherError, TeacherSpec, get_teacher_spec, load_teacher,
                                 register_teacher, sha256_file, teacher_names)


class NotATensor:
    """Something torch.load(weights_only=True) must refuse to unpickle."""


BIOMEDCLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


@pytest.fixture(scope="module")
def tiny():
    return load_teacher("tiny", random_init=True, seed=3)


@pytest.fixture(scope="module")
def unimed_b16():
    # seed 7, not the default 0: a checkpoint load that silently kept its random init would differ.
    return load_teacher("unimed-b16", random_init=True, seed=7)


@pytest.fixture(scope="module")
def biomedclip():
    return load_teacher("biomedclip", random_init=True, seed=7)


def pixels_for(teacher, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, teacher.image_size, teacher.image_size, generator=g)


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(teachers, "_REGISTRY", dict(teachers._REGISTRY))
    monkeypatch.setattr(teachers, "_ALIASES", dict(teachers._ALIASES))


def spec(name, aliases=()):
    return TeacherSpec(name=name, family="open_clip", arch="ViT-B-16", image_size=224, patch_size=16,
                       weights="somewhere", aliases=aliases)


# --------------------------------------------------------------------------- registry


def test_registry_refuses_duplicate_names_and_aliases(isolated_registry):
    with pytest.raises(ValueError, match="unimed-b16"):
        register_teacher(spec("unimed-b16"))                       # existing name
    with pytest.raises(ValueError, match="alias of teacher 'unimed-b16'"):
        register_teacher(spec("unimed"))                           # name == existing alias
    with pytest.raises(ValueError, match="already the teacher"):
        register_teacher(spec("fresh", aliases=("tiny",)))         # alias == existing name
    with pytest.raises(ValueError, match="alias of teacher"):
        register_teacher(spec("fresh", aliases=("unimed",)))       # alias == existing alias
    with pytest.raises(ValueError, match="reserved"):
        register_teacher(spec("open_clip:ViT-B-16"))
    assert "fresh" not in teacher_names()                          # failed registrations leave no trace
    register_teacher(spec("fresh", aliases=("fresh-alias",)))
    assert get_teacher_spec("fresh-alias").name == "fresh"
    with pytest.raises(ValueError, match="fresh-alias"):
        register_teacher(spec("other", aliases=("fresh-alias",)))


def test_spec_validation():
    with pytest.raises(ValueError, match="family"):
        TeacherSpec(name="x", family="jax", arch="a", image_size=224, patch_size=16, weights="w")
    with pytest.raises(ValueError, match="multiple"):
        TeacherSpec(name="x", family="tiny", arch="a", image_size=225, patch_size=16, weights="w")
    with pytest.raises(ValueError, match="lowercase"):
        TeacherSpec(name="Has Space", family="tiny", arch="a", image_size=224, patch_size=16, weights="w")
    with pytest.raises(ValueError, match="repeat"):
        TeacherSpec(name="x", family="tiny", arch="a", image_size=224, patch_size=16, weights="w", aliases=("x",))
    s = TeacherSpec(name="x", family="tiny", arch="a", image_size=224, patch_size=16, weights="w", aliases=["y"])
    assert s.aliases == ("y",) and s.grid == 14 and s.num_patches == 196


def test_names_aliases_and_open_clip_arch():
    registered = {"unimed-b16", "unimed-l14-336", "biomedclip", "openai-b16", "openai-l14-336", "tiny"}
    assert registered <= set(teacher_names())
    assert get_teacher_spec("unimed") is get_teacher_spec("unimed-b16") is get_teacher_spec("UniMed-B16")
    b16 = get_teacher_spec("unimed")
    assert (b16.arch, b16.image_size, b16.grid, b16.num_patches) == ("ViT-B-16-quickgelu", 224, 14, 196)
    l14 = get_teacher_spec("unimed-l14-336")
    assert (l14.arch, l14.image_size, l14.grid, l14.num_patches) == ("ViT-L-14-336-quickgelu", 336, 24, 576)
    # OpenAI CLIP was trained with QuickGELU: the baseline must not silently use GELU.
    assert get_teacher_spec("openai-b16").arch.endswith("-quickgelu")
    assert get_teacher_spec("openai-l14-336").arch.endswith("-quickgelu")

    any_arch = get_teacher_spec("open_clip:ViT-L-14-336")
    assert (any_arch.name, any_arch.family, any_arch.arch) == ("open_clip:ViT-L-14-336", "open_clip", "ViT-L-14-336")
    assert (any_arch.image_size, any_arch.patch_size, any_arch.grid) == (336, 14, 24)
    assert "QuickGELU" in any_arch.weights                        # its only published weights are openai's
    assert get_teacher_spec("open_clip:ViT-B-32").grid == 7
    with pytest.raises(TeacherError, match="no architecture"):
        get_teacher_spec("open_clip:ViT-Q-99")
    with pytest.raises(TeacherError, match="ResNet"):
        get_teacher_spec("open_clip:RN50")

    with pytest.raises(ValueError) as info:
        get_teacher_spec("unimedd")
    for name in teacher_names():
        assert name in str(info.value)
    assert "open_clip:<ARCH>" in str(info.value)


# --------------------------------------------------------------------------- shapes and metadata


def check_outputs(teacher, tokens, attention, batch):
    P = teacher.grid ** 2
    assert teacher.num_patches == P
    assert tokens.shape[:2] == (batch, P) and attention.shape == (batch, P)
    assert attention.dtype == torch.float32
    assert (attention > 0).all()
    row = attention.sum(-1)
    assert (row < 1).all() and (row > 0.5).all()   # probabilities over all tokens, CLS column dropped


def test_tiny_teacher(tiny):
    tokens, attention = tiny(pixels_for(tiny))
    check_outputs(tiny, tokens, attention, 2)
    assert tiny.grid == 7 and tokens.shape[-1] == 64
    md = tiny.metadata
    assert json.loads(json.dumps(md)) == md
    assert md["tiny"] is True and md["random_init"] is True and md["seed"] == 3
    assert md["checkpoint"] is None and md["checkpoint_sha256"] is None
    assert md["recipe"] == RECIPE and md["native_grid"] == 7 and md["num_patches"] == 49
    assert md["preprocessing"]["image_size"] == 112 and len(md["preprocessing"]["mean"]) == 3
    assert set(md["versions"]) >= {"torch", "open_clip"}

    # The same seed rebuilds the same random teacher; another seed does not.
    again = load_teacher("tiny", random_init=True, seed=3)
    other = load_teacher("tiny", random_init=True, seed=4)
    x = pixels_for(tiny, batch=1)
    assert torch.equal(again(x)[0], tiny(x)[0])
    assert not torch.allclose(other(x)[0], tiny(x)[0])

    tiny.train()
    assert not tiny.training and not tiny.visual.training          # targets never see dropout
    assert all(k.startswith("visual.") for k in tiny.state_dict())  # the tower, registered once
    assert not any(p.requires_grad for p in tiny.parameters())


def test_preprocess_is_open_clip_eval_transform(tiny):
    image = Image.new("RGB", (300, 200), (128, 64, 32))             # non-square: resize + centre crop
    x = tiny.preprocess(image)
    assert x.shape == (3, 112, 112)
    expected = (torch.tensor([128, 64, 32]) / 255 - torch.tensor(tiny.mean)) / torch.tensor(tiny.std)
    torch.testing.assert_close(x[:, 56, 56], expected.float(), atol=1e-5, rtol=0)
    with pytest.raises(TeacherError, match=r"\[B, 3, 112, 112\]"):
        tiny(torch.zeros(1, 3, 224, 224))


def test_unimed_b16_random_init(unimed_b16):
    tokens, attention = unimed_b16(pixels_for(unimed_b16))
    check_outputs(unimed_b16, tokens, attention, 2)
    assert tokens.shape == (2, 196, 768)
    md = unimed_b16.metadata
    assert md["random_init"] is True and md["tiny"] is False and md["arch"] == "ViT-B-16-quickgelu"
    assert md["quick_gelu"] is True and md["aliases"] == ["unimed"]


def test_unimed_l14_336_config():
    # Building + running L/14-336 on CPU costs ~7 s (more on a busy machine): check the config
    # it would be built from instead; the code path is the B/16 one.
    tower = teachers._spec_tower(get_teacher_spec("unimed-l14-336"))
    assert tower == ("open_clip", 1024, 24, 14, 336)


# --------------------------------------------------------------------------- independent recomputation


def manual_open_clip(teacher, pixels):
    """Run open_clip's ViT by hand; attention from nn.MultiheadAttention itself."""
    v = teacher.visual
    with torch.no_grad():
        x = v.conv1(pixels).flatten(2).transpose(1, 2)                             # [B, P, D]
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        last = v.transformer.resblocks[-1]
        h = last.ln_1(x)
        _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)   # [B, N, N]
        out = last(x)
    return out[:, 1:], weights[:, 0, 1:]


@pytest.mark.parametrize("name", ["tiny", "unimed_b16"])
def test_open_clip_targets_match_manual_computation(name, request):
    teacher = request.getfixturevalue(name)
    pixels = pixels_for(teacher, batch=2 if name == "tiny" else 1, seed=1)   # B/16 on 2 CPU cores: keep it small
    tokens, attention = teacher(pixels)
    ref_tokens, ref_attention = manual_open_clip(teacher, pixels)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, ref_attention, atol=1e-6, rtol=1e-4)


def manual_timm(teacher, pixels):
    """Run timm's ViT by hand; attention with timm's Attention math over the full matrix, which
    must also reproduce the block's own output (so it is the block's real attention)."""
    trunk = teacher.visual.trunk
    with torch.no_grad():
        x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)))
        for block in trunk.blocks[:-1]:
            x = block(x)
        last, a = trunk.blocks[-1], trunk.blocks[-1].attn
        h = last.norm1(x)
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)              # [B, H, N, N]
        y = x + last.ls1(a.proj(a.norm((probs @ v).transpose(1, 2).reshape(B, N, C))))
        y = y + last.ls2(last.mlp(last.norm2(y)))
        out = last(x)
    torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-5)
    return out[:, trunk.num_prefix_tokens:], probs.mean(dim=1)[:, 0, trunk.num_prefix_tokens:]


def write_biomedclip_dir(path, teacher, config=BIOMEDCLIP_CONFIG):
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps(config))
    state = {f"visual.{k}": v.clone() for k, v in teacher.visual.state_dict().items()}
    # Text-tower and logit keys must be ignored, not loaded and not complained about.
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    state["text.proj.0.weight"] = torch.randn(8, 8)
    state["logit_scale"] = torch.tensor(4.6)
    torch.save(state, path / "open_clip_pytorch_model.bin")
    return path


def test_biomedclip_dir_loads_and_matches_timm_math(biomedclip, tmp_path):
    directory = write_biomedclip_dir(tmp_path / "BiomedCLIP", biomedclip)
    loaded = load_teacher("biomedclip", str(directory))
    pixels = pixels_for(loaded, batch=1, seed=2)
    tokens, attention = loaded(pixels)
    check_outputs(loaded, tokens, attention, 1)

    ref_tokens, ref_attention = manual_timm(loaded, pixels)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, ref_attention, atol=1e-6, rtol=1e-4)

    src_tokens, src_attention = biomedclip(pixels)                 # the weights really came from the file
    torch.testing.assert_close(tokens, src_tokens, atol=0, rtol=0)
    torch.testing.assert_close(attention, src_attention, atol=0, rtol=0)

    md = loaded.metadata
    assert md["checkpoint"] == str(directory.resolve()) and md["random_init"] is False
    assert md["checkpoint_sha256"] == sha256_file(directory / "open_clip_pytorch_model.bin")
    assert md["preprocessing"]["mean"] == BIOMEDCLIP_CONFIG["preprocess_cfg"]["mean"]


def test_biomedclip_dir_with_another_tower_is_refused(tmp_path):
    config = json.loads(json.dumps(BIOMEDCLIP_CONFIG))
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_small_patch16_224"
    directory = tmp_path / "other"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    (directory / "open_clip_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(TeacherError, match="different vision tower.*vit_small_patch16_224"):
        load_teacher("biomedclip", str(directory))


def test_dir_config_quick_gelu_mismatch_is_refused(tmp_path):
    # The one place the activation is written down: an hf-hub dir saying GELU for a QuickGELU teacher.
    import open_clip
    directory = tmp_path / "gelu"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": False}}))
    (directory / "open_clip_model.safetensors").write_bytes(b"never read")
    with pytest.raises(TeacherError, match="quick_gelu=False"):
        load_teacher("openai-b16", str(directory))


def test_unsupported_block_is_refused_by_name():
    from open_clip.transformer import VisionTransformer
    visual = VisionTransformer(image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2.0,
                               scaled_cosine_attn=True)
    tiny_spec = TeacherSpec(name="x", family="tiny", arch="a", image_size=32, patch_size=16, weights="w")
    with pytest.raises(TeacherError, match="CustomResidualAttentionBlock"):
        teachers._check_supported(visual, tiny_spec)


# --------------------------------------------------------------------------- checkpoints


def test_unimed_checkpoint_round_trip(unimed_b16, tmp_path):
    # UniMed-CLIP's own format: DDP prefix, vision + BiomedBERT text encoder, training extras.
    path = tmp_path / "unimed_clip_vit_b16.pt"
    state = {f"module.visual.{k}": v.clone() for k, v in unimed_b16.visual.state_dict().items()}
    state["module.text_encoder.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    state["module.logit_scale"] = torch.tensor(4.6)
    torch.save({"epoch": 3, "state_dict": state}, path)

    loaded = load_teacher("unimed", str(path))
    pixels = pixels_for(loaded, batch=1, seed=3)
    for got, want in zip(loaded(pixels), unimed_b16(pixels)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    md = loaded.metadata
    assert md["teacher"] == "unimed-b16" and md["random_init"] is False and md["seed"] is None
    assert md["checkpoint"] == str(path.resolve())
    assert md["checkpoint_sha256"] == sha256_file(path) and len(md["checkpoint_sha256"]) == 64


@pytest.mark.parametrize("layout", ["plain", "visual.", "module.visual.", "safetensors"])
def test_checkpoint_layouts(tiny, tmp_path, layout):
    state = {k: v.clone().contiguous() for k, v in tiny.visual.state_dict().items()}
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "tiny.safetensors"
        save_file({f"visual.{k}": v for k, v in state.items()} | {"text.w": torch.zeros(2)}, str(path))
    else:
        path = tmp_path / "tiny.pt"
        prefix = "" if layout == "plain" else layout
        torch.save({f"{prefix}{k}": v for k, v in state.items()}, path)
    loaded = load_teacher("tiny", str(path))
    x = pixels_for(tiny)
    torch.testing.assert_close(loaded(x)[0], tiny(x)[0], atol=0, rtol=0)
    assert loaded.metadata["tiny"] is True and loaded.metadata["random_init"] is False


def test_wrong_architecture_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "tiny_as_unimed.pt"
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in tiny.visual.state_dict().items()}}, path)
    with pytest.raises(TeacherError) as info:
        load_teacher("unimed-b16", str(path))
    message = str(info.value)
    assert "does not fit teacher 'unimed-b16'" in message and "nothing was loaded" in message
    assert "width 64, 2 blocks, patch 16, 112 px" in message          # what the file holds
    assert "looks like weights for: tiny" in message                  # and whose it is
    assert "Missing keys" in message and "Shape mismatches" in message

    # A text-only / unrelated file: no vision keys at all.
    other = tmp_path / "text_only.pt"
    torch.save({"state_dict": {"module.text_encoder.w": torch.zeros(3)}}, other)
    with pytest.raises(TeacherError, match="no vision-tower keys"):
        load_teacher("tiny", str(other))


def test_missing_weights_give_the_download_hint(tmp_path):
    for checkpoint in (None, str(tmp_path / "unimed_clip_vit_b16.pt")):
        with pytest.raises(TeacherError) as info:
            load_teacher("unimed", checkpoint)
        message = str(info.value)
        assert "unimed_clip_vit_b16.pt" in message and "huggingface.co/UzairK/unimed-clip-vit-b16" in message
        assert "--random-init" in message
    with pytest.raises(TeacherError, match="open_clip_pytorch_model.bin"):
        load_teacher("biomedclip")
    with pytest.raises(TeacherError, match="both a checkpoint"):
        load_teacher("tiny", str(tmp_path / "x.pt"), random_init=True)


def test_pickled_objects_are_refused(tiny, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": dict(tiny.visual.state_dict()), "args": NotATensor()}, path)
    with pytest.raises(TeacherError) as info:
        load_teacher("tiny", str(path))
    message = str(info.value)
    assert "refused" in message and "weights_only" in message and "NotATensor" in message
    assert "weights_only=False" not in message                         # never advise the unsafe way out
    assert info.value.__cause__ is None and info.value.__suppress_context__

    garbage = tmp_path / "truncated.pt"
    garbage.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(TeacherError, match="not a readable PyTorch checkpoint"):
        load_teacher("tiny", str(garbage))


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                 # torch.jit.script is deprecated
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(TeacherError, match="TorchScript"):
        load_teacher("openai-b16", str(path))


def test_sha256_streams(tmp_path):
    import hashlib
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000                                       # > 2 blocks of 1 MiB
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
