"""Records + a cache group + the student's processor -> padded training batches.

Each sample carries, besides input ids and labels (only answer tokens are
learned), what the distillation losses need and the reference hard-codes:
- `visual_index` [N, V] and `image_rows` [N]: the positions of each image's V
  tokens and the batch row it sits in, found from the image token id (the
  reference assumes one image of 576 tokens starting at index 34). With
  `images="all"` a record's every image is its own block of V tokens, LLaVA's
  "<image>\n<image>\n..." layout, and N counts images, not samples;
- `query_mask`: the prompt text tokens after the image and before the answer,
  the rows averaged into the student's text-to-visual attention;
- the teacher targets at the cache's native grid (packed fp16 similarity, fp32
  attention): resizing to the student grid is two matmuls done on the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from precompute.cache import CacheError, TeacherGroup
from precompute.datasets import DatasetError, Record, resolve_image
from precompute.images import ImageError, expand2square, load_image

from .templates import tokenize_prompt


class SampleError(ValueError):
    """A training sample that cannot be turned into a batch; names the record."""


# What a broken sample raises (its message already names the file or record).
SAMPLE_ERRORS = (ImageError, DatasetError, CacheError, SampleError)


def split_errors(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(good items, error items) of a list of DistillDataset items."""
    return [it for it in items if "error" not in it], [it for it in items if "error" in it]


IMAGE_MODES = ("first", "all")


def record_images(record: Record, mode: str = "first") -> tuple[str, ...]:
    """The images of a record the student is shown: its first (LLaVA-Med's one image per
    sample), or all of them (`--images all`: IU-Xray's two views, a LLaVA list of images)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {mode!r}")
    return record.images[:1] if mode == "first" else record.images


def conversation(turns, upto: int | None = None, include_last_answer: bool = True, n_images: int = 1):
    """Chat-template messages for `turns`; the images go with the first user turn."""
    messages = []
    turns = turns[:upto] if upto is not None else turns
    for i, (human, answer) in enumerate(turns):
        content = ([{"type": "image"}] * n_images if i == 0 else []) + [{"type": "text", "text": human}]
        messages.append({"role": "user", "content": content})
        if include_last_answer or i < len(turns) - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    query_rows: tuple[int, int]     # [start, end) of the prompt text after the last image, first turn


def encode(processor, record: Record, num_visual_tokens: int, max_length: int, n_images: int = 1) -> Encoded:
    """Tokenise a record with the student's chat template; labels only on answers.

    The template is rendered for growing prefixes of the conversation, so every
    answer's tokens (and the end marker after it, e.g. "</s>") are the difference
    between the prompt that asks for it and the text that contains it: exactly the
    tokens LLaVA's preprocessing leaves unmasked, whatever the template's markup.
    Tokens come from `templates.tokenize_prompt` (LLaVA's chunk-wise tokenisation).
    """
    tok = processor.tokenizer
    image_token = processor.image_token
    image_token_id = tok.convert_tokens_to_ids(image_token)
    # Templates written for tokenizers that add no BOS spell it out; the originals'
    # tokenizers add it themselves, so a spelled-out one is dropped, never doubled.
    bos_text = tok.bos_token if tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id] \
        else None

    def ids(messages, generation_prompt):
        text = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        if image_token not in text:
            raise SampleError(f"record {record.id!r}: the student's chat template dropped the image token "
                              f"{image_token!r}; check the processor's chat_template")
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        out = []
        for x in tokenize_prompt(tok, text, image_token, image_token_id):
            out.extend([x] * num_visual_tokens if x == image_token_id else [x])
        return out

    input_ids: list[int] = []
    labels: list[int] = []
    for t in range(len(record.turns)):
        prompt_ids = ids(conversation(record.turns, t + 1, include_last_answer=False, n_images=n_images), True)
        full_ids = ids(conversation(record.turns, t + 1, n_images=n_images), False)
        if full_ids[:len(input_ids)] != input_ids or full_ids[:len(prompt_ids)] != prompt_ids:
            raise SampleError(f"record {record.id!r}: the chat template does not render turns as prefixes "
                              f"of each other; cannot locate the answer tokens")
        labels += [-100] * (len(prompt_ids) - len(input_ids)) + full_ids[len(prompt_ids):]
        input_ids = full_ids
        if t == 0:
            visual = [i for i, x in enumerate(prompt_ids) if x == image_token_id]
            query_rows = (visual[-1] + 1, len(prompt_ids))
    if query_rows[0] >= query_rows[1]:
        raise SampleError(f"record {record.id!r}: no prompt text follows the image")
    if sum(x == image_token_id for x in prompt_ids) != n_images * num_visual_tokens:
        raise SampleError(f"record {record.id!r}: the chat template placed "
                          f"{sum(x == image_token_id for x in prompt_ids) // num_visual_tokens} images, "
                          f"not {n_images}; check the processor's chat_template")
    if len(input_ids) > max_length:
        if query_rows[1] >= max_length:
            raise SampleError(f"record {record.id!r}: image and prompt alone take {query_rows[1]} tokens, "
                              f"more than max_length {max_length}; raise --max-length")
        input_ids, labels = input_ids[:max_length], labels[:max_length]  # truncate the answer's end
    return Encoded(input_ids, labels, query_rows)


def text_limit(tokenizer, max_length: int) -> int:
    """The most characters `max_length` tokens can hold: max_length times the vocabulary's
    longest token (its string is at least as long as the text it stands for). A field
    longer than this cannot fit whatever the tokenizer makes of it."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_length * max(longest, 1)


def bound_text(record: Record, max_chars: int) -> Record:
    """The record as `encode` may see it, decided by characters BEFORE tokenisation (a
    200 MB line would otherwise be tokenised whole first): a first question longer than
    max_chars (`text_limit`) is refused, since the prompt must fit; any other field is
    cut to max_chars, which keeps every token `encode`'s truncation of the answer's end
    keeps (they all lie within the first max_chars characters of each field)."""
    if record.turns and len(record.turns[0][0]) > max_chars:
        raise SampleError(f"record {record.id!r}: its question has {len(record.turns[0][0]):,} characters, more than "
                          f"the {max_chars:,} that fit in the student's token limit (--max-length in training, the "
                          f"model's context in eval); shorten or drop the record")
    if all(len(h) <= max_chars and len(a) <= max_chars for h, a in record.turns):
        return record
    return dataclasses.replace(record, turns=tuple((h[:max_chars], a[:max_chars]) for h, a in record.turns))


def read_targets(group: TeacherGroup, keys, need_sim: bool = True, need_attn: bool = True) -> dict:
    """The stored targets of `keys` (one row per image) that the run's losses use, and only
    those: without L_vis the packed similarity (P(P-1)/2 fp16 values, ~P/4 times the size
    of the attention map) is neither read nor decompressed."""
    rows = [group.native_packed(key, similarity=need_sim, attention=need_attn) for key in keys]
    out = {}
    if need_sim:
        out["teacher_sim"] = torch.from_numpy(np.stack([np.asarray(sim) for sim, _ in rows]))
    if need_attn:
        out["teacher_attn"] = torch.from_numpy(np.stack([np.asarray(attn) for _, attn in rows]))
    return out


class DistillDataset(Dataset):
    """One record -> one sample: its first image, or with images="all" every image, each
    its own block of visual tokens (distill.data.record_images).

    With a cache group, a sample carries the teacher targets the run needs, one row per
    image (need_sim: L_vis's similarity, need_attn: L_att's attention map)."""

    def __init__(self, records: list[Record], image_root, processor, num_visual_tokens: int,
                 max_length: int, group: TeacherGroup | None, pad_to_square: bool, *,
                 need_sim: bool = True, need_attn: bool = True, images: str = "first",
                 max_chars: int | None = None):
        self.records, self.image_root, self.processor = records, image_root, processor
        self.num_visual_tokens, self.max_length = num_visual_tokens, max_length
        # what a text field may hold before tokenisation (bound_text); default: what max_length tokens can
        self.max_chars = text_limit(processor.tokenizer, max_length) if max_chars is None else max_chars
        self.group, self.pad_to_square = group, pad_to_square
        self.need_sim, self.need_attn, self.images = need_sim, need_attn, images
        mean = getattr(processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
        self.pad_color = tuple(int(255 * m) for m in mean)  # as LLaVA: int(255 * mean)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        # A broken sample comes back as data, not as an exception: raised in a DataLoader
        # worker, it would reach the user wrapped in the worker's traceback text.
        try:
            return self._item(i)
        except SAMPLE_ERRORS as e:
            record = self.records[i]
            return {"index": i, "id": record.id, "key": record.images[0], "error": str(e)}

    def pixels(self, key: str) -> torch.Tensor:
        """One image as the student sees it: decoded, padded to square if the geometry
        says so, then the processor's resize/crop/normalise. [3, H, W]"""
        image = load_image(resolve_image(self.image_root, key))
        if self.pad_to_square:
            image = expand2square(image, self.pad_color)
        return self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def _item(self, i):
        record = bound_text(self.records[i], self.max_chars)  # first: nothing huge reaches the tokenizer
        keys = record_images(record, self.images)
        pixels = torch.stack([self.pixels(k) for k in keys])
        enc = encode(self.processor, record, self.num_visual_tokens, self.max_length, n_images=len(keys))
        item = {"input_ids": enc.input_ids, "labels": enc.labels, "query_rows": enc.query_rows,
                "pixel_values": pixels, "index": i}
        if self.group is not None:
            item.update(read_targets(self.group, keys, self.need_sim, self.need_attn))
        return item


def visual_layout(input_ids: torch.Tensor, image_token_id: int, num_visual_tokens: int,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the images sit in a batch of token ids: (visual_index [N, V], image_rows [N]),
    image n's V token positions and its batch row, images in sequence order (the order in
    which the model fills them with pixel_values). Raises SampleError when a row holds a
    number of image tokens that is not a whole number of images."""
    visual = input_ids == image_token_id
    if attention_mask is not None:
        visual &= attention_mask.bool()
    counts = visual.sum(1)
    if bool((counts % num_visual_tokens != 0).any()) or bool((counts == 0).any()):
        raise SampleError(f"expected a multiple of {num_visual_tokens} image tokens per sample, found "
                          f"{counts.tolist()}")
    rows, cols = visual.nonzero(as_tuple=True)                       # row-major: images in order
    visual_index = cols.view(-1, num_visual_tokens)
    image_rows = rows.view(-1, num_visual_tokens)[:, 0]
    return visual_index, image_rows


def make_collate(pad_id: int, image_token_id: int, num_visual_tokens: int):
    """Right-pads a list of samples into tensors (right padding keeps the causal
    rows of the prompt unaffected by pads); the images of all samples, in order,
    become one pixel_values [N, 3, H, W] and one row of targets each."""

    def collate(items):
        items, errors = split_errors(items)
        if errors:  # training never runs on a partial batch: the caller stops with these
            return {"errors": errors}
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        query_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = torch.tensor(it["input_ids"])
            labels[b, :n] = torch.tensor(it["labels"])
            attention_mask[b, :n] = 1
            lo, hi = it["query_rows"]
            query_mask[b, lo:hi] = True
        visual_index, image_rows = visual_layout(input_ids, image_token_id, num_visual_tokens)
        pixel_values = torch.cat([it["pixel_values"] for it in items])
        if len(visual_index) != len(pixel_values):
            raise SampleError(f"{len(visual_index)} image token blocks for {len(pixel_values)} images")
        batch = {
            "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": pixel_values, "visual_index": visual_index, "image_rows": image_rows,
            "query_mask": query_mask, "index": torch.tensor([it["index"] for it in items]),
        }
        for name in ("teacher_sim", "teacher_attn"):
            if name in items[0]:
                batch[name] = torch.cat([it[name] for it in items])
        return batch

    return collate
