"""`medalign-distill convert`: a LLaVA-codebase checkpoint -> a transformers LLaVA folder, offline.

The students MedAlign trains are published in the formats of the code that trained
them, which transformers cannot load:

    microsoft/llava-med-v1.5-mistral-7b      model_type "llava_mistral"  (LLaVA codebase)
    FreedomIntelligence/HuatuoGPT-Vision-7B  model_type "llava_qwen2"    (HuatuoGPT-Vision's fork)
    LLaVA v1.5-style Llama checkpoints       model_type "llava_llama"

`convert` rewrites one into a `LlavaForConditionalGeneration` folder (safetensors,
config, tokenizer, image processor, chat template) that `run`, `eval` and
`pictures` take as --student, and records what it did in `medalign.json`:

- Every config field that changes the computation is checked and anything this
  conversion does not reproduce is refused by name: mm_projector_type (mlp2x_gelu
  = Linear-GELU-Linear, transformers' LlavaMultiModalProjector), mm_vision_select_layer
  (-> vision_feature_layer), mm_vision_select_feature ("patch" = CLS dropped ->
  strategy "default"), mm_use_im_start_end / mm_use_im_patch_token (extra tokens:
  refused), mm_patch_merge_type ("flat" only), image_aspect_ratio ("pad" or
  "square"; the geometry is recorded and the run follows it).
- The vision tower is the one the original code runs with. LLaVA-Med's loader
  builds its tower with delay_load and then loads CLIP from the hub name in
  mm_vision_tower (llava/model/multimodal_encoder/clip_encoder.py, builder.py): the
  copy under model.vision_tower.vision_tower.* in its checkpoint is ignored, so the
  tower comes from --vision-tower (a local openai/clip-vit-large-patch14-336).
  HuatuoGPT-Vision builds the tower first (init_vision_encoder_from_ckpt=True, cli.py)
  and then loads the checkpoint over it, so it runs with the checkpoint's own copy;
  only the tower's config and image processor come from --vision-tower (or the
  folder mm_vision_tower names). Where both copies exist, medalign.json says whether
  they differ, and the command prints it.
- LLaVA puts an image at IMAGE_TOKEN_INDEX = -200, outside the vocabulary;
  transformers needs a token. "<image>" is added to the tokenizer; when its id falls
  outside the embedding matrix, one zero row is appended to the embeddings and to
  lm_head, so the logits over the original vocabulary do not change (training and
  generation here never let the model predict the placeholder).
- Weights are streamed one source shard at a time (peak memory ~ one shard, not the
  model), with a progress bar over bytes; the result is written into DIR.partial
  and renamed when complete.

Everything is read from local folders (no hub access), tensors with safetensors or
torch.load(weights_only=True), never trust_remote_code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .student import CONVERSION_RECORD
from .templates import CHAT_TEMPLATES

IMAGE_TOKEN = "<image>"
FORMAT_VERSION = 1
# Weights held in memory before an output file is written: the conversion's peak is
# about twice this (the tensors and safetensors' serialisation), not the model's size.
OUT_SHARD_BYTES = 2 * 2**30


class ConvertError(ValueError):
    """The source cannot be converted as asked; the message names the field or file and the fix."""


@dataclass(frozen=True)
class SourceKind:
    """What one LLaVA-codebase model_type means for the conversion."""
    text_model_type: str        # transformers model_type of the language model
    template: str               # the chat template MedAlign trains it with (distill.templates)
    tower_weights: str          # "clip_folder" (LLaVA: delay_load + hub CLIP) | "checkpoint" (HuatuoGPT)
    default_aspect_ratio: str   # when the config has no image_aspect_ratio
    default_select_layer: int | None   # when the config has no mm_vision_select_layer (None: required)
    description: str


SOURCES = {
    # LLaVA-Med v1.5: MedAlign trains it with --version v1 (conv_vicuna_v1) and --image_aspect_ratio pad;
    # LLaVA's process_images pads only when the config says "pad" (getattr default None).
    "llava_mistral": SourceKind("mistral", "vicuna_v1", "clip_folder", "square", None,
                                "LLaVA-Med v1.5 (LLaVA codebase, Mistral LLM)"),
    "llava_llama": SourceKind("llama", "vicuna_v1", "clip_folder", "square", None,
                              "LLaVA v1.5-style checkpoint (Llama LLM)"),
    # HuatuoGPT-Vision: cli.py pads every image ("if True or ... == 'pad'") and its CLIPVisionTower
    # defaults mm_vision_select_layer to -2; MedAlign's default conversation is conv_huatuo_v1.
    "llava_qwen2": SourceKind("qwen2", "huatuo_v1", "checkpoint", "pad", -2,
                              "HuatuoGPT-Vision (Qwen2 LLM)"),
}

# Config keys of the LLaVA codebase that describe the multimodal wiring, not the LLM.
_LLAVA_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "image_aspect_ratio",
    "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "use_mm_proj", "mm_projector_lr", "unfreeze_mm_vision_tower",
    "mm_vision_tower_lr", "torch_dtype", "dtype", "auto_map",
}
_TOWER_PREFIX = "model.vision_tower.vision_tower."
_PROJECTOR = {"model.mm_projector.0.": "multi_modal_projector.linear_1.",
              "model.mm_projector.2.": "multi_modal_projector.linear_2."}
# Written keys follow the llava-hf hub layout (llava-hf/llava-1.5-7b-hf), which transformers
# 4.x and 5.x and other runtimes load: language_model.model.*, language_model.lm_head,
# multi_modal_projector.*, vision_tower.vision_model.*.
_EMBEDDINGS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")  # buffers, rebuilt at load


# ----------------------------------------------------------------------------- reading

def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing; {what}") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read it ({e}); {what}") from None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files in order: from its index, else the single file."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(_read_json(index, "re-download the checkpoint")["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ConvertError(f"{folder}: {index_name} names {missing[:3]}, which are missing; the download "
                                   f"is incomplete, fetch those files")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    raise ConvertError(f"{folder}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json]); "
                       f"download the checkpoint's weight files into it")


def iter_tensors(path: Path):
    """(name, tensor) of one weight file; .bin files are read with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a pickle that is not plain tensors, or a damaged file
        raise ConvertError(f"{path}: cannot read it as a plain tensor file ({type(e).__name__}: {e}); "
                           f"re-download it, or convert it to safetensors") from None
    yield from state.items()


def _file_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


# ----------------------------------------------------------------------------- checks

def check_source(config: dict, kind: SourceKind, path: Path) -> dict:
    """The multimodal settings of a LLaVA-codebase config, checked; -> what the conversion uses."""
    def refuse(field, value, why):
        raise ConvertError(f"{path / 'config.json'}: {field} = {value!r} is not supported: {why}")

    projector = config.get("mm_projector_type", "linear")  # LLaVA's ModelArguments default
    if projector != "mlp2x_gelu":
        refuse("mm_projector_type", projector, "transformers' LLaVA projector is Linear-GELU-Linear (mlp2x_gelu)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        refuse("mm_vision_select_feature", feature, "MedAlign needs the G x G patch tokens without CLS ('patch')")
    layer = config.get("mm_vision_select_layer", kind.default_select_layer)
    if not isinstance(layer, int) or isinstance(layer, bool):
        refuse("mm_vision_select_layer", layer, "an integer hidden-state index of the vision tower is needed")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(flag):
            refuse(flag, config[flag], "it adds image start/end or patch tokens this conversion does not reproduce")
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        refuse("mm_patch_merge_type", merge, "only 'flat' (one 24 x 24 grid per image) is reproduced")
    ratio = config.get("image_aspect_ratio") or kind.default_aspect_ratio
    if ratio not in ("pad", "square"):
        refuse("image_aspect_ratio", ratio, "only 'pad' (pad to square with the CLIP mean colour) and "
                                            "'square' (resize + centre crop) are reproduced, not anyres")
    return {"vision_feature_layer": layer, "image_aspect_ratio": ratio}


def find_clip_folder(source: Path, config: dict, vision_tower: Path | None) -> Path | None:
    """--vision-tower, else mm_vision_tower if it names a local folder (absolute, or inside the
    checkpoint as HuatuoGPT-Vision's builder resolves it)."""
    if vision_tower is not None:
        return Path(vision_tower).expanduser()
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    if not name:
        return None
    for candidate in (Path(name).expanduser(), source / name):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def clip_vision_config(folder: Path):
    """The CLIPVisionConfig of a CLIP folder (a full CLIPModel or a CLIPVisionModel layout)."""
    from transformers import CLIPVisionConfig

    cfg = _read_json(folder / "config.json", "pass the folder of openai/clip-vit-large-patch14-336 as --vision-tower")
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or {}
    elif cfg.get("model_type") != "clip_vision_model":
        raise ConvertError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not a CLIP model; "
                           f"--vision-tower must be a CLIP folder such as openai/clip-vit-large-patch14-336")
    return CLIPVisionConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})


def clip_tower_tensors(folder: Path):
    """(HF Llava key, tensor) of a CLIP folder's vision tower; the text half is skipped."""
    for path in weight_files(folder):
        for name, tensor in iter_tensors(path):
            if name.startswith("vision_model.") and not name.endswith(_DROPPED_SUFFIXES):
                yield "vision_tower." + name, tensor


def _clip_tower_if_any(folder: Path, required: bool) -> dict:
    """The CLIP folder's tower tensors; where they only serve the comparison with the
    checkpoint's copy, a folder holding just config + image processor is fine."""
    try:
        return dict(clip_tower_tensors(folder))
    except ConvertError:
        if required:
            raise
        return {}


# ----------------------------------------------------------------------------- the conversion

def _map_key(name: str, kind: SourceKind) -> str | None:
    """Source key -> transformers Llava key; None for a key that is dropped on purpose."""
    if name.endswith(_DROPPED_SUFFIXES):
        return None
    if name.startswith(_TOWER_PREFIX):
        return "vision_tower." + name[len(_TOWER_PREFIX):]
    for old, new in _PROJECTOR.items():
        if name.startswith(old):
            return new + name[len(old):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language_model." + name
    raise ConvertError(f"unexpected weight {name!r} in a {kind.description} checkpoint; this conversion does not "
                       f"know where it goes (a different architecture?)")


def _grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Embedding / lm_head with zero rows appended up to `rows` (the image token's)."""
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _compare_tower(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """How the checkpoint's tower copy relates to the CLIP folder's tower."""
    common = sorted(set(ours) & set(theirs))
    differing = [k for k in common if ours[k].shape != theirs[k].shape
                 or not torch.equal(ours[k].float(), theirs[k].float())]
    max_diff = max((float((ours[k].float() - theirs[k].float()).abs().max()) for k in differing
                    if ours[k].shape == theirs[k].shape), default=0.0)
    return {"tensors": len(common), "differing": len(differing), "max_abs_diff": max_diff,
            "only_in_checkpoint": len(set(ours) - set(theirs)), "only_in_clip_folder": len(set(theirs) - set(ours)),
            "identical": not differing and set(ours) == set(theirs)}


def _check_loads(folder: Path, model: Path, kind: SourceKind, had_tower_copy: bool) -> None:
    """transformers' own judgement of the written weights: a load onto the meta device
    (no memory) reports every missing, unexpected or mis-shaped weight."""
    from transformers import LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(folder, device_map={"": "meta"}, local_files_only=True,
                                                            output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        hint = "" if kind.tower_weights == "clip_folder" or had_tower_copy else \
            "; the checkpoint has no vision tower copy (model.vision_tower.vision_tower.*)"
        raise ConvertError(f"{model}: the converted weights do not load as a {kind.description} in transformers' "
                           f"LLaVA: " + "; ".join(f"{k} {v[:5]}{' ...' if len(v) > 5 else ''}"
                                                  for k, v in problems.items()) + hint)


def convert(model: Path, out: Path, vision_tower: Path | None = None, chat_template: str | None = None,
            progress: bool = True) -> dict:
    """Convert `model` (a LLaVA-codebase folder) into a transformers LLaVA folder `out`.
    Returns the conversion record (also written to out/medalign.json)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaProcessor
    from tokenizers import AddedToken

    model, out = Path(model).expanduser(), Path(out).expanduser()
    if not (model / "config.json").is_file():
        raise ConvertError(f"{model}: no config.json; --model must be the local folder of the downloaded checkpoint "
                           f"(e.g. microsoft/llava-med-v1.5-mistral-7b)")
    if out.exists():
        raise ConvertError(f"{out} exists already; choose another --out or remove it")
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise ConvertError(f"unknown chat template {chat_template!r}; choose one of {sorted(CHAT_TEMPLATES)}")
    src = _read_json(model / "config.json", "re-download the checkpoint")
    model_type = src.get("model_type")
    if model_type == "llava":
        raise ConvertError(f"{model} is already a transformers LLaVA checkpoint: pass it as --student directly")
    if model_type not in SOURCES:
        raise ConvertError(f"{model}: model_type {model_type!r} is not one this conversion knows "
                           f"({', '.join(SOURCES)})")
    kind = SOURCES[model_type]
    settings = check_source(src, kind, model)
    template = chat_template or kind.template

    clip_dir = find_clip_folder(model, src, vision_tower)
    if clip_dir is None or not (clip_dir / "config.json").is_file():
        where = f"{clip_dir} has no config.json" if clip_dir is not None else \
            f"mm_vision_tower is {src.get('mm_vision_tower')!r}, not a local folder"
        raise ConvertError(f"the student's vision tower is needed ({where}): download "
                           f"openai/clip-vit-large-patch14-336 and pass its folder as --vision-tower"
                           + (" (its weights are what LLaVA-Med runs with)" if kind.tower_weights == "clip_folder"
                              else " (for the tower's config and image processor; the weights come from the "
                                   "checkpoint's own copy, as HuatuoGPT-Vision loads them)"))
    vision_config = clip_vision_config(clip_dir)
    files = weight_files(model)

    # Tokenizer: the source's own, plus the image placeholder as a special token.
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as e:
        raise ConvertError(f"{model}: cannot load its tokenizer ({e}); the folder needs the tokenizer files "
                           f"of the download (tokenizer.model or tokenizer.json, tokenizer_config.json)") from None
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ConvertError(f"{model}: the tokenizer already has a token {IMAGE_TOKEN!r}; this conversion adds it "
                           f"and cannot tell which of the two the checkpoint was trained with")
    original_vocab = int(src.get("vocab_size") or len(tokenizer))
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer.pad_token is None:  # MedAlign: unk for LLaVA-Med (v1), eos for HuatuoGPT-Vision
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    vocab = max(original_vocab, image_token_id + 1)

    text_fields = {k: v for k, v in src.items() if k not in _LLAVA_KEYS and not k.startswith("mm_")}
    text_fields["vocab_size"] = vocab
    text_config = AutoConfig.for_model(kind.text_model_type, **text_fields)
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=grid * grid, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default",
                         vision_feature_layer=settings["vision_feature_layer"], multimodal_projector_bias=True,
                         tie_word_embeddings=bool(text_config.tie_word_embeddings))
    config.architectures = ["LlavaForConditionalGeneration"]

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        files_out: list[Path] = []
        written = [0]  # bytes of weights written (the index's total_size)
        tower_from_clip = kind.tower_weights == "clip_folder"
        clip_tower = _clip_tower_if_any(clip_dir, required=tower_from_clip)
        checkpoint_tower: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}
        bar = tqdm(total=_file_bytes(files), unit="B", unit_scale=True, desc="convert", disable=not progress,
                   dynamic_ncols=True)

        def flush():
            """Write the pending tensors as the next output file (at most ~OUT_SHARD_BYTES of
            weights in memory at a time, whatever the source's shard size)."""
            from safetensors.torch import save_file
            if pending:
                files_out.append(tmp / f"part-{len(files_out):05d}.safetensors")
                save_file({k: v.contiguous() for k, v in pending.items()}, str(files_out[-1]),
                          metadata={"format": "pt"})
                weight_map.update({k: files_out[-1].name for k in pending})
                written[0] += sum(t.numel() * t.element_size() for t in pending.values())
                pending.clear()

        def add(key: str, tensor: torch.Tensor, where: Path):
            if key in pending or key in weight_map:
                raise ConvertError(f"{where}: weight {key!r} appears twice in the checkpoint")
            pending[key] = tensor
            if sum(t.numel() * t.element_size() for t in pending.values()) >= OUT_SHARD_BYTES:
                flush()

        for path in files:
            for name, tensor in iter_tensors(path):
                key = _map_key(name, kind)
                if key is None:
                    continue
                if name.startswith(_TOWER_PREFIX):
                    checkpoint_tower[key] = tensor
                    if tower_from_clip:
                        continue  # LLaVA-Med's loader never reads this copy
                add(key, _grow_rows(tensor, vocab) if key in _EMBEDDINGS else tensor, path)
            bar.update(path.stat().st_size)
        for key, tensor in (clip_tower.items() if tower_from_clip else ()):
            add(key, tensor, clip_dir)
        flush()
        bar.close()
        # transformers' shard names, now that their number is known
        names = {f.name: f"model-{i + 1:05d}-of-{len(files_out):05d}.safetensors" for i, f in enumerate(files_out)}
        for f in files_out:
            f.rename(tmp / names[f.name])
        weight_map = {k: names[v] for k, v in weight_map.items()}

        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": written[0]}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        config.save_pretrained(tmp)
        _check_loads(tmp, model, kind, bool(checkpoint_tower))

        image_processor = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
                                   chat_template=CHAT_TEMPLATES[template])
        processor.save_pretrained(tmp)

        tower = {"weights_from": "clip_folder" if tower_from_clip else "checkpoint", "clip_folder": str(clip_dir)}
        if checkpoint_tower and clip_tower:
            tower["checkpoint_copy_vs_clip_folder"] = _compare_tower(checkpoint_tower, clip_tower)
        elif not checkpoint_tower:
            tower["checkpoint_copy_vs_clip_folder"] = "the checkpoint has no tower copy"
        record = {
            "format": FORMAT_VERSION,
            "source": {"path": str(model), "model_type": model_type, "architectures": src.get("architectures"),
                       "weight_files": [f.name for f in files], "bytes": _file_bytes(files)},
            "chat_template": template,
            "image_aspect_ratio": settings["image_aspect_ratio"],
            "vision_feature_layer": settings["vision_feature_layer"],
            "vision_tower": tower,
            "image_token": IMAGE_TOKEN, "image_token_id": image_token_id,
            "original_vocab_size": original_vocab, "vocab_size": vocab,
            "source_fields": {k: src[k] for k in sorted(src) if k.startswith("mm_") or k == "image_aspect_ratio"},
        }
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder never passes for a student
        raise
    return record


def describe(record: dict) -> list[str]:
    """What a user should know about a conversion, one line each."""
    tower = record["vision_tower"]
    from_clip = tower["weights_from"] == "clip_folder"
    images = ("padded to square with the CLIP mean colour" if record["image_aspect_ratio"] == "pad"
              else "resized and centre-cropped")
    lines = [f"chat template: {record['chat_template']} (as MedAlign trains this student); images: {images}",
             f"image token {record['image_token']!r} = id {record['image_token_id']} (original vocabulary "
             f"{record['original_vocab_size']}, embeddings {record['vocab_size']})",
             "vision tower weights: " + (f"the CLIP folder {tower['clip_folder']}" if from_clip
                                         else "the checkpoint's own copy")]
    cmp = tower.get("checkpoint_copy_vs_clip_folder")
    if isinstance(cmp, dict):
        if cmp["identical"]:
            lines.append("the checkpoint's tower copy and the CLIP folder's tower are identical")
        else:
            lines.append(f"note: the checkpoint's tower copy differs from the CLIP folder's ({cmp['differing']} of "
                         f"{cmp['tensors']} tensors differ, max |diff| {cmp['max_abs_diff']:.3g}); using "
                         f"{'the CLIP folder' if from_clip else 'the checkpoint copy'} as the original code does")
    elif cmp:
        lines.append(f"note: {cmp}")
    return lines
