"""The student: a LLaVA-style model (vision tower + projector + decoder LLM), with
LoRA on the language model, MedAlign's alignment transform and a one-layer attention tap.

What docs/method.md asks of the student, and how it is done here:
- `AlignmentTransform`: X~ = X + eps * X W^T on the visual tokens' hidden states at
  decoder layer index `layer - 1`, W zero-initialised so training starts exactly at
  the base model. It is applied by a forward hook on that decoder layer.
- the attention of the prompt text (after the image, before the answer) over the
  visual tokens at decoder layer index `layer`, head-averaged. The reference runs
  EAGER attention in every layer to read one layer's weights; here every layer keeps
  its fast kernel (SDPA, or flash on a GPU) and a custom attention function computes,
  for that one layer only, the softmax rows of the few query tokens that are needed.
- both are read for any batch size and any position of the image (`set_batch`),
  instead of the reference's batch 1, 576 tokens starting at index 34.

The student is always a transformers `LlavaForConditionalGeneration` loaded from a
local directory (no network, never trust_remote_code). `make_tiny_student` writes a
tiny random one with the same architecture for tests and dry runs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import check_quantized, quantization_config
from .templates import CHAT_TEMPLATES, template_name

log = logging.getLogger(__name__)

STUDENT_WEIGHTS_HINT = (
    "The student must be a local directory holding a transformers-format LLaVA checkpoint "
    "(config.json with model_type \"llava\", i.e. LlavaForConditionalGeneration weights, plus its "
    "tokenizer, image processor and chat template, as written by save_pretrained). The paper's students "
    "come in the LLaVA codebase format (microsoft/llava-med-v1.5-mistral-7b: \"llava_mistral\"; "
    "FreedomIntelligence/HuatuoGPT-Vision-7B: \"llava_qwen2\"): convert them once, offline, with "
    "`medalign-distill convert --model DIR [--vision-tower CLIP_DIR] --out DIR_HF` (README, "
    "\"Reproduce MedAlign\"). For a dry run without weights, pass --student tiny."
)

# What `medalign-distill convert` records next to a converted checkpoint (distill/convert.py).
CONVERSION_RECORD = "medalign.json"


class StudentError(ValueError):
    """The student cannot be loaded or used as asked; the message says what to do."""


@dataclass
class Student:
    model: nn.Module             # LlavaForConditionalGeneration, a peft PeftModel after apply_lora
    processor: object            # LlavaProcessor: tokenizer + image processor + chat template
    image_token_id: int          # the placeholder id the model replaces by visual tokens
    grid: int                    # G: the visual tokens form a G x G grid
    num_visual_tokens: int       # G * G tokens per image, as the vision tower + projector produce them
    num_layers: int              # decoder layers of the language model
    hidden_size: int             # D of the language model
    chat_template: str | None = None     # registered name of the template in use (None: the checkpoint's own)
    quantize: str | None = None          # "4bit" | "8bit": the decoder's linear layers stored by bitsandbytes


# ----------------------------------------------------------------------------- tiny student

def _tiny_tokenizer():
    """Byte-level tokenizer built locally: 4 specials + the 256 byte symbols, no merges.

    Like the Llama/Mistral tokenizers of the real students it puts BOS in front of
    whatever it tokenises (the chat templates do not write it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<image>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATES["mistral_instruct"])


def make_tiny_student(out_dir, seed: int = 0) -> Path:
    """Write a tiny random LLaVA (CLIP 96px/16 -> 6x6 grid, Mistral 4 layers, GQA) to out_dir.

    Same classes and file layout as a real checkpoint (load_student reads it like one),
    under 1 MB, deterministic for a seed, and the global RNG is left untouched.
    """
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, MistralConfig)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer()
    image_size, patch = 96, 16
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,  # 2 query heads per kv head: GQA
                         max_position_embeddings=2048, sliding_window=None,
                         # a wider init than 0.02 gives peaked attention, so tests comparing
                         # attention maps can tell a wrong mask or row from a right one
                         initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    grid = image_size // patch
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=grid * grid, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: CLIP's CLS, which the "default" strategy drops again,
    # so the processor inserts grid*grid image tokens like the model expects.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=CHAT_TEMPLATES["mistral_instruct"])
    processor.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- loading

def conversion_record(path) -> dict:
    """What `medalign-distill convert` recorded about a converted student ({} otherwise)."""
    f = Path(path) / CONVERSION_RECORD
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError) as e:
        raise StudentError(f"{f}: cannot read the conversion record ({e}); convert the student again") from e


def student_geometry(path) -> bool | None:
    """Whether the student was trained on images padded to square (True), centre-cropped
    (False), or says nothing (None), read from its files without loading it: the
    conversion record's `image_aspect_ratio` (LLaVA's "pad" or "square"), else an image
    processor's `do_pad` (llava-hf LlavaImageProcessor)."""
    if path == "tiny":
        return None
    root = Path(path).expanduser()
    ratio = conversion_record(root).get("image_aspect_ratio", "")
    if ratio:
        return ratio == "pad"
    pre = root / "preprocessor_config.json"
    if pre.is_file():
        try:
            do_pad = json.loads(pre.read_text()).get("do_pad")
        except ValueError:
            return None
        return None if do_pad is None else bool(do_pad)
    return None


def load_student(path: str, *, dtype=torch.float32, attn_implementation: str = "sdpa",
                 device="cpu", chat_template: str | None = None, quantize: str | None = None) -> Student:
    """A local transformers LLaVA directory -> Student. Anything else -> StudentError with the hint.

    chat_template: a name from CHAT_TEMPLATES to use instead of the checkpoint's own.
    quantize: "4bit" | "8bit" stores the language model's linear layers with bitsandbytes,
    computing in `dtype` (distill.precision; the rest of the model stays in `dtype`).
    Images are prepared by the processor's PIL backend: CLIP's original preprocessing
    (PIL bicubic resize), which the students were trained with and the teacher cache's
    open_clip transforms also use."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = Path(path)
    if not root.is_dir() or not (root / "config.json").is_file():
        raise StudentError(f"student {str(path)!r} is not a local checkpoint directory (no config.json). "
                           f"{STUDENT_WEIGHTS_HINT}")
    # Read the model type ourselves: AutoConfig fails with an obscure message on the
    # original LLaVA-Med repo ("llava_mistral"), which is exactly what users will try.
    try:
        model_type = json.loads((root / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise StudentError(f"student {str(path)!r}: cannot read config.json ({e}). {STUDENT_WEIGHTS_HINT}") from e
    from .convert import SOURCES  # (imported here: convert imports this module)
    if model_type in SOURCES:
        raise StudentError(f"student {str(path)!r} is in the LLaVA codebase format (model_type {model_type!r}); "
                           f"convert it once: `medalign-distill convert --model {path} "
                           f"{'' if SOURCES[model_type].tower_weights == 'checkpoint' else '--vision-tower CLIP_DIR '}"
                           f"--out {str(path).rstrip('/')}-hf`, then pass the converted folder as --student")
    if model_type != "llava":
        raise StudentError(f"student {str(path)!r} has model_type {model_type!r}, not 'llava'. "
                           f"{STUDENT_WEIGHTS_HINT}")
    extra = {"quantization_config": quantization_config(quantize, dtype)} if quantize else {}
    try:
        # device_map loads the weights straight onto the device (a 7B model need not pass
        # through host memory in float32 first); quantized layer by layer on the way
        model = LlavaForConditionalGeneration.from_pretrained(
            root, dtype=dtype, attn_implementation=attn_implementation, device_map={"": str(device)},
            local_files_only=True, trust_remote_code=False, **extra)
        processor = AutoProcessor.from_pretrained(root, local_files_only=True, trust_remote_code=False,
                                                  backend="pil")
    except (OSError, ValueError, KeyError) as e:
        raise StudentError(f"student {str(path)!r} could not be loaded: {e}. {STUDENT_WEIGHTS_HINT}") from e
    if quantize:
        check_quantized(model, language_model(model), quantize)
    for part in ("tokenizer", "image_processor"):
        if getattr(processor, part, None) is None:
            raise StudentError(f"student {str(path)!r}: the processor has no {part}. {STUDENT_WEIGHTS_HINT}")
    if chat_template is not None:
        if chat_template not in CHAT_TEMPLATES:
            raise StudentError(f"unknown chat template {chat_template!r}; choose one of {sorted(CHAT_TEMPLATES)}")
        processor.chat_template = CHAT_TEMPLATES[chat_template]
    if getattr(processor.tokenizer, "chat_template", None) is None and \
            getattr(processor, "chat_template", None) is None:
        raise StudentError(f"student {str(path)!r} has no chat template (chat_template.jinja or in "
                           f"tokenizer_config.json); pass --chat-template "
                           f"{' or '.join(sorted(CHAT_TEMPLATES))} (LLaVA-Med v1.5 as MedAlign trains it: vicuna_v1)")
    # Padding to square is done by our data path (expand2square, as LLaVA does), never
    # twice: a llava-hf processor's own do_pad is switched off (its geometry is read by
    # student_geometry, which the callers ask before loading).
    if getattr(processor.image_processor, "do_pad", None):
        processor.image_processor.do_pad = False

    config = model.config
    image_token_id = int(config.image_token_id)
    image_token = getattr(processor, "image_token", "<image>")
    if processor.tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        raise StudentError(f"student {str(path)!r}: the tokenizer maps the image token {image_token!r} to "
                           f"{processor.tokenizer.convert_tokens_to_ids(image_token)}, the model expects "
                           f"image_token_id {image_token_id}")
    num_visual_tokens = _count_visual_tokens(model, processor)
    grid = math.isqrt(num_visual_tokens)
    if grid * grid != num_visual_tokens:
        raise StudentError(f"student {str(path)!r} turns an image into {num_visual_tokens} tokens, not a square "
                           f"grid (vision_feature_select_strategy {config.vision_feature_select_strategy!r} "
                           f"keeping CLS?); MedAlign needs G x G patch tokens")
    _check_processor_expansion(processor, num_visual_tokens)
    text = config.text_config
    return Student(model=model, processor=processor, image_token_id=image_token_id, grid=grid,
                   num_visual_tokens=num_visual_tokens, num_layers=int(text.num_hidden_layers),
                   hidden_size=int(text.hidden_size), chat_template=template_name(processor.chat_template),
                   quantize=quantize)


def _count_visual_tokens(model, processor) -> int:
    """Tokens per image, measured: one blank image through the image processor, vision
    tower and projector. Exact whatever the tower (CLS or not), feature layer or strategy,
    and it checks on the way that the processor's image size suits the tower."""
    from PIL import Image

    pixels = processor.image_processor(Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"]
    config = model.config
    try:
        with torch.no_grad():
            feats = model.get_image_features(
                pixel_values=pixels.to(model.device, model.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy)
    except Exception as e:  # a size mismatch surfaces as a shape error deep inside the tower
        raise StudentError(f"the image processor's images ({tuple(pixels.shape[-2:])}) do not go through the "
                           f"student's vision tower: {e}") from e
    feats = getattr(feats, "pooler_output", feats)  # transformers 5.x: an output object with a list
    return int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[1])


def _check_processor_expansion(processor, num_visual_tokens: int) -> None:
    """Inference through `processor(text, images)` must insert as many image tokens as
    the model fills; our training data path expands the token itself (distill/data.py),
    so a mismatch only warns, naming the processor setting to fix."""
    from PIL import Image

    try:
        enc = processor(text=processor.image_token, images=Image.new("RGB", (32, 32)), return_tensors="pt")
        inserted = int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
    except Exception as e:  # old processor configs without patch_size cannot expand at all
        log.warning("the student's processor cannot expand the image token (%s); generation through "
                    "processor(text, images) will fail. Set patch_size / num_additional_image_tokens / "
                    "vision_feature_select_strategy in processor_config.json.", e)
        return
    if inserted != num_visual_tokens:
        log.warning("the student's processor inserts %d image tokens, the model fills %d: fix "
                    "num_additional_image_tokens / vision_feature_select_strategy in processor_config.json "
                    "before generating through processor(text, images).", inserted, num_visual_tokens)


# ----------------------------------------------------------------------------- LoRA

def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding `.layers`), before or after peft wrapping.

    transformers >= 4.52 / 5.x: LlavaForConditionalGeneration.model.language_model is the
    bare decoder; older versions: .language_model is a *ForCausalLM with the decoder in .model.
    """
    base = _unwrap(model)
    for path in ("model.language_model", "language_model.model", "language_model"):
        m = base
        for attr in path.split("."):
            m = getattr(m, attr, None)
        if m is not None and isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m
    raise StudentError(f"cannot find the decoder layers of {type(base).__name__}: not a LLaVA-style model")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return language_model(model).layers


def apply_lora(student: Student, r: int = 32, alpha: int = 16, dropout: float = 0.05,
               target_modules: list[str] | None = None) -> None:
    """LoRA on the language model's linear layers only; everything else frozen.

    peft matches `target_modules` names by suffix, so ["q_proj"] would also adapt a
    vision tower that names its projections q_proj (CLIP does). We therefore hand peft
    the full names of the decoder layers' nn.Linear modules: the vision tower, the
    projector and lm_head can never match. `target_modules` (short names such as
    "q_proj") narrows that set. Replaces student.model by the PeftModel.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    model = student.model
    if isinstance(model, PeftModel):
        raise StudentError("apply_lora: the student already carries a peft adapter")
    in_decoder = {id(m) for m in decoder_layers(model).modules()}
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in in_decoder]
    if target_modules is not None:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        unknown = sorted(set(target_modules) - set(available))
        if unknown:
            raise StudentError(f"apply_lora: no language-model linear layer is named {unknown}; "
                               f"available: {available}")
        linears = [n for n in linears if n.rsplit(".", 1)[-1] in set(target_modules)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=linears, bias="none",
                        task_type="CAUSAL_LM")
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    # get_peft_model already freezes the base; say it explicitly since it is the method.
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    student.model = peft_model


@contextmanager
def _quiet_peft():
    """peft calls transformers' deprecated `is_gradient_checkpointing`: its FutureWarning
    is peft's to fix, not our users' to read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(model, adapter_dir) -> nn.Module:
    """A saved run's adapter on its base model, frozen: plain `PeftModel.from_pretrained`."""
    from peft import PeftModel
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


# ----------------------------------------------------------------------------- alignment transform

class AlignmentTransform(nn.Module):
    """X~ = X + eps * X W^T on [..., D] hidden states (docs/method.md).

    Full W [D, D] zero-initialised, or with `rank` r: W = B A, A [r, D] randomly
    initialised and B [D, r] zero (LoRA-style), so either way the transform starts as
    the identity and training starts exactly at the base model.
    Parameters stay float32 whatever the model's dtype (W is the trained thing).
    """

    def __init__(self, dim: int, eps: float = 1.0, rank: int | None = None):
        super().__init__()
        self.dim, self.eps, self.rank = int(dim), float(eps), rank
        self.layer: int | None = None  # decoder layer it was trained for; set by load_alignment
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(dim, dim))
        else:
            self.A = nn.Parameter(torch.empty(rank, dim))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init
            self.B = nn.Parameter(torch.zeros(dim, rank))

    def matrix(self) -> torch.Tensor:
        """W as a [D, D] matrix."""
        return self.weight if self.rank is None else self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            delta = F.linear(x.to(self.weight.dtype), self.weight)
        else:  # two thin matmuls, never the D x D product
            delta = F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)
        return x + self.eps * delta.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, rank={self.rank}"


_ALIGNMENT_WEIGHTS = "alignment.safetensors"
_ALIGNMENT_CONFIG = "alignment_config.json"


def save_alignment(transform: AlignmentTransform, out_dir, layer: int | None = None) -> Path:
    """Write the transform as safetensors + a small JSON (dim, eps, rank, layer)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in transform.state_dict().items()},
              str(out / _ALIGNMENT_WEIGHTS))
    meta = {"dim": transform.dim, "eps": transform.eps, "rank": transform.rank,
            "layer": layer if layer is not None else transform.layer}
    (out / _ALIGNMENT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_alignment(path) -> AlignmentTransform:
    """Read what save_alignment wrote; `.layer` holds the decoder layer it was saved for."""
    from safetensors.torch import load_file

    root = Path(path)
    try:
        meta = json.loads((root / _ALIGNMENT_CONFIG).read_text())
        state = load_file(str(root / _ALIGNMENT_WEIGHTS))
    except (OSError, ValueError) as e:
        raise StudentError(f"no alignment transform in {str(root)!r}: {e}") from e
    transform = AlignmentTransform(meta["dim"], eps=meta["eps"], rank=meta["rank"])
    transform.load_state_dict(state)
    transform.layer = meta.get("layer")
    return transform


# ----------------------------------------------------------------------------- attention capture

def prompt_visual_attention(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float,
                            query_mask: torch.Tensor, visual_index: torch.Tensor,
                            sliding_window: int | None = None, image_rows: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Head- and row-averaged attention probabilities of the selected query rows over each image's keys.

    query [B, H, T, hd] and key [B, Hkv, S, hd] as the attention function receives them
    (after RoPE, key not yet repeated for GQA); query_mask [B, T] the rows to average;
    visual_index [N, V] the key columns of each of N images and image_rows [N] the batch
    row each sits in (default: one image per row, N = B). Returns [N, V] float32.

    Each row is normalised over ALL the keys it attends to (a softmax over S), and only
    then are an image's columns taken, as in the eager attention weights. Only the
    selected rows are computed, in float32 with autocast off: [B, H, R, S], never [B, H, T, S].

    attention_mask, as transformers hands it to attention functions:
      None             pure causal (SDPA's is_causal shortcut when nothing is padded);
      bool [B|1, *, T, S]   True = may attend (sdpa_mask);
      float [B|1, *, T, S]  additive, large negative = masked (eager_mask);
      [B, S] 0/1       the padding mask flash attention gets, causal implied.
    """
    B, H, T, hd = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    counts = query_mask.sum(1)
    if bool((counts == 0).any()):
        raise StudentError("attention capture: a sample has no query rows (prompt text after the image)")
    R = int(counts.max())
    # Row positions, the selected ones first in their order; the tail is padding marked by `valid`.
    rows = torch.sort((~query_mask).to(torch.int8), dim=1, stable=True).indices[:, :R]      # [B, R]
    valid = torch.arange(R, device=query.device)[None, :] < counts[:, None]               # [B, R]
    q_pos = rows + (S - T)  # with a KV cache the queries are the last T of S keys

    with torch.autocast(query.device.type, enabled=False):
        q = query.gather(2, rows[:, None, :, None].expand(B, H, R, hd)).float()
        k = key.float()
        # GQA: query head h reads kv head h // n_rep (transformers' repeat_kv), so group
        # the query heads by kv head instead of materialising the repeated keys.
        n_rep = H // Hkv
        logits = (q.reshape(B, Hkv, n_rep * R, hd) @ k.transpose(-1, -2)).reshape(B, H, R, S) * scaling

        kv_pos = torch.arange(S, device=query.device)
        if attention_mask is None or attention_mask.ndim == 2:
            allowed = kv_pos[None, None, :] <= q_pos[:, :, None]                              # causal [B, R, S]
            if sliding_window is not None:
                allowed = allowed & (kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window)
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, :].bool()
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        elif attention_mask.ndim == 4:
            m = attention_mask.expand(B, -1, -1, -1)
            m = m.gather(2, rows[:, None, :, None].expand(B, m.shape[1], R, m.shape[3]))       # [B, 1|H, R, S]
            if m.dtype == torch.bool:
                logits = logits.masked_fill(~m, float("-inf"))
            else:
                logits = logits + m.float()
        else:
            raise StudentError(f"attention capture: unsupported attention mask of shape "
                               f"{tuple(attention_mask.shape)} (use attn_implementation sdpa, eager or flash)")
        probs = logits.softmax(-1)                                                          # [B, H, R, S]
        if image_rows is None:
            image_rows = torch.arange(B, device=query.device)
        N, V = visual_index.shape
        cols = probs[image_rows].gather(3, visual_index[:, None, None, :].expand(N, H, R, V)).mean(1)  # [N, R, V]
        # where(), not a product: a padding row may be a left-pad position that attends to
        # nothing, whose softmax is NaN (and NaN * 0 is NaN)
        cols = torch.where(valid[image_rows, :, None], cols, 0.0)
        return cols.sum(1) / counts[image_rows, None].to(cols.dtype)


_TAP_PREFIX = "medalign_tap_"


def _tap_attention_name(base: str) -> str:
    """Register (once) an attention function that runs `base` and, in the tapped layer,
    also captures the prompt->visual attention. The name keeps `base` in it so that
    transformers' "flash..." checks still see a flash implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _TAP_PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise StudentError(f"attention capture: unknown attention implementation {base!r}")
    if base.startswith("flex"):
        raise StudentError("attention capture does not support flex_attention (its mask is a BlockMask); "
                           "load the student with attn_implementation 'sdpa', 'eager' or a flash variant")

    def attention(module, query, key, value, attention_mask, **kwargs):
        if base == "eager":  # eager is each model file's own function, not in the registry
            run = sys.modules[type(module).__module__].eager_attention_forward
        else:
            run = ALL_ATTENTION_FUNCTIONS[base]
        out = run(module, query, key, value, attention_mask, **kwargs)
        tap = getattr(module, "_medalign_tap", None)
        if tap is not None:
            tap._capture(query, key, attention_mask, kwargs.get("scaling") or module.scaling,
                         kwargs.get("sliding_window"))
        return out

    AttentionInterface.register(name, attention)
    # Without a mask function registered under the same name, transformers builds no
    # mask at all for an unknown implementation and the model silently runs unmasked.
    mask_base = "sdpa" if base not in ALL_MASK_ATTENTION_FUNCTIONS else base
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name


class DistillTap:
    """Binds the alignment transform and the attention capture to a student's decoder.

    - transform (if given): a forward hook on decoder layer index `layer - 1` replaces the
      visual tokens' hidden states in the layer's output by transform(X); the result is
      kept in `aligned_visual` [N, V, D] (N images) for L_vis.
    - capture_attention: at decoder layer index `layer` only, the prompt rows' attention
      over the visual tokens, head- and row-averaged -> `visual_attention` [N, V] float32, one map per image.
    Nothing is installed for a part that is off, so the model runs unchanged.

    Call `set_batch` before each forward. The values are kept from the model's forward
    itself, not from activation checkpointing's recomputation in backward (that replays
    the layers but must not overwrite what the losses were computed from). A forward
    whose length differs from set_batch's (a generation step with a KV cache) is left
    alone: its visual tokens were transformed in the prefill and sit in the cache.
    """

    def __init__(self, student: Student, layer: int, transform: AlignmentTransform | None,
                 capture_attention: bool):
        layers = decoder_layers(student.model)
        if not 1 <= layer < len(layers):
            raise StudentError(f"DistillTap: layer must be in [1, {len(layers) - 1}] for a student with "
                               f"{len(layers)} decoder layers (the transform sits at layer - 1), got {layer}")
        self.layer, self.transform, self.capture_attention = layer, transform, capture_attention
        self._model = student.model
        self.aligned_visual: torch.Tensor | None = None
        self.visual_attention: torch.Tensor | None = None
        self._visual_index = self._query_mask = self._image_rows = None
        self._armed_vis = self._armed_att = False
        self._handles = []
        self._restore = None
        if transform is None and not capture_attention:
            return
        # Arms the captures once per real forward of the decoder; checkpoint recomputation
        # replays single layers, never this.
        self._handles.append(language_model(student.model).register_forward_pre_hook(self._arm))
        if transform is not None:
            self._handles.append(layers[layer - 1].register_forward_hook(self._align))
        if capture_attention:
            attn = layers[layer].self_attn
            if getattr(attn, "_medalign_tap", None) is not None:
                raise StudentError("DistillTap: this student already has a tap; remove() it first")
            config = attn.config  # the text config, shared by every decoder layer
            base = config._attn_implementation
            config._attn_implementation = _tap_attention_name(base)
            attn._medalign_tap = self
            self._restore = (config, base, attn)

    def set_batch(self, visual_index: torch.Tensor, query_mask: torch.Tensor,
                  image_rows: torch.Tensor | None = None) -> None:
        """visual_index [N, V]: the positions of each image's visual tokens; image_rows [N]:
        the batch row of each image (default: one image per row); query_mask [B, T]: the
        prompt text rows after the images and before the answer."""
        if visual_index.ndim != 2 or query_mask.ndim != 2 or \
                (image_rows is None and visual_index.shape[0] != query_mask.shape[0]) or \
                (image_rows is not None and image_rows.shape != visual_index.shape[:1]):
            raise StudentError(f"DistillTap.set_batch: expected visual_index [N, V], image_rows [N] and query_mask "
                               f"[B, T], got {tuple(visual_index.shape)}, "
                               f"{None if image_rows is None else tuple(image_rows.shape)} and "
                               f"{tuple(query_mask.shape)}")
        if image_rows is None:
            image_rows = torch.arange(visual_index.shape[0], device=visual_index.device)
        self._visual_index, self._query_mask = visual_index.long(), query_mask.bool()
        self._image_rows = image_rows.long()
        self.aligned_visual = self.visual_attention = None

    def follow_input_ids(self, image_token_id: int, num_visual_tokens: int) -> None:
        """Find the images in every forward's input_ids by themselves (no set_batch): what
        makes a loaded model usable with a plain `model.generate(input_ids=..., pixel_values=...)`.
        Only the alignment transform can run like this (the attention capture needs the
        prompt rows, which the ids alone do not tell)."""
        if self.capture_attention:
            raise StudentError("DistillTap.follow_input_ids: the attention capture needs set_batch")

        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or ids.shape[1] == 1 or not bool((ids == image_token_id).any()):
                return None  # a decode step (the images are in the KV cache) or no image at all
            from .data import visual_layout
            visual_index, image_rows = visual_layout(ids, image_token_id, num_visual_tokens,
                                                     kwargs.get("attention_mask"))
            self.set_batch(visual_index, torch.zeros_like(ids, dtype=torch.bool), image_rows)
            return None

        self._handles.append(_unwrap(self._model).register_forward_pre_hook(hook, with_kwargs=True))

    def _arm(self, module, args):
        self._armed_vis = self._armed_att = True

    def _batch_for(self, batch: int, length: int) -> bool:
        """Whether this forward is the one set_batch described (False: a decode step)."""
        if self._query_mask is None:
            raise StudentError("DistillTap: call set_batch(visual_index, query_mask) before the forward pass")
        if length != self._query_mask.shape[1]:
            return False
        if batch != self._query_mask.shape[0]:
            raise StudentError(f"DistillTap: set_batch was given {self._query_mask.shape[0]} samples, "
                               f"the forward has {batch}")
        return True

    def _align(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        B, T, _ = hidden.shape
        if not self._batch_for(B, T):
            return None
        vi = self._visual_index.to(hidden.device)
        rows = self._image_rows.to(hidden.device)[:, None].expand_as(vi)
        aligned = self.transform(hidden[rows, vi])                       # [N, V, D]
        hidden = hidden.index_put((rows, vi), aligned)                   # out of place: autograd-safe
        if self._armed_vis:
            self.aligned_visual, self._armed_vis = aligned, False
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _capture(self, query, key, attention_mask, scaling, sliding_window):
        if not self._batch_for(query.shape[0], query.shape[2]):
            return
        # Computed on recomputation too: checkpointing matches the tensors saved for
        # backward by their order, so the replayed layer must do the same work.
        att = prompt_visual_attention(query, key, attention_mask, scaling, self._query_mask.to(query.device),
                                      self._visual_index.to(query.device), sliding_window,
                                      self._image_rows.to(query.device))
        if self._armed_att:
            self.visual_attention, self._armed_att = att, False

    def remove(self) -> None:
        """Detach from the model: hooks off, the original attention implementation back."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._restore is not None:
            config, base, attn = self._restore
            config._attn_implementation = base
            attn._medalign_tap = None
            self._restore = None
