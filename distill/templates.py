"""Prompts exactly as the students' original code builds them, and their tokenisation.

A student is trained (and evaluated) on text laid out by its own training code. A
converted LLaVA-Med or HuatuoGPT-Vision checkpoint must therefore see, byte for byte,
the prompts of the originals' `conversation.py`; a different system line or one
missing space is a different input distribution. The named templates below are
Jinja chat templates (what transformers' `apply_chat_template` renders and what
`medalign-distill convert` writes into a converted folder), one per original
conversation, each re-creating its separator style:

    vicuna_v1         MedAlign's `--version v1` for LLaVA-Med (conv_vicuna_v1):
                      "<sys> USER: <image>\\nQ ASSISTANT: A</s> USER: ..."
    llava_v1          LLaVA's conv_llava_v1, the "curious human" system line, same style
    mistral_instruct  LLaVA-Med's own eval (conv_mistral_instruct, LLAMA_2 style, no system):
                      "[INST] <image>\\nQ [/INST] A </s>[INST] ..."
    huatuo_v1         MedAlign's HuatuoGPT-Vision conversation (conv_huatuo_v1):
                      "<sys> <|user|>: <image>\\nQ <|assistant|>: A<|endoftext|> <|user|>: ..."
    huatuo            HuatuoGPT-Vision's native prompt (cli.py, preprocess_huatuo):
                      "<|user|>\\n<image>\\nQ\\n<|assistant|>\\nA \\n<|user|>\\n..."

Sources (read at these commits; tests/test_templates.py holds their renderings):
    Aofei-Chang/MedAlign fbefd179: llava-med-1.5/llava/conversation.py, huatuoGPT_V/llava/conversation.py
    microsoft/LLaVA-Med  d406e3fc: llava/conversation.py (same get_prompt as MedAlign's)
    FreedomIntelligence/HuatuoGPT-Vision a6476acb: cli.py

The "TWO" style of LLaVA-Med/MedAlign differs from upstream LLaVA's: every message is
stripped, the end marker is followed by a space ("</s> USER: ..."), and the whole
prompt is stripped, so a prompt without an answer ends in "ASSISTANT:". The image
goes first in its message as "<image>\\n" (LLaVA's preprocess_multimodal).

Tokenisation (`tokenize_prompt`) follows LLaVA's `tokenizer_image_token`: the text
is split at each image placeholder and every piece is tokenised ON ITS OWN (so the
piece after the image starts with SentencePiece's word-start token "▁", which a
tokenisation of the joined text would drop), the BOS the tokenizer puts on every
piece is kept once, at the start.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- templates

# The text of one message: "<image>\n" per image part, then its text parts. Records
# are stripped when read (precompute.datasets), as LLaVA's preprocessing strips the
# message that carries the image.
_MESSAGE_TEXT = (
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(images='', text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.images = parts.images + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = parts.images + (parts.text | trim) -%}{%- endif -%}"
)


def _jinja_str(s: str) -> str:
    """A Python string as a single-quoted Jinja literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _two_style(system: str, user: str, assistant: str, end: str) -> str:
    """conversation.py's SeparatorStyle.TWO as LLaVA-Med/MedAlign write it:
    system + " ", then "ROLE: message.strip()" followed by " " (user) or end + " "
    (assistant), "ASSISTANT:" for the answer to come, and the whole text stripped."""
    return (
        "{%- set ns = namespace(out=" + _jinja_str(system + " ") + ") -%}"
        "{%- for message in messages -%}" + _MESSAGE_TEXT +
        "{%- if message['role'] == 'user' -%}"
        "{%- set ns.out = ns.out + " + _jinja_str(user + ": ") + " + (text | trim) + ' ' -%}"
        "{%- else -%}"
        "{%- set ns.out = ns.out + " + _jinja_str(assistant + ": ") + " + (text | trim) + "
        + _jinja_str(end + " ") + " -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{%- set ns.out = ns.out + " + _jinja_str(assistant + ":") + " -%}"
        "{%- endif -%}{{- ns.out | trim -}}"
    )


def _llama2_style(end: str) -> str:
    """SeparatorStyle.LLAMA_2 with an empty system line and sep "" (conv_mistral_instruct):
    "[INST] message [/INST]" for the user, " answer " + end for the assistant."""
    return (
        "{%- for message in messages -%}" + _MESSAGE_TEXT +
        "{%- if message['role'] == 'user' -%}{{- '[INST] ' + text + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + text + ' ' + " + _jinja_str(end) + " -}}{%- endif -%}"
        "{%- endfor -%}"
    )


def _huatuo_native() -> str:
    """HuatuoGPT-Vision's cli.py: "<|user|>\\n" + message.strip() + "\\n", then
    "<|assistant|>\\n" + answer + " \\n" (the answer to come: "<|assistant|>\\n")."""
    return (
        "{%- for message in messages -%}" + _MESSAGE_TEXT +
        "{%- if message['role'] == 'user' -%}{{- '<|user|>\\n' + (text | trim) + '\\n' -}}"
        "{%- else -%}{{- '<|assistant|>\\n' + text + ' \\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    )


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

CHAT_TEMPLATES: dict[str, str] = {}


def register_template(name: str, template: str) -> None:
    """Add a named template; a name is registered once (a silent overwrite would change
    the prompts of every run that names it)."""
    if name in CHAT_TEMPLATES:
        raise ValueError(f"chat template {name!r} is already registered")
    CHAT_TEMPLATES[name] = template


register_template("vicuna_v1", _two_style(_VICUNA_SYSTEM, "USER", "ASSISTANT", "</s>"))
register_template("llava_v1", _two_style(_LLAVA_SYSTEM, "USER", "ASSISTANT", "</s>"))
register_template("mistral_instruct", _llama2_style("</s>"))
register_template("huatuo_v1", _two_style(_VICUNA_SYSTEM, "<|user|>", "<|assistant|>", "<|endoftext|>"))
register_template("huatuo", _huatuo_native())


def template_name(template: str | None) -> str | None:
    """The registered name of a template text, or None for a checkpoint's own template."""
    return next((name for name, text in CHAT_TEMPLATES.items() if text == template), None)


# ----------------------------------------------------------------------------- tokenisation

def tokenize_prompt(tokenizer, text: str, image_token: str, image_token_id: int) -> list[int]:
    """Token ids of `text` as LLaVA's `tokenizer_image_token` makes them, with one
    `image_token_id` per image placeholder (the caller expands it to the visual tokens).

    Each piece between placeholders is tokenised alone with the tokenizer's special
    tokens (BOS for Llama/Mistral tokenizers, nothing for Qwen2's); when the first piece
    starts with BOS, that first token is dropped from every later piece."""
    pieces = [tokenizer(piece)["input_ids"] for piece in text.split(image_token)]
    bos = tokenizer.bos_token_id
    skip = 1 if bos is not None and pieces[0][:1] == [bos] else 0
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids.append(image_token_id)
        ids.extend(piece[skip:])
    return ids
