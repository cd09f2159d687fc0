"""Prompts byte for byte as the originals' conversation.py renders them, their tokens as
LLaVA's tokenizer_image_token makes them, and labels as the original preprocessing masks them.

The expected strings below were derived by hand from the originals' get_prompt() (the
message layout of their preprocess_multimodal / eval scripts: "<image>\\n" + question):
    vicuna_v1, llava_v1, mistral_instruct: Aofei-Chang/MedAlign@fbefd179 llava-med-1.5/llava/conversation.py
        (conv_vicuna_v1, conv_llava_v1, conv_mistral_instruct; SeparatorStyle.TWO and LLAMA_2 branches;
        identical get_prompt in microsoft/LLaVA-Med@d406e3fc llava/conversation.py)
    huatuo_v1: Aofei-Chang/MedAlign@fbefd179 huatuoGPT_V/llava/conversation.py (conv_huatuo_v1)
    huatuo:    FreedomIntelligence/HuatuoGPT-Vision@a6476acb cli.py (preprocess_huatuo)
"""

import re

import pytest
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

from distill.data import conversation, encode
from distill.templates import CHAT_TEMPLATES, register_template
from precompute.datasets import Record

from . import originals as O

SYS_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions.")
SYS_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
ONE = (("What is this?", "Yes."),)
TWO = (("What is this?", "A chest X-ray."), ("Is there an effusion?", "No."))

# template -> (one turn with answer, one turn prompt, two turns with answers, two turns prompt for the 2nd answer)
EXPECTED = {
    "vicuna_v1": (
        f"{SYS_USER} USER: <image>\nWhat is this? ASSISTANT: Yes.</s>",
        f"{SYS_USER} USER: <image>\nWhat is this? ASSISTANT:",
        f"{SYS_USER} USER: <image>\nWhat is this? ASSISTANT: A chest X-ray.</s> USER: Is there an effusion? "
        f"ASSISTANT: No.</s>",
        f"{SYS_USER} USER: <image>\nWhat is this? ASSISTANT: A chest X-ray.</s> USER: Is there an effusion? "
        f"ASSISTANT:"),
    "llava_v1": (
        f"{SYS_HUMAN} USER: <image>\nWhat is this? ASSISTANT: Yes.</s>",
        f"{SYS_HUMAN} USER: <image>\nWhat is this? ASSISTANT:",
        f"{SYS_HUMAN} USER: <image>\nWhat is this? ASSISTANT: A chest X-ray.</s> USER: Is there an effusion? "
        f"ASSISTANT: No.</s>",
        f"{SYS_HUMAN} USER: <image>\nWhat is this? ASSISTANT: A chest X-ray.</s> USER: Is there an effusion? "
        f"ASSISTANT:"),
    "mistral_instruct": (
        "[INST] <image>\nWhat is this? [/INST] Yes. </s>",
        "[INST] <image>\nWhat is this? [/INST]",
        "[INST] <image>\nWhat is this? [/INST] A chest X-ray. </s>[INST] Is there an effusion? [/INST] No. </s>",
        "[INST] <image>\nWhat is this? [/INST] A chest X-ray. </s>[INST] Is there an effusion? [/INST]"),
    "huatuo_v1": (
        f"{SYS_USER} <|user|>: <image>\nWhat is this? <|assistant|>: Yes.<|endoftext|>",
        f"{SYS_USER} <|user|>: <image>\nWhat is this? <|assistant|>:",
        f"{SYS_USER} <|user|>: <image>\nWhat is this? <|assistant|>: A chest X-ray.<|endoftext|> <|user|>: "
        f"Is there an effusion? <|assistant|>: No.<|endoftext|>",
        f"{SYS_USER} <|user|>: <image>\nWhat is this? <|assistant|>: A chest X-ray.<|endoftext|> <|user|>: "
        f"Is there an effusion? <|assistant|>:"),
    "huatuo": (
        "<|user|>\n<image>\nWhat is this?\n<|assistant|>\nYes. \n",
        "<|user|>\n<image>\nWhat is this?\n<|assistant|>\n",
        "<|user|>\n<image>\nWhat is this?\n<|assistant|>\nA chest X-ray. \n<|user|>\nIs there an effusion?\n"
        "<|assistant|>\nNo. \n",
        "<|user|>\n<image>\nWhat is this?\n<|assistant|>\nA chest X-ray. \n<|user|>\nIs there an effusion?\n"
        "<|assistant|>\n"),
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """LLaVA-Med's tokenizer (Mistral's SentencePiece model) with the image token, as convert writes it."""
    from tokenizers import AddedToken

    folder = O.write_llava_med_tokenizer(tmp_path_factory.mktemp("tok"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=CHAT_TEMPLATES["vicuna_v1"])


def render(processor, name, turns, upto, answer):
    return processor.apply_chat_template(conversation(turns, upto, include_last_answer=answer),
                                         chat_template=CHAT_TEMPLATES[name], add_generation_prompt=not answer,
                                         tokenize=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_renderings_equal_the_originals(processor, name):
    one, one_prompt, two, two_prompt = EXPECTED[name]
    assert render(processor, name, ONE, 1, True) == one
    assert render(processor, name, ONE, 1, False) == one_prompt
    assert render(processor, name, TWO, 2, True) == two
    assert render(processor, name, TWO, 2, False) == two_prompt


def test_the_registry_refuses_a_second_template_of_one_name():
    with pytest.raises(ValueError, match="already registered"):
        register_template("vicuna_v1", "{{ messages }}")


# ----------------------------------------------------------------------------- tokens and labels

def slow_llama_tokenize(sp, text: str) -> list[int]:
    """transformers' slow LlamaTokenizer with legacy=False (what MedAlign's training loads:
    use_fast=False), written out on SentencePiece: BOS; the text split at special tokens;
    "▁" put in front of the text; a piece starting with "▁"/space is encoded behind <unk>
    (so SentencePiece adds no second word-start), any other piece as it is."""
    ids = [1]
    text = "▁" + text.replace("▁", " ")
    unk = sp.encode("<unk>")
    for piece in re.split(r"(</s>)", text):
        if piece == "</s>":
            ids.append(2)
        elif piece:
            ids += sp.encode("<unk>" + piece)[len(unk):] if piece.startswith(("▁", " ")) else sp.encode(piece)
    if len(ids) > 2 and ids[1] == 28705 and ids[2] == 2:  # a lone "▁" before a special token is dropped
        ids.pop(1)
    return ids


def tokenizer_image_token(sp, prompt: str, image=-200) -> list[int]:
    """llava/mm_utils.py tokenizer_image_token on the slow tokenizer."""
    chunks = [slow_llama_tokenize(sp, c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, c in enumerate(chunks):
        if i:
            ids.append(image)
        ids += c[1:]
    return ids


def original_v1_labels(sp, conversation_text: str, ids: list[int]) -> list[int]:
    """MedAlign llava-med-1.5/llava/train/train.py preprocess_v1's masking (legacy=False,
    tokenizers >= 0.14), on a prompt with one image."""
    target = list(ids)
    rounds = conversation_text.split("</s>")
    cur = 1
    target[:cur] = [-100]
    sep = " ASSISTANT: "
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(sp, rou))
        instruction_len = len(tokenizer_image_token(sp, parts[0])) - 2
        if i != 0:
            round_len -= 1
            instruction_len -= 1
        target[cur:cur + instruction_len] = [-100] * instruction_len
        cur += round_len
    target[cur:] = [-100] * (len(target) - cur)
    assert cur == len(ids), "the original would flag a tokenization mismatch"
    return target


@pytest.mark.parametrize("turns", [ONE, TWO], ids=["one turn", "two turns"])
def test_vicuna_v1_tokens_and_labels_equal_the_original_preprocessing(processor, turns):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(O.mistral_sentencepiece()))
    record = Record(id="r", images=("x.png",), turns=turns, task="vqa")
    enc = encode(processor, record, num_visual_tokens=4, max_length=4096)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    text = EXPECTED["vicuna_v1"][0 if turns is ONE else 2]
    expected = tokenizer_image_token(sp, text)
    assert expected[expected.index(-200) + 1] == 28705     # the "▁" that begins the text after the image
    ours = [x for i, x in enumerate(enc.input_ids) if x != image_id or enc.input_ids[i - 1] != image_id]
    assert [-200 if x == image_id else x for x in ours] == expected
    original = original_v1_labels(sp, text, expected)
    k = expected.index(-200)
    assert enc.labels[:k] + enc.labels[k + 4:] == original[:k] + original[k + 1:]
    learned = processor.tokenizer.decode([x for x in enc.labels if x != -100])
    assert learned == ("Yes.</s>" if turns is ONE else "A chest X-ray.</s> No.</s>")   # decode keeps "▁No"
