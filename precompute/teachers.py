"""Teachers: expert CLIP vision towers that turn pixels into MedAlign's raw targets.

    pixels [B, 3, H, W] -> (patch tokens [B, P, D], CLS attention [B, P])   at the native grid

Both come from the teacher's LAST transformer block:
- tokens: the block's output (before ln_post / the final norm), CLS and any other prefix
  tokens dropped, not normalised (targets.py normalises and builds the similarity matrix);
- CLS attention: the block's softmax attention probabilities, averaged over heads, the CLS
  query row, with the CLS (prefix) key columns dropped, so a row sums to < 1.

The token path is the model's own `forward_intermediates` (open_clip and timm), asked for
the outputs of the last two blocks: the second-to-last output is the last block's input,
from which we recompute the last block's attention probabilities with that block's own
parameters. Only the CLS query is needed, so q is computed for one token and k for all:
the extra cost is one [N, D] x [D, D] matmul per image. No hooks, no patched modules.

Loading is strict on purpose. A silently partial load (wrong prefix, wrong architecture,
GELU vs QuickGELU) would still produce targets, just wrong ones, and nothing downstream
could tell. So only the vision tower is built, the checkpoint's vision keys are loaded with
strict=True after a key-by-key comparison that explains any mismatch, files are read with
weights_only=True (never unpickled), and the weights' sha256 goes into the metadata.

open_clip (and timm) are imported lazily: the CLI lists teacher names without paying for
them, and `distill` never imports this module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from .targets import RECIPE

FAMILIES = ("open_clip", "biomedclip", "tiny")


class TeacherError(ValueError):
    """A user-facing problem with a teacher: unknown name, missing or unusable weights."""


# -----------------------------------------------------------------------------
# Specs and the registry

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
OPEN_CLIP_PREFIX = "open_clip:"


@dataclass(frozen=True)
class TeacherSpec:
    name: str                    # canonical, e.g. "unimed-b16"; also the cache group name by default
    family: str                  # "open_clip" | "biomedclip" | "tiny": how the tower is built
    arch: str                    # open_clip model name (or our local config name for tiny/biomedclip)
    image_size: int
    patch_size: int
    weights: str                 # what to download and from where: shown whenever weights are missing
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        # Accept a list for aliases but store a tuple: the spec is frozen and hashable.
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if not (_NAME_RE.match(self.name) or self.name.startswith(OPEN_CLIP_PREFIX)):
            raise ValueError(f"teacher name {self.name!r}: use lowercase letters, digits, '.', '_', '-'")
        for alias in self.aliases:
            if not isinstance(alias, str) or not _NAME_RE.match(alias):
                raise ValueError(f"teacher {self.name!r}: alias {alias!r} must be lowercase letters, digits, "
                                 f"'.', '_', '-'")
        if self.name in self.aliases or len(set(self.aliases)) != len(self.aliases):
            raise ValueError(f"teacher {self.name!r}: aliases {self.aliases} repeat a name")
        if self.family not in FAMILIES:
            raise ValueError(f"teacher {self.name!r}: family {self.family!r} is not one of {FAMILIES}")
        if not self.arch:
            raise ValueError(f"teacher {self.name!r}: arch is empty")
        for field_name in ("image_size", "patch_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"teacher {self.name!r}: {field_name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"teacher {self.name!r}: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if not self.weights.strip():
            raise ValueError(f"teacher {self.name!r}: say which weights to download (weights=...)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


_REGISTRY: dict[str, TeacherSpec] = {}
_ALIASES: dict[str, str] = {}  # alias -> canonical name


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    """Add a teacher. Every name and alias is unique across both: a clash is an error,
    never a silent override (two caches built 'with unimed' must mean the same weights)."""
    if not isinstance(spec, TeacherSpec):
        raise TypeError(f"register_teacher expects a TeacherSpec, got {type(spec).__name__}")
    if spec.name.startswith(OPEN_CLIP_PREFIX):
        raise ValueError(f"{spec.name!r}: names starting with {OPEN_CLIP_PREFIX!r} are reserved for "
                         f"ad-hoc open_clip architectures")
    for label in (spec.name, *spec.aliases):
        if label in _REGISTRY:
            raise ValueError(f"cannot register teacher {spec.name!r}: {label!r} is already the teacher "
                             f"{_REGISTRY[label]!r}")
        if label in _ALIASES:
            raise ValueError(f"cannot register teacher {spec.name!r}: {label!r} is already an alias of "
                             f"teacher {_ALIASES[label]!r}")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def teacher_names() -> list[str]:
    """Canonical names, in registration order (aliases not included)."""
    return list(_REGISTRY)


def get_teacher_spec(name: str) -> TeacherSpec:
    """A registered name or alias (case-insensitive), or 'open_clip:<ARCH>' for any open_clip ViT config."""
    if isinstance(name, TeacherSpec):
        return name
    key = str(name).strip()
    if key.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_arch_spec(key[len(OPEN_CLIP_PREFIX):])
    key = key.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _ALIASES:
        return _REGISTRY[_ALIASES[key]]
    known = ", ".join(f"{n} (alias {', '.join(s.aliases)})" if s.aliases else n for n, s in _REGISTRY.items())
    raise TeacherError(f"unknown teacher {name!r}. Known teachers: {known}; or open_clip:<ARCH> for any "
                       f"open_clip ViT architecture (e.g. open_clip:ViT-B-16-quickgelu).")


# -----------------------------------------------------------------------------
# Model configs. The registered open_clip teachers use open_clip's own configs; these two
# are ours: tiny (tests and demos) and BiomedCLIP's vision tower, so a random-init
# biomedclip never needs its hub config (the real one is read from the weights directory).

TINY_ARCH = "medalign-tiny-vit"
BIOMEDCLIP_ARCH = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

_LOCAL_CONFIGS: dict[str, dict] = {
    TINY_ARCH: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 112, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    },
    # microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/open_clip_config.json
    BIOMEDCLIP_ARCH: {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    },
}

# timm trunks whose shapes we know without building them (for "this file looks like..." hints).
_TIMM_TOWERS = {"vit_base_patch16_224": (768, 12, 16, 224)}


def _open_clip():
    import open_clip  # noqa: PLC0415  (lazy: ~2 s of imports the CLI's --help does not need)
    return open_clip


def _arch_config(arch: str) -> dict:
    """{'model_cfg': ..., 'preprocess_cfg': ...} for a local or open_clip architecture name."""
    if arch in _LOCAL_CONFIGS:
        cfg = copy.deepcopy(_LOCAL_CONFIGS[arch])
        return cfg if "model_cfg" in cfg else {"model_cfg": cfg, "preprocess_cfg": {}}
    model_cfg = _open_clip().get_model_config(arch)
    if model_cfg is None:
        raise TeacherError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    return {"model_cfg": model_cfg, "preprocess_cfg": model_cfg.pop("preprocess_cfg", {}) or {}}


def _open_clip_arch_spec(arch: str) -> TeacherSpec:
    """Any open_clip ViT config as an unregistered teacher, sized from the config itself."""
    open_clip = _open_clip()
    arch = arch.replace("/", "-")  # open_clip's own convention: "ViT-B/16" means "ViT-B-16"
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower().replace("/", "-") in m.lower()][:12]
        raise TeacherError(f"open_clip has no architecture {arch!r}"
                           + (f"; similar: {', '.join(close)}" if close else "; see open_clip.list_models()"))
    vision = _vision_cfg(_arch_config(arch)["model_cfg"])
    if vision.timm_model_name or isinstance(vision.layers, (list, tuple)):
        raise TeacherError(f"open_clip:{arch} has a {'timm' if vision.timm_model_name else 'ResNet'} vision tower; "
                           f"open_clip:<ARCH> supports open_clip's own ViT towers. Register a TeacherSpec for it.")
    image_size, patch_size = _square(vision.image_size, arch), _square(vision.patch_size, arch)

    # QuickGELU vs GELU is invisible in the weights: a GELU arch loads QuickGELU weights
    # without any error and gives subtly wrong features. open_clip knows which published
    # weights were trained with QuickGELU, so say so where the user reads what to download.
    tags = open_clip.list_pretrained_tags_by_model(arch)
    published = []
    for tag in tags:
        hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
        published.append(f"{tag} (https://huggingface.co/{hub.rstrip('/')})" if hub else tag)
    quick = [t for t in tags if open_clip.get_pretrained_cfg(arch, t).get("quick_gelu")]
    needs_quick = [t for t in quick if not _arch_config(arch)["model_cfg"].get("quick_gelu")]
    weights = (f"an open_clip checkpoint for {arch}: a file with 'visual.*' keys (.safetensors, or .bin/.pt "
               f"loadable with weights_only) or an hf-hub directory with open_clip_config.json"
               + (f"; published: {', '.join(published)}" if published else ""))
    if needs_quick:
        weights += (f". NOTE: {', '.join(needs_quick)} were trained with QuickGELU: use "
                    f"open_clip:{arch}-quickgelu for them (weights cannot tell GELU from QuickGELU)")
    return TeacherSpec(name=f"{OPEN_CLIP_PREFIX}{arch}", family="open_clip", arch=arch,
                       image_size=image_size, patch_size=patch_size, weights=weights)


def _vision_cfg(model_cfg: dict):
    from open_clip.model import CLIPVisionCfg  # noqa: PLC0415
    return CLIPVisionCfg(**model_cfg["vision_cfg"])


def _square(size, arch: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise TeacherError(f"{arch}: non-square size {size} is not supported (targets assume a g x g grid)")
        size = size[0]
    return int(size)


# -----------------------------------------------------------------------------
# The registered teachers. QuickGELU cannot be detected from weights (same parameters,
# different activation), so each spec pins the activation through its arch: UniMed-CLIP
# and OpenAI CLIP were both trained with QuickGELU, hence the '-quickgelu' configs (open_clip
# itself marks its 'openai' weights quick_gelu=True). For open_clip:<ARCH>, the arch string,
# recorded in the metadata, is the only record of the choice.

register_teacher(TeacherSpec(
    name="unimed-b16", family="open_clip", arch="ViT-B-16-quickgelu", image_size=224, patch_size=16,
    weights="UniMed-CLIP ViT-B/16: unimed_clip_vit_b16.pt from https://huggingface.co/UzairK/unimed-clip-vit-b16 "
            "(code: https://github.com/mbzuai-oryx/UniMed-CLIP)",
    aliases=("unimed",)))
register_teacher(TeacherSpec(
    name="unimed-l14-336", family="open_clip", arch="ViT-L-14-336-quickgelu", image_size=336, patch_size=14,
    weights="UniMed-CLIP ViT-L/14-336: unimed_clip_vit_l14_base_text_encoder.pt from "
            "https://huggingface.co/UzairK/unimed_clip_vit_l14_base_text_encoder "
            "(code: https://github.com/mbzuai-oryx/UniMed-CLIP)"))
register_teacher(TeacherSpec(
    name="biomedclip", family="biomedclip", arch=BIOMEDCLIP_ARCH, image_size=224, patch_size=16,
    weights="BiomedCLIP: the directory holding open_clip_config.json and open_clip_pytorch_model.bin from "
            "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
            "(pass the directory)"))
register_teacher(TeacherSpec(
    name="openai-b16", family="open_clip", arch="ViT-B-16-quickgelu", image_size=224, patch_size=16,
    weights="OpenAI CLIP ViT-B/16: open_clip_model.safetensors (or the whole directory) from "
            "https://huggingface.co/timm/vit_base_patch16_clip_224.openai. The original OpenAI JIT archive "
            "(ViT-B-16.pt) is TorchScript and is not loaded; convert it to a state dict first"))
register_teacher(TeacherSpec(
    name="openai-l14-336", family="open_clip", arch="ViT-L-14-336-quickgelu", image_size=336, patch_size=14,
    weights="OpenAI CLIP ViT-L/14@336px: open_clip_model.safetensors (or the whole directory) from "
            "https://huggingface.co/timm/vit_large_patch14_clip_336.openai. The original OpenAI JIT archive "
            "(ViT-L-14-336px.pt) is TorchScript and is not loaded; convert it to a state dict first"))
register_teacher(TeacherSpec(
    name="tiny", family="tiny", arch=TINY_ARCH, image_size=112, patch_size=16,
    weights="nothing: 'tiny' is a test/demo teacher (width 64, 2 blocks, 7x7 grid); use --random-init, or a "
            "state dict saved from a tiny teacher's vision tower"))


# -----------------------------------------------------------------------------
# The teacher module


class Teacher(torch.nn.Module):
    """A frozen vision tower plus the recipe that reads MedAlign's targets off its last block."""

    def __init__(self, spec: TeacherSpec, visual: torch.nn.Module, preprocess_cfg: dict, metadata: dict):
        super().__init__()
        self.spec = spec
        self.visual = visual
        # Plain values, not module references: a second reference to the blocks would register
        # them twice (state_dict, .to()); the last block is looked up through self.visual.
        self._kind, self._num_blocks = _check_supported(visual, spec)
        self.grid = spec.grid
        self.num_patches = spec.num_patches
        self.image_size = spec.image_size
        self.mean = tuple(float(m) for m in preprocess_cfg["mean"])
        self.std = tuple(float(s) for s in preprocess_cfg["std"])
        from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: PLC0415
        # open_clip's own eval transform (resize shortest side, centre crop, RGB, normalise): the
        # preprocessing the teacher was trained and evaluated with. A torchvision Compose: picklable
        # for DataLoader workers.
        self.preprocess: Callable = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        self.metadata = metadata
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # Always eval: dropout / patch dropout would make targets random. A stray .train() must not.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise TeacherError(f"teacher {self.spec.name!r} takes pixels [B, 3, {S}, {S}] (its own preprocess); "
                               f"got {list(pixels.shape)}")
        weight = next(self.visual.parameters())
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        last = self._num_blocks - 1
        out = self.visual.forward_intermediates(
            pixels, indices=[last - 1, last], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        # Outputs of blocks last-1 and last, each split into prefix (CLS, registers) and patch tokens.
        (prefix_in, _), (patches_in, patches_out) = out["image_intermediates_prefix"], out["image_intermediates"]
        if patches_out.shape[1] != self.num_patches:
            raise TeacherError(f"teacher {self.spec.name!r}: expected {self.num_patches} patch tokens, "
                               f"the model produced {patches_out.shape[1]}")
        block_input = torch.cat([prefix_in, patches_in], dim=1)
        attention = self._cls_attention(block_input)[:, prefix_in.shape[1]:]
        return patches_out.contiguous(), attention.float().contiguous()

    def _cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's softmax attention for the CLS query (token 0), head-averaged: [B, N]."""
        if self._kind == "open_clip":   # ResidualAttentionBlock: ln_1 -> nn.MultiheadAttention
            block = self.visual.transformer.resblocks[-1]
            h = block.ln_1(x)
            weight, bias, heads = block.attn.in_proj_weight, block.attn.in_proj_bias, block.attn.num_heads
        else:                           # timm Block: norm1 -> Attention(qkv, q_norm, k_norm, scale)
            block = self.visual.trunk.blocks[-1]
            h = block.norm1(x)
            weight, bias, heads = block.attn.qkv.weight, block.attn.qkv.bias, block.attn.num_heads
        B, N, _ = h.shape
        inner = weight.shape[0] // 3        # q, k, v are stacked along the output dim, in that order
        head_dim = inner // heads
        q_bias = None if bias is None else bias[:inner]
        k_bias = None if bias is None else bias[inner:2 * inner]
        q = F.linear(h[:, 0], weight[:inner], q_bias).view(B, heads, head_dim)
        k = F.linear(h, weight[inner:2 * inner], k_bias).view(B, N, heads, head_dim)
        if self._kind == "open_clip":
            scale = head_dim ** -0.5       # what nn.MultiheadAttention uses
        else:
            q, k = block.attn.q_norm(q), block.attn.k_norm(k)   # LayerNorm(head_dim) or Identity
            scale = block.attn.scale
        logits = torch.einsum("bhd,bnhd->bhn", q.float(), k.float()) * scale
        return logits.softmax(dim=-1).mean(dim=1)


def _check_supported(visual: torch.nn.Module, spec: TeacherSpec) -> tuple[str, int]:
    """Refuse, at load time and by name, any tower whose last block we cannot read exactly."""
    from open_clip.timm_model import TimmModel  # noqa: PLC0415
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer  # noqa: PLC0415
    what = f"teacher {spec.name!r} ({spec.arch})"
    if isinstance(visual, VisionTransformer):
        kind, blocks, grid = "open_clip", visual.transformer.resblocks, tuple(visual.grid_size)
        last = blocks[-1]
        if type(last) is not ResidualAttentionBlock:
            raise TeacherError(f"{what}: its blocks are {type(last).__name__} (qk-norm / scaled-cosine / "
                               f"sub-LN attention); only the standard ResidualAttentionBlock is supported")
        mha = last.attn
        if (not isinstance(mha, torch.nn.MultiheadAttention) or not mha._qkv_same_embed_dim
                or mha.bias_k is not None or mha.add_zero_attn or hasattr(last, "ln_1_kv")):
            raise TeacherError(f"{what}: the last block's attention is not a plain self-attention "
                               f"nn.MultiheadAttention; its CLS attention cannot be recomputed exactly")
    elif isinstance(visual, TimmModel):
        import timm  # noqa: PLC0415
        from timm.layers import Attention  # noqa: PLC0415
        from timm.models.vision_transformer import Block  # noqa: PLC0415
        trunk = visual.trunk
        if not isinstance(trunk, timm.models.vision_transformer.VisionTransformer):
            raise TeacherError(f"{what}: timm trunk {type(trunk).__name__} is not a ViT; "
                               f"no patch tokens / CLS attention")
        if trunk.cls_token is None:
            raise TeacherError(f"{what}: this ViT has no CLS token, so there is no CLS attention row")
        kind, blocks, grid = "timm", trunk.blocks, tuple(trunk.patch_embed.grid_size)
        last = blocks[-1]
        if type(last) is not Block or type(last.attn) is not Attention:
            raise TeacherError(f"{what}: last block is {type(last).__name__} with {type(last.attn).__name__}; only "
                               f"timm's standard Block + Attention are supported")
    else:
        raise TeacherError(f"{what}: vision tower {type(visual).__name__} is not a ViT (ResNet CLIPs have no "
                           f"patch-token CLS attention); not supported")
    if len(blocks) < 2:
        raise TeacherError(f"{what}: needs at least 2 transformer blocks (the last block's input is read as the "
                           f"previous block's output)")
    if grid != (spec.grid, spec.grid):
        raise TeacherError(f"{what}: the model's patch grid is {grid}, the spec says {spec.grid}x{spec.grid} "
                           f"({spec.image_size} px / patch {spec.patch_size})")
    return kind, len(blocks)


# -----------------------------------------------------------------------------
# Loading


def load_teacher(name: str, checkpoint: str | None = None, *, random_init: bool = False,
                 device: str | torch.device = "cpu", seed: int = 0) -> Teacher:
    """Build a teacher's vision tower and load its weights (strictly) from a LOCAL path.

    checkpoint: a weights file (.safetensors, or .pt/.bin/.pth read with weights_only) or an
    open_clip hf-hub directory (open_clip_config.json + weights; required layout for biomedclip).
    random_init: build with random weights from `seed` instead (tests / dry runs; targets meaningless).
    """
    spec = get_teacher_spec(name)
    if random_init and checkpoint is not None:
        raise TeacherError(f"teacher {spec.name!r}: got both a checkpoint ({checkpoint}) and random_init; "
                           f"pass one (random_init builds random weights and would ignore the file)")
    if not random_init and checkpoint is None:
        raise TeacherError(_weights_hint(spec, f"teacher {spec.name!r} needs a checkpoint (none given)."))

    weights_file = dir_config = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise TeacherError(_weights_hint(spec, f"teacher {spec.name!r}: checkpoint {path} does not exist."))
        weights_file, dir_config = _locate_weights(path, spec)

    cfg = _arch_config(spec.arch)
    if dir_config is not None:
        _check_dir_config(dir_config, cfg["model_cfg"], spec, path)
        cfg["preprocess_cfg"] = {**cfg["preprocess_cfg"], **(dir_config.get("preprocess_cfg") or {})}
    model_cfg = cfg["model_cfg"]
    model_cfg["vision_cfg"]["timm_model_pretrained"] = False  # never fetch ImageNet weights from the hub

    from open_clip.model import _build_vision_tower  # noqa: PLC0415  (vision only: no text tower, no hub)
    with torch.random.fork_rng(devices=[]):          # seeded random init without disturbing the caller's RNG
        torch.manual_seed(seed)
        visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                     quick_gelu=bool(model_cfg.get("quick_gelu", False)))

    sha256 = None
    if weights_file is not None:
        sha256 = sha256_file(weights_file)
        state = _vision_state_dict(_read_checkpoint(weights_file), weights_file)
        _load_strict(visual, state, spec, weights_file)

    open_clip = _open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict  # noqa: PLC0415
    preprocess = merge_preprocess_dict(PreprocessCfg(), cfg["preprocess_cfg"])
    preprocess["size"] = spec.image_size
    metadata = {
        "teacher": spec.name,
        "aliases": list(spec.aliases),
        "family": spec.family,
        "arch": spec.arch,
        "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
        "checkpoint": str(path.resolve()) if checkpoint is not None else None,
        "checkpoint_file": weights_file.name if weights_file is not None else None,
        "checkpoint_sha256": sha256,
        "random_init": bool(random_init),
        "seed": int(seed) if random_init else None,
        "tiny": spec.family == "tiny",
        "preprocessing": {
            "image_size": spec.image_size,
            "mean": [float(m) for m in preprocess["mean"]],
            "std": [float(s) for s in preprocess["std"]],
            "resize_mode": preprocess["resize_mode"],
            "interpolation": preprocess["interpolation"],
        },
        "native_grid": spec.grid,
        "num_patches": spec.num_patches,
        "recipe": RECIPE,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "timm": _timm_version()},
    }
    teacher = Teacher(spec, visual, preprocess, metadata)
    return teacher.to(device)


def _timm_version() -> str | None:
    try:
        import timm  # noqa: PLC0415
        return timm.__version__
    except ImportError:
        return None


def _weights_hint(spec: TeacherSpec, problem: str) -> str:
    return (f"{problem}\nDownload: {spec.weights}.\nPass the local path as the checkpoint (--checkpoint). "
            f"For tests and dry runs only, --random-init builds the same architecture with random weights "
            f"(its targets are meaningless).")


# Same preference as open_clip's hf-hub loader: safetensors first (no pickle at all).
_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _locate_weights(path: Path, spec: TeacherSpec) -> tuple[Path, dict | None]:
    """(weights file, the directory's open_clip_config.json or None)."""
    if path.is_file():
        if spec.family == "biomedclip" and path.name == "open_clip_config.json":
            path = path.parent
        else:
            return path, None
    config = None
    config_file = path / "open_clip_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TeacherError(f"{config_file}: not readable JSON ({e})") from None
        if not isinstance(config, dict) or "model_cfg" not in config:
            raise TeacherError(f"{config_file}: no 'model_cfg'; is this an open_clip hf-hub directory?")
    for fname in _DIR_WEIGHTS:
        if (path / fname).is_file():
            return path / fname, config
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0], config
    listing = ", ".join(p.name for p in found) or "no weight files"
    raise TeacherError(_weights_hint(spec, f"teacher {spec.name!r}: cannot tell which file in {path} holds the "
                                           f"weights ({listing}); pass the file itself."))


# Vision-config fields that change the built tower; others (dropout, pretrained flags) do not.
_IGNORED_VISION_FIELDS = {"patch_dropout", "timm_model_pretrained", "timm_drop", "timm_drop_path", "output_tokens"}


def _check_dir_config(dir_config: dict, model_cfg: dict, spec: TeacherSpec, path: Path):
    """A directory's own config must describe the spec's tower: we build the spec, not the directory."""
    theirs = dir_config["model_cfg"]
    try:
        a = {k: v for k, v in asdict(_vision_cfg(theirs)).items() if k not in _IGNORED_VISION_FIELDS}
    except (KeyError, TypeError) as e:
        raise TeacherError(f"{path}/open_clip_config.json: unusable model_cfg.vision_cfg ({e})") from None
    b = {k: v for k, v in asdict(_vision_cfg(model_cfg)).items() if k not in _IGNORED_VISION_FIELDS}
    diffs = [f"{k}: directory {a[k]!r} vs teacher {b[k]!r}" for k in a if _norm(a[k]) != _norm(b[k])]
    if theirs.get("embed_dim") != model_cfg.get("embed_dim"):
        diffs.append(f"embed_dim: directory {theirs.get('embed_dim')!r} vs teacher {model_cfg.get('embed_dim')!r}")
    if diffs:
        raise TeacherError(f"{path}/open_clip_config.json describes a different vision tower than teacher "
                           f"{spec.name!r} ({spec.arch}): {'; '.join(diffs)}")
    # The one place GELU vs QuickGELU is written down: believe it over a silent mismatch.
    if "quick_gelu" in theirs and spec.family != "biomedclip" \
            and bool(theirs["quick_gelu"]) != bool(model_cfg.get("quick_gelu", False)):
        raise TeacherError(f"{path}/open_clip_config.json says quick_gelu={bool(theirs['quick_gelu'])}, but teacher "
                           f"{spec.name!r} uses {spec.arch} (quick_gelu={bool(model_cfg.get('quick_gelu', False))}). "
                           f"Use the matching architecture (e.g. open_clip:<ARCH>-quickgelu); weights alone cannot "
                           f"tell the activations apart.")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Streaming sha256 (1 MiB blocks): checkpoints are GBs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _read_checkpoint(file: Path) -> Any:
    """Tensors only: safetensors, or torch.load(weights_only=True). Never unpickles code."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415
        try:
            return load_file(str(file), device="cpu")
        except Exception as e:  # noqa: BLE001  (any failure here means: not a usable safetensors file)
            raise TeacherError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own TorchScript/pickle warnings; we explain below
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; that is exactly what we refuse to do,
        # so only the one line that names the problem is passed on.
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if "Unsupported global" in line), None)
        if detail is None:  # not a forbidden object: a damaged or foreign file
            after = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            reason = after[0] if after and "WeightsUnpickler error:" in str(e) else "unreadable pickle stream"
            raise TeacherError(f"{file}: not a readable PyTorch checkpoint ({reason}); is the download complete?") \
                from None
        raise TeacherError(
            f"{file}: refused to load: it contains pickled Python objects, not only tensors ({detail}). "
            f"MedAlign reads checkpoints with torch.load(weights_only=True) and never unpickles arbitrary "
            f"objects, which could run code. On a machine where you trust the file, re-save just the tensors: "
            f"torch.save(state_dict, 'weights.pt') or safetensors.torch.save_file(state_dict, 'weights.safetensors')."
        ) from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise TeacherError(
                f"{file}: this is a TorchScript (JIT) archive, like OpenAI's original CLIP .pt files. Loading it "
                f"would run its serialized code, so it is not loaded. Use open_clip's hf-hub copy instead "
                f"(e.g. https://huggingface.co/timm/vit_base_patch16_clip_224.openai, open_clip_model.safetensors), "
                f"or convert once where you trust the file: "
                f"torch.save(torch.jit.load('{file.name}', map_location='cpu').state_dict(), 'weights.pt')"
            ) from None
        raise TeacherError(f"{file}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001  (truncated download, not a zip, ...: say which file)
        first = str(e).splitlines()[0] if str(e) else ""
        raise TeacherError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {first}); "
                           f"is the download complete?") from None


def _vision_state_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """Unwrap training checkpoints and keep the vision tower's keys, prefix stripped.

    Accepted: {'state_dict': ...} (UniMed-CLIP, open_clip training), DDP 'module.' prefixes,
    whole-CLIP state dicts ('visual.*', others ignored), or a bare vision-tower state dict.
    """
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise TeacherError(f"{file}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TeacherError(f"{file}: vision entries that are not tensors: {', '.join(bad[:5])}")
    return state


def _load_strict(visual: torch.nn.Module, state: dict[str, torch.Tensor], spec: TeacherSpec, file: Path):
    expected = visual.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise TeacherError(_mismatch_message(spec, file, state, missing, unexpected, mismatched, expected))
    # NaN/inf weights load fine and poison every target; a truncated or bad conversion shows up here.
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise TeacherError(f"{file}: non-finite values in {', '.join(broken[:5])}; the file is corrupt")
    visual.load_state_dict(state, strict=True)


class _Tower(NamedTuple):
    kind: str       # "open_clip" ViT or "timm" ViT
    width: int
    blocks: int
    patch: int
    image_size: int

    def describe(self) -> str:
        article = "an" if self.kind == "open_clip" else "a"
        return (f"{article} {self.kind} ViT, width {self.width}, {self.blocks} blocks, patch {self.patch}, "
                f"{self.image_size} px ({self.image_size // self.patch}x{self.image_size // self.patch} grid)")


def _file_tower(state: dict[str, torch.Tensor]) -> _Tower | None:
    """What vision tower a state dict holds, from its shapes, if it is one we know."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    def grid_px(n_pos, patch, prefix_tokens):
        for n in (n_pos - prefix_tokens, n_pos):
            if n > 0 and math.isqrt(n) ** 2 == n:
                return math.isqrt(n) * patch
        return 0

    conv = state.get("conv1.weight")
    if conv is not None and conv.ndim == 4 and "positional_embedding" in state:
        p = int(conv.shape[-1])
        return _Tower("open_clip", int(conv.shape[0]), count("transformer.resblocks."), p,
                      grid_px(int(state["positional_embedding"].shape[0]), p, 1))
    conv = state.get("trunk.patch_embed.proj.weight")
    if conv is not None and conv.ndim == 4 and "trunk.pos_embed" in state:
        p = int(conv.shape[-1])
        registers = int(state["trunk.reg_token"].shape[1]) if "trunk.reg_token" in state else 0
        prefix = int("trunk.cls_token" in state) + registers
        return _Tower("timm", int(conv.shape[0]), count("trunk.blocks."), p,
                      grid_px(int(state["trunk.pos_embed"].shape[1]), p, prefix))
    return None


def _spec_tower(spec: TeacherSpec) -> _Tower | None:
    try:
        vision = _vision_cfg(_arch_config(spec.arch)["model_cfg"])
    except TeacherError:
        return None
    if vision.timm_model_name:
        known = _TIMM_TOWERS.get(vision.timm_model_name)
        return _Tower("timm", *known) if known else None
    if isinstance(vision.layers, (list, tuple)):
        return None
    return _Tower("open_clip", vision.width, vision.layers, _square(vision.patch_size, spec.arch),
                  _square(vision.image_size, spec.arch))


def _mismatch_message(spec, file, state, missing, unexpected, mismatched, expected) -> str:
    lines = [f"{file} does not fit teacher {spec.name!r} ({spec.arch}); nothing was loaded."]
    want = _spec_tower(spec)
    if want:
        lines.append(f"Teacher {spec.name!r} is {want.describe()}.")
    have = _file_tower(state)
    if have is not None:
        lines.append(f"The file holds {have.describe()}.")
        fits = [s.name for s in _REGISTRY.values() if _spec_tower(s) == have]
        if have.kind == "open_clip":
            # Every open_clip ViT config of this shape (GELU and QuickGELU alike: shapes cannot tell).
            open_clip = _open_clip()
            for arch in open_clip.list_models():
                try:
                    vision = _vision_cfg(open_clip.get_model_config(arch))
                except (TypeError, KeyError):
                    continue
                if not vision.timm_model_name and not isinstance(vision.layers, (list, tuple)) and \
                        _Tower("open_clip", vision.width, vision.layers, _square(vision.patch_size, arch),
                               _square(vision.image_size, arch)) == have:
                    fits.append(f"open_clip:{arch}")
        if fits:
            lines.append(f"It looks like weights for: {', '.join(fits[:10])}"
                         + (" (GELU vs QuickGELU cannot be told from weights)" if have.kind == "open_clip" else ""))
    elif any(k.startswith("vision_model.") for k in state):
        lines.append("Its keys look like a Hugging Face transformers CLIP model (vision_model.*); "
                     "use the open_clip format of these weights.")
    elif not any(k in expected for k in state):
        lines.append(f"It holds no vision-tower keys this teacher knows; its keys look like: "
                     f"{', '.join(list(state)[:5])}")
    if missing:
        lines.append(f"Missing keys ({len(missing)}): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        lines.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}"
                     f"{' ...' if len(unexpected) > 5 else ''}")
    if mismatched:
        shown = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}" for k in mismatched[:3]]
        lines.append(f"Shape mismatches ({len(mismatched)}): {'; '.join(shown)}{' ...' if len(mismatched) > 3 else ''}")
    return "\n".join(lines)


__all__ = ["RECIPE", "Teacher", "TeacherError", "TeacherSpec", "get_teacher_spec", "load_teacher",
           "register_teacher", "sha256_file", "teacher_names"]
