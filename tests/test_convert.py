"""`medalign-distill convert` on tiny checkpoints written in the originals' exact layouts
(tests/originals.py): the converted student computes what the original code computes,
and trains, evaluates and draws pictures through the normal commands."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distill.cli import main as distill_cli
from distill.convert import ConvertError, convert
from distill.data import DistillDataset
from distill.student import StudentError, load_student, student_geometry
from precompute.cli import main as cache_cli
from precompute.datasets import Record

from . import originals as O

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return O.write_clip(tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14-336")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, clip):
    """Both students converted through the real CLI: {name: (source, converted folder, CLI output)}."""
    out = {}
    for name, write in (("llava-med", O.write_llava_med), ("huatuo", O.write_huatuo)):
        src = write(tmp_path_factory.mktemp("src") / name)
        dest = tmp_path_factory.mktemp("hf") / f"{name}-hf"
        r = invoke(distill_cli, "convert", "--model", src, "--vision-tower", clip, "--out", dest, "--quiet")
        assert r.exit_code == 0, r.output
        out[name] = (src, dest, r.output)
    return out


@pytest.fixture()
def scan(tmp_path):
    """A non-square image, so padding to square matters."""
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((40, 70, 3)) * 255).astype(np.uint8)).save(tmp_path / "scan.png")
    return tmp_path


def _prompt_and_pixels(student, dest, root):
    """The prompt ids and pixel values of the converted student in `dest` for root/scan.png,
    in the geometry its conversion declares."""
    record = Record(id="q1", images=("scan.png",), turns=(("What is shown?", "A lung."),), task="vqa")
    item = DistillDataset([record], root, student.processor, student.num_visual_tokens, 1024, None,
                          pad_to_square=student_geometry(dest))[0]
    return item["input_ids"][:item["query_rows"][1]], item["pixel_values"][0]   # its one image


def _collapse(ids, image_token_id):
    """Visual tokens -> one placeholder, as in the original's input_ids (IMAGE_TOKEN_INDEX)."""
    out = []
    for x in ids:
        if x == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(x)
    return out


def test_llava_med_computes_what_the_original_computes(converted, clip, scan):
    import sentencepiece as spm

    src, dest, output = converted["llava-med"]
    student = load_student(str(dest))
    assert (student.chat_template, student_geometry(dest), student.grid) == ("vicuna_v1", True, 4)
    record = json.loads((dest / "medalign.json").read_text())
    assert record["vision_tower"]["weights_from"] == "clip_folder"
    assert record["vision_tower"]["checkpoint_copy_vs_clip_folder"]["identical"] is False
    assert "differs from the CLIP folder" in output and "id 32000" in output

    prompt, pixels = _prompt_and_pixels(student, dest, scan)
    # The pixels: an independent expand2square with the CLIP mean + CLIP's PIL preprocessing.
    reference_pixels = O.clip_pixels_reference(Image.open(scan / "scan.png"), pad=True)
    torch.testing.assert_close(pixels, reference_pixels, rtol=0, atol=1e-6)
    # The tokens: MedAlign's vicuna_v1 prompt, each side of <image> tokenised alone by
    # SentencePiece itself (llava/mm_utils.py tokenizer_image_token); 28705 is the "▁"
    # a joint tokenisation of "<image>\n..." would drop.
    sp = spm.SentencePieceProcessor(model_file=str(O.mistral_sentencepiece()))
    before, after = f"{VICUNA} USER: <image>\nWhat is shown? ASSISTANT:".split("<image>")
    chunks = [[1] + sp.encode(before), sp.encode(after)]
    assert chunks[1][:2] == [28705, 13]
    assert _collapse(prompt, student.image_token_id) == chunks[0] + [student.image_token_id] + chunks[1]
    assert prompt.count(student.image_token_id) == 16

    reference = O.original_logits(src, O.clip_folder_tower(clip), reference_pixels, chunks)
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([prompt]), pixel_values=pixels[None]).logits[0]
    assert logits.shape == (len(prompt), 32001)                          # + the image token's row
    torch.testing.assert_close(logits[:, :32000], reference, rtol=1e-5, atol=1e-5)


def test_huatuo_computes_what_the_original_computes(converted, scan):
    src, dest, output = converted["huatuo"]
    student = load_student(str(dest))
    assert (student.chat_template, student_geometry(dest)) == ("huatuo_v1", True)
    record = json.loads((dest / "medalign.json").read_text())
    assert record["vision_tower"]["weights_from"] == "checkpoint"          # HuatuoGPT-Vision's own copy
    assert record["vocab_size"] == record["original_vocab_size"]           # Qwen2's padded vocab has room
    prompt, pixels = _prompt_and_pixels(student, dest, scan)
    tok = O.qwen_tokenizer()                                              # no BOS: pieces as they are
    before, after = (f"{VICUNA} <|user|>: <image>\nWhat is shown? <|assistant|>:").split("<image>")
    chunks = [tok(before)["input_ids"], tok(after)["input_ids"]]
    assert _collapse(prompt, student.image_token_id) == chunks[0] + [student.image_token_id] + chunks[1]
    reference_pixels = O.clip_pixels_reference(Image.open(scan / "scan.png"), pad=True)
    reference = O.original_logits(src, O.checkpoint_tower(src), reference_pixels, chunks)
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([prompt]), pixel_values=pixels[None]).logits[0]
    V = record["original_vocab_size"]
    torch.testing.assert_close(logits[:, :V], reference, rtol=1e-5, atol=1e-5)
    assert "differs from the CLIP folder" in output


@pytest.mark.parametrize("field,value", [
    ("mm_projector_type", "linear"),
    ("mm_vision_select_feature", "cls_patch"),
    ("mm_use_im_start_end", True),
    ("mm_use_im_patch_token", True),
    ("mm_patch_merge_type", "spatial_unpad"),
    ("image_aspect_ratio", "anyres"),
])
def test_fields_it_cannot_reproduce_are_refused_by_name(tmp_path, clip, field, value):
    src = tmp_path / "src"
    O.write_llava_med(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, field: value}))
    r = invoke(distill_cli, "convert", "--model", src, "--vision-tower", clip, "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{field} = {value!r} is not supported" in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_vision_tower_names_the_download(tmp_path):
    src = O.write_llava_med(tmp_path / "src")
    with pytest.raises(ConvertError, match="openai/clip-vit-large-patch14-336.*--vision-tower"):
        convert(src, tmp_path / "out", progress=False)


def test_run_on_an_unconverted_student_gives_the_convert_command(tmp_path):
    src = O.write_llava_med(tmp_path / "llava-med")
    with pytest.raises(StudentError, match=r"medalign-distill convert --model .*llava-med --vision-tower"):
        load_student(str(src))


@pytest.mark.parametrize("name", ["llava-med", "huatuo"])
def test_converted_students_train_evaluate_and_draw(converted, name, tmp_path):
    """The normal commands on a converted student: the cache is built with its geometry
    (padded), a geometry mismatch is refused with the command that fixes it."""
    _, dest, _ = converted[name]
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(root / f"s{i}.png")
        items.append({"id": f"q{i}", "image": f"s{i}.png", "answer_type": "CLOSED", "conversations": [
            {"from": "human", "value": "<image>\nIs there an effusion?"},
            {"from": "gpt", "value": "yes" if i % 2 else "no"}]})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(items))
    cache = tmp_path / "cache"
    common = ["--data", data, "--image-root", root]
    assert invoke(cache_cli, "build", "--teacher", "tiny", "--random-init", *common, "--cache", cache,
                  "--workers", 0, "--quiet").exit_code == 0
    train = ["run", "--cache", cache, "--teacher", "tiny", "--student", dest, *common, "--layer", 2,
             "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--workers", 0, "--quiet"]
    r = invoke(distill_cli, *train, "--out", tmp_path / "refused")
    assert r.exit_code == 1 and "--pad-to-square" in r.output and "medalign-cache build" in r.output, r.output
    assert not (tmp_path / "refused" / "config.json").exists()

    padded = tmp_path / "cache-pad"
    assert invoke(cache_cli, "build", "--teacher", "tiny", "--random-init", *common, "--cache", padded,
                  "--pad-to-square", "--workers", 0, "--quiet").exit_code == 0
    out = tmp_path / "run"
    train[2] = padded
    r = invoke(distill_cli, *train, "--out", out)
    assert r.exit_code == 0, r.output
    student = json.loads((out / "student.json").read_text())
    assert student["chat_template"] == ("vicuna_v1" if name == "llava-med" else "huatuo_v1")
    assert student["pad_to_square"] is True
    r = invoke(distill_cli, "eval", "--run", out, *common, "--workers", 0, "--max-new-tokens", 4, "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "eval" / "train" / "metrics.json").read_text())
    assert metrics["vqa"]["closed"]["n"] == 4 and metrics["vqa"]["closed"]["accuracy_medalign"] is not None
    r = invoke(distill_cli, "pictures", "--run", out, *common, "--n", 2, "--tsne-n", 4, "--out", out / "pictures")
    assert r.exit_code == 0, r.output
    assert (out / "pictures" / "attention.png").is_file()


def test_llava_llama_converts_too(tmp_path, clip, scan):
    """LLaVA v1.5's own layout (model_type llava_llama, LlamaForCausalLM weights): the same path."""
    import sentencepiece as spm

    src = O.write_llava_med(tmp_path / "llava-llama", model_type="llava_llama",
                            architectures=["LlavaLlamaForCausalLM"])
    dest = tmp_path / "hf"
    convert(src, dest, vision_tower=clip, progress=False)
    student = load_student(str(dest))
    prompt, pixels = _prompt_and_pixels(student, dest, scan)
    sp = spm.SentencePieceProcessor(model_file=str(O.mistral_sentencepiece()))
    before, after = f"{VICUNA} USER: <image>\nWhat is shown? ASSISTANT:".split("<image>")
    chunks = [[1] + sp.encode(before), sp.encode(after)]
    reference = O.original_logits(src, O.clip_folder_tower(clip), pixels, chunks)
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([prompt]), pixel_values=pixels[None]).logits[0]
    assert type(student.model.model.language_model).__name__ == "LlamaModel"
    torch.testing.assert_close(logits[:, :32000], reference, rtol=1e-5, atol=1e-5)
