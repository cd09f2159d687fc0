"""Tiny random checkpoints in the EXACT layouts of the originals, and an independent
re-implementation of their forward, for tests/test_convert.py and the real-student tests.

Layouts reproduced (field names and state-dict keys, read at these commits):
- LLaVA-Med v1.5 (microsoft/LLaVA-Med d406e3fc; llava/model/language_model/llava_mistral.py,
  llava_arch.py, multimodal_projector/builder.py, multimodal_encoder/clip_encoder.py):
  config.json = a MistralConfig dict (saved by transformers 4.36: rope_theta, not
  rope_parameters) + model_type "llava_mistral" + LLaVA's mm_* fields; weights
  model.embed_tokens / model.layers.* / model.norm / lm_head (MistralForCausalLM names),
  model.mm_projector.{0,2}.{weight,bias} (nn.Sequential(Linear, GELU, Linear)), and a copy
  of a CLIP tower under model.vision_tower.vision_tower.vision_model.*, in safetensors
  shards with model.safetensors.index.json; the tokenizer as tokenizer.model (Mistral's
  SentencePiece model, here the real one from the mistral-common wheel) + tokenizer_config.json.
- HuatuoGPT-Vision-7B (FreedomIntelligence/HuatuoGPT-Vision a6476acb; llava/model/
  language_model/llava_qwen2.py, cli.py): a Qwen2Config dict + model_type "llava_qwen2",
  the same LLaVA key layout with Qwen2's q/k/v biases, a padded vocabulary (Qwen2's
  embedding has more rows than its tokenizer), a tokenizer.json (Qwen2Tokenizer).
- openai/clip-vit-large-patch14-336 as the hub lays it out: a full CLIPModel (text and
  vision) in pytorch_model.bin, and the old-style preprocessor_config.json
  ("size": 336, "crop_size": 336, "feature_extractor_type": "CLIPFeatureExtractor").

Everything is tiny (a 56 px CLIP with 14 px patches -> a 4 x 4 grid) and random.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE, PATCH = 56, 14


def mistral_sentencepiece() -> Path:
    """Mistral-7B's SentencePiece model (32000 pieces, LLaVA-Med's tokenizer), shipped in mistral-common."""
    spec = importlib.util.find_spec("mistral_common")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    assert path.is_file(), path
    return path


# ----------------------------------------------------------------------------- CLIP folder
# The tiny CLIP vision tower every fixture writes, and the reference forward rebuilds.
TOWER = dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=2)


def write_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(TOWER),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.config.save_pretrained(folder)
    # The hub repo's pytorch_model.bin: CLIPModel's keys, with the position_ids buffers
    # that 2022-era checkpoints carry.
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE_SIZE // PATCH) ** 2 + 1)[None]
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": IMAGE_SIZE}, indent=2))
    return folder


def _tower_state(seed: int) -> dict:
    """A CLIP vision tower's state dict (vision_model.* keys), other random weights than write_clip's."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = CLIPVisionModel(CLIPVisionConfig(**TOWER))
    # the 4.x layout the originals were saved with: vision_model.* (5.x drops the prefix in memory)
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in tower.state_dict().items()}


# ----------------------------------------------------------------------------- LLaVA checkpoints

_LLAVA_MM = {  # the fields LLaVA's training writes into config.json
    "mm_hidden_size": 32, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
    "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
}


def _save_shards(folder: Path, state: dict, n: int = 2) -> None:
    from safetensors.torch import save_file

    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::n]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _llava_state(lm, hidden: int, seed: int) -> dict:
    """LLaVA's keys: the causal LM's own + model.mm_projector.{0,2} + the tower copy."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in lm.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    state["model.mm_projector.0.weight"] = torch.randn(hidden, 32, generator=g) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(hidden, generator=g) * 0.2
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden, generator=g) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(hidden, generator=g) * 0.2
    for k, v in _tower_state(seed + 1).items():
        state["model.vision_tower.vision_tower." + k] = v
    return state


def write_llava_med(folder: Path, seed: int = 0, dtype=torch.float16, **overrides) -> Path:
    """A tiny microsoft/llava-med-v1.5-mistral-7b."""
    from transformers import MistralConfig, MistralForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    text = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                initializer_range=0.1, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_dropout=0.0, use_cache=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = MistralForCausalLM(MistralConfig(**text))
    config = {"_name_or_path": "llava-med-v1.5-mistral-7b", "architectures": ["LlavaMistralForCausalLM"],
              "model_type": "llava_mistral", **text, **_LLAVA_MM, "torch_dtype": str(dtype).split(".")[-1],
              "transformers_version": "4.36.2", **overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _save_shards(folder, {k: v.to(dtype) for k, v in _llava_state(lm, 32, seed).items()})
    write_llava_med_tokenizer(folder)
    return folder


def write_llava_med_tokenizer(folder: Path) -> Path:
    """LLaVA-Med v1.5's tokenizer files: Mistral's SentencePiece model + the slow LlamaTokenizer config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(mistral_sentencepiece().read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "legacy": False, "model_max_length": 2048,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2))
    return folder


def qwen_tokenizer():
    """A tiny byte-level BPE tokenizer shaped like Qwen2's (no BOS, <|endoftext|> as EOS and pad)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def write_huatuo(folder: Path, seed: int = 0, dtype=torch.bfloat16, **overrides) -> Path:
    """A tiny FreedomIntelligence/HuatuoGPT-Vision-7B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer()
    tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    text = dict(vocab_size=len(tokenizer) + 9, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                initializer_range=0.1, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
                sliding_window=131072, max_window_layers=3, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = Qwen2ForCausalLM(Qwen2Config(**text))
    config = {"_name_or_path": "HuatuoGPT-Vision-7B", "architectures": ["LlavaQwen2ForCausalLM"],
              "model_type": "llava_qwen2", **text, **_LLAVA_MM, "torch_dtype": str(dtype).split(".")[-1],
              "transformers_version": "4.40.0", **overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _save_shards(folder, {k: v.to(dtype) for k, v in _llava_state(lm, 32, seed).items()})
    return folder


# ----------------------------------------------------------------------------- the original forward

def expand2square_reference(img: Image.Image, mean) -> Image.Image:
    """MedAlign llava-med-1.5/llava/train/train.py's expand2square (the deterministic one)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(x * 255) for x in mean))
    out.paste(img, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
    return out


def clip_pixels_reference(img: Image.Image, pad: bool) -> torch.Tensor:
    """CLIPImageProcessor as LLaVA ran it (PIL): shortest edge -> IMAGE_SIZE (bicubic), centre crop,
    /255, (x - mean) / std. -> [3, S, S] float32."""
    img = img.convert("RGB")
    if pad:
        img = expand2square_reference(img, CLIP_MEAN)
    w, h = img.size
    scale = IMAGE_SIZE / min(w, h)
    size = (IMAGE_SIZE, int(h * scale)) if w <= h else (int(w * scale), IMAGE_SIZE)
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.size[0] - IMAGE_SIZE) // 2, (img.size[1] - IMAGE_SIZE) // 2
    img = img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        state.update(load_file(str(f)))
    return state


def original_logits(source: Path, tower_state: dict, pixels: torch.Tensor, chunks: list[list[int]]) -> torch.Tensor:
    """The LLaVA forward written out: CLIP hidden_states[select_layer] without CLS -> Linear-GELU-Linear
    -> spliced between the token chunks' embeddings -> the causal LM. All float32. -> [T, V]."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((source / "config.json").read_text())
    state = {k: v.float() for k, v in _load(source).items()}
    text_type = {"llava_mistral": "mistral", "llava_qwen2": "qwen2", "llava_llama": "llama"}[cfg["model_type"]]
    fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in (
        "_name_or_path", "architectures", "model_type", "image_aspect_ratio", "tokenizer_model_max_length",
        "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "torch_dtype",
        "transformers_version")}
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text_type, **fields), dtype=torch.float32)
    lm.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.embed", "model.layers", "model.norm",
                                                                         "lm_head"))}, strict=True)
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER))
    # transformers 4.x names the tower's weights vision_model.*, 5.x without the prefix
    strip = not any(k.startswith("vision_model.") for k in tower.state_dict())
    tower.load_state_dict({(k[len("vision_model."):] if strip else k): v.float()
                           for k, v in tower_state.items() if not k.endswith("position_ids")})
    lm.eval(), tower.eval()
    with torch.no_grad():
        feats = tower(pixels[None], output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][0, 1:]
        feats = F.linear(F.gelu(F.linear(feats, state["model.mm_projector.0.weight"],
                                         state["model.mm_projector.0.bias"])),
                         state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
        embed = lm.get_input_embeddings()
        parts = []
        for i, chunk in enumerate(chunks):
            if i:
                parts.append(feats)
            parts.append(embed(torch.tensor(chunk, dtype=torch.long)))
        return lm(inputs_embeds=torch.cat(parts)[None]).logits[0]


def checkpoint_tower(source: Path) -> dict:
    prefix = "model.vision_tower.vision_tower."
    return {k[len(prefix):]: v for k, v in _load(source).items() if k.startswith(prefix)}


def clip_folder_tower(folder: Path) -> dict:
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith("vision_model.")}
