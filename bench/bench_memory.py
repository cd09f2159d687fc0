"""Peak memory of one training step at the real students' width, measured side by side for
the reference approach, ours in bf16 and ours with a 4-bit language model, on students of
2, 3 and 4 decoder layers, and extrapolated to the real depth from the measured per-layer
slope.

    .venv/bin/python bench/bench_memory.py                  # CPU: LLaVA-Med shapes, batch 1 (~10 min on 2 cores)
    .venv/bin/python bench/bench_memory.py --arch llava-med,qwen2 --batches 1,2,4
    .venv/bin/python bench/bench_memory.py --device cuda --arch llava-med,qwen2 --batches 1,2,4 --layers 2,4,8

Students (random weights, written once to a temporary folder): the real layer shapes of
  llava-med  LLaVA-Med v1.5 = Mistral-7B: hidden 4096, 32 heads / 8 KV heads, MLP 14336,
             vocab 32000, 32 layers
  qwen2      HuatuoGPT-Vision-7B = Qwen2-7B: hidden 3584, 28 heads / 4 KV heads, MLP 18944,
             vocab 152064, q/k/v biases, 28 layers
each behind the CLIP-L/14-336 tower of both (24 layers, 1024 wide, 336 px -> 576 visual
tokens, feature layer -2) and LLaVA-1.5's 2-layer GELU projector, but only 2, 3 or 4
decoder layers. (Not 1: MedAlign needs two, the transform at layer l-1 and the attention
at layer l; here l = 1 in every student, so the tap's cost sits in the intercept.)

One training step as train.py runs it on a GPU: sequence 1024 (576 visual tokens, the
prompt after them, a 128-token answer), LoRA r 64 / alpha 16 / dropout 0.05 on every
linear layer of the language model, the full D x D alignment transform, L_ntp + L_vis +
L_att (alpha 1, beta 0.03) against cache-format targets, non-reentrant activation
checkpointing, bf16 weights under bf16 autocast, AdamW (its state exists already, as in
every step after the first), gradient clipping. The approaches:
  reference  eager attention in EVERY layer, output_attentions=True, L_att read from the
             returned weights of layer l (what the reference implementation does)
  bf16       ours: SDPA in every layer, the one-layer attention tap (distill.student), the
             LM head only at the answer's positions (logits_to_keep; --all-logits: every one)
  4bit       ours with --quantize 4bit: the language model's linear layers NF4 with double
             quantisation (bitsandbytes), computing in bf16 (distill.precision)

Memory = the peak, over the step, of the bytes of all live tensors (weights, LoRA and
optimiser state, inputs, activations, gradients, temporaries), which is what
torch.cuda.max_memory_allocated reports on a GPU:
  --device cuda  torch.cuda.max_memory_allocated (peak stats reset before the step)
  CPU            a TorchDispatchMode that sees every tensor each ATen op returns, and the
                 tensors alive when the step starts, and sums the bytes of their storages
                 (each storage once, however many views) until a storage is freed (a weak
                 reference to it; torch keeps one Python object per storage). It counts
                 what the GPU allocator would hold for the same ops; it does not see
                 buffers an op allocates and frees inside itself (cuBLAS/cuDNN workspaces
                 on a GPU). One such buffer is added by hand: bitsandbytes' 4-bit matmul op
                 dequantizes the weight inside itself in the forward (<= 0.12 GB here; the
                 backward dequantizes with a separate op, which is seen), and on a GPU it
                 does the same for more than 1536 tokens per matmul (a fused kernel for
                 fewer, on some GPUs): the dequantized weight is counted as live during
                 the op, an upper bound for the GPU. Measured with the CPU's own bf16
                 kernels: same ops and dtypes as on a GPU, except that SDPA runs the CPU
                 flash kernel (which, like the GPU ones, keeps no T x T matrix) and CPU
                 autocast's op lists.
Extrapolation: per approach, architecture and batch, least squares peak = a + b * layers
over the measured depths; the fit's largest residual on the measured points is printed
beside it. Every number is labelled measured or extrapolated.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GiB = 2 ** 30
ARCHS = {
    "llava-med": dict(title="LLaVA-Med v1.5 7B (Mistral-7B)", family="mistral", hidden=4096, heads=32, kv_heads=8,
                      mlp=14336, vocab=32000, depth=32),
    "qwen2": dict(title="HuatuoGPT-Vision-7B (Qwen2-7B)", family="qwen2", hidden=3584, heads=28, kv_heads=4,
                  mlp=18944, vocab=152064, depth=28),
}
APPROACHES = ("reference", "bf16", "4bit")
SEQ, VISUAL, ANSWER, PROMPT_START = 1024, 576, 128, 5      # tokens: BOS + 4 prompt, image, prompt, answer
IMAGE, PATCH = 336, 14
LAYER = 1
LORA_R, LORA_ALPHA, LORA_DROPOUT = 64, 16, 0.05
ALPHA, BETA = 1.0, 0.03
GOALS = {"4bit": 16, "bf16": 24}   # GiB for LLaVA-Med 7B + MedAlign, batch 1, length 1024 (a 16 / 24 GB GPU)


# ----------------------------------------------------------------------------- the students

def write_student(out: Path, arch: str, layers: int) -> Path:
    """A random student of `arch`'s shapes with `layers` decoder layers, bf16 safetensors,
    with a processor (the tiny byte-level tokenizer: token ids, not text, matter here)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, MistralConfig, Qwen2Config)

    from distill.student import _tiny_tokenizer
    from distill.templates import CHAT_TEMPLATES

    a = ARCHS[arch]
    tokenizer = _tiny_tokenizer()
    vision = CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    common = dict(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"], num_hidden_layers=layers,
                  num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"], max_position_embeddings=4096,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    text = MistralConfig(sliding_window=None, **common) if a["family"] == "mistral" else Qwen2Config(**common)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=VISUAL, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    # Built on the meta device and filled in bf16: no fp32 copy of billions of parameters.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(dtype)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
                   chat_template=CHAT_TEMPLATES["mistral_instruct"]).save_pretrained(out)
    return out


def fewer_layers(full: Path, out: Path, layers: int) -> Path:
    """The first `layers` decoder layers of a written student: its files linked, config.json
    edited (transformers loads the layers it has and ignores the others' weights)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in full.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    config = json.loads((full / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers
    config["text_config"].pop("layer_types", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# ----------------------------------------------------------------------------- counting live tensors

class LiveTensorBytes:
    """The peak of the bytes of live tensors over a stretch of code, on CPU (module docstring).

    A TorchDispatchMode sees every tensor each ATen op returns, in the forward and in the
    backward (autograd runs it with the mode on); each storage is counted once, from its
    first appearance until torch frees it (weakref.finalize on the storage)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        gemm_4bit = getattr(torch.ops.bitsandbytes, "gemm_4bit", None) if "bitsandbytes" in sys.modules else None
        gemm_4bit = gemm_4bit.default if gemm_4bit is not None else None

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track_all(out)
                if func is gemm_4bit:  # its dequantized weight lives inside the op (module docstring)
                    tracker.peak = max(tracker.peak, tracker.now + math.prod(args[2]) * args[0].element_size())
                return out

        self.mode = Mode()

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def _track(self, t) -> None:
        import torch
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (none expected here)
            return
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _track_all(self, tree) -> None:
        from torch.utils._pytree import tree_flatten
        for t in tree_flatten(tree)[0]:
            self._track(t)

    def __enter__(self):
        import torch
        gc.collect()
        # Every tensor alive now (weights, quantization states, LoRA, optimiser state, inputs).
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                self._track(obj)
        self.baseline = self.now  # the field bench_distill.CudaPeak has too
        self.peak = self.now
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


# ----------------------------------------------------------------------------- one measurement

def synthetic_batch(batch: int, vocab: int, image_token_id: int):
    """The tensors a training batch holds: BOS + 4 prompt tokens, 576 image tokens, the
    prompt after the image, a 128-token answer (learned), cache-format teacher targets
    (packed fp16 similarity, fp32 attention) at the student's 24 x 24 grid."""
    import torch

    from precompute.targets import pack_upper, patch_similarity
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, SEQ), generator=g)
    ids[:, 0] = 0
    vis = torch.arange(PROMPT_START, PROMPT_START + VISUAL)
    ids[:, vis] = image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, SEQ - ANSWER:] = ids[:, SEQ - ANSWER:]
    query = torch.zeros(batch, SEQ, dtype=torch.bool)
    query[:, PROMPT_START + VISUAL:SEQ - ANSWER] = True
    tokens = torch.randn(batch, VISUAL, 64, generator=g)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
            "visual_index": vis[None].expand(batch, -1).contiguous(), "query_mask": query,
            "teacher_sim": pack_upper(patch_similarity(tokens)).half(),
            "teacher_attn": torch.randn(batch, VISUAL, generator=g).softmax(-1)}


def all_positions_next_token_loss(logits, labels, never=None):
    """distill.losses.next_token_loss before it upcast only the learned rows (for --ntp-all-positions):
    float32 copies of the whole [B, T, vocab] logits, the softmax over every position."""
    import torch
    import torch.nn.functional as F
    flat = logits[:, :-1].flatten(0, 1).float()
    if never is not None:
        flat = flat.index_fill(1, torch.tensor([never], device=flat.device), float("-inf"))
    return F.cross_entropy(flat, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def measure(student_dir: Path, approach: str, batch: int, device_name: str, threads: int,
            ntp_all_positions: bool = False, all_logits: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bench_distill import CudaPeak, reference_prompt_attention

    from distill.losses import attention_distill_loss, learned_positions, next_token_loss, visual_alignment_loss
    if ntp_all_positions:
        next_token_loss = all_positions_next_token_loss  # noqa: F811
    from distill.precision import autocast, prepare_for_kbit_training
    from distill.student import AlignmentTransform, DistillTap, apply_lora, load_student
    from distill.train import enable_gradient_checkpointing, teacher_targets_on_device

    device = torch.device(device_name)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    student = load_student(str(student_dir), dtype=torch.bfloat16, device=str(device),
                           attn_implementation="eager" if approach == "reference" else "sdpa",
                           quantize="4bit" if approach == "4bit" else None)
    if approach == "4bit":
        student.model = prepare_for_kbit_training(student.model, torch.bfloat16)
    apply_lora(student, r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT)
    model = student.model
    transform = AlignmentTransform(student.hidden_size).to(device)
    tap = DistillTap(student, LAYER, transform, capture_attention=approach != "reference")
    enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(transform.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    for p in params:  # the optimiser state every step after the first holds (a zero step: nothing moves)
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    vocab = model.get_input_embeddings().weight.shape[0]
    b = {k: v.to(device) for k, v in synthetic_batch(batch, vocab, student.image_token_id).items()}
    b["pixel_values"] = b["pixel_values"].to(model.dtype)
    n_tokens = float((b["labels"][:, 1:] != -100).sum())
    # ours: the LM head projects only the answer's positions, as train.py asks it to; the
    # reference (and --all-logits, --ntp-all-positions) computes every position's logits
    every = approach == "reference" or all_logits or ntp_all_positions
    keep = 0 if every else learned_positions(b["labels"])
    load_s = time.perf_counter() - t0

    def step() -> float:
        tap.set_batch(b["visual_index"], b["query_mask"])
        with autocast(device, "bf16"):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                        output_attentions=approach == "reference", logits_to_keep=keep)
        ntp = next_token_loss(out.logits, b["labels"], never=student.image_token_id)
        sim_t, attn_t = teacher_targets_on_device(b, student.grid, student.grid, device, True, True)
        vis = visual_alignment_loss(tap.aligned_visual.float(), sim_t)
        a_s = reference_prompt_attention(out.attentions[LAYER], b["query_mask"], b["visual_index"]) \
            if approach == "reference" else tap.visual_attention
        att = attention_distill_loss(a_s.float(), attn_t)
        loss = ntp / n_tokens + ALPHA * vis + BETA * att
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    gc.collect()
    t1 = time.perf_counter()
    with (CudaPeak() if device.type == "cuda" else LiveTensorBytes()) as mem:
        loss = step()
    return {"approach": approach, "layers": student.num_layers, "batch": batch, "peak": mem.peak,
            "start": mem.baseline, "loss": loss, "step_s": time.perf_counter() - t1, "load_s": load_s,
            "trainable": sum(p.numel() for p in params), "device": device_name}


# ----------------------------------------------------------------------------- the driver

def spawn(student_dir: Path, approach: str, batch: int, device: str, threads: int, ntp_all_positions: bool,
          all_logits: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(
        {"student": str(student_dir), "approach": approach, "batch": batch, "device": device, "threads": threads,
         "ntp_all_positions": ntp_all_positions, "all_logits": all_logits})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{approach} {student_dir.name} batch {batch} failed (rc {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns a, b and the largest |residual| on the points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    return a, b, max(abs(a + b * x - y) for x, y in points)


def size(n: float) -> str:
    """A residual in bytes, readable (the byte counts on CPU are exact: it can be 0 B)."""
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def report(results: list[dict], archs, layers, batches, device: str, elapsed: float,
           ntp_all_positions: bool = False, all_logits: bool = False) -> None:
    g = lambda x: x / GiB  # noqa: E731  (GPU memory comes in GiB: a "16 GB" card holds 16 GiB)
    print(f"\npeak memory of one training step, GiB; sequence {SEQ} ({VISUAL} visual tokens), LoRA r "
          f"{LORA_R} on every LLM linear + full alignment transform, L_ntp + L_vis + L_att, non-reentrant activation "
          f"checkpointing, bf16 (+ bf16 autocast), AdamW state present. device: {device}; "
          f"{'live-tensor bytes (TorchDispatchMode)' if device == 'cpu' else 'torch.cuda.max_memory_allocated'}."
          + (" NEXT-TOKEN LOSS AS BEFORE ISSUE 13 (float32 logits of every position)." if ntp_all_positions else "")
          + (" LM HEAD AT EVERY POSITION (no logits_to_keep)." if all_logits else ""))
    for arch in archs:
        a = ARCHS[arch]
        rows = [r for r in results if r["arch"] == arch]
        print(f"\n== {a['title']}: hidden {a['hidden']}, {a['heads']} heads / {a['kv_heads']} KV, MLP {a['mlp']}, "
              f"vocab {a['vocab']}; CLIP-L/14-336 tower; {a['depth']} layers in the real model")
        print("measured:")
        print(f"  {'batch':>5} {'layers':>6} " + " ".join(f"{ap:>10}" for ap in APPROACHES)
              + "   reference/bf16  bf16/4bit")
        for batch in batches:
            for n in layers:
                m = {r["approach"]: r["peak"] for r in rows if r["batch"] == batch and r["layers"] == n}
                if not m:
                    continue
                cells = " ".join(f"{g(m[ap]):>10.2f}" if ap in m else f"{'-':>10}" for ap in APPROACHES)
                ratio = lambda x, y: f"{m[x] / m[y]:.2f}x" if x in m and y in m else "-"  # noqa: E731
                print(f"  {batch:>5} {n:>6} {cells}   {ratio('reference', 'bf16'):>14} {ratio('bf16', '4bit'):>10}")
        print(f"extrapolated to {a['depth']} layers (least squares over the measured depths; largest residual there):")
        print(f"  {'batch':>5} " + " ".join(f"{ap:>22}" for ap in APPROACHES) + "   per layer (GiB): "
              + " / ".join(APPROACHES))
        for batch in batches:
            cells, slopes = [], []
            for ap in APPROACHES:
                pts = [(r["layers"], r["peak"]) for r in rows if r["batch"] == batch and r["approach"] == ap]
                if len(pts) < 2:
                    cells.append(f"{'-':>22}")
                    slopes.append("-")
                    continue
                a0, b0, res = fit(pts)
                cells.append(f"{g(a0 + b0 * a['depth']):.2f} (±{size(res)})".rjust(22))
                slopes.append(f"{g(b0):.3f}")
            print(f"  {batch:>5} " + " ".join(cells) + "   " + " / ".join(slopes))
        starts = []
        for ap in APPROACHES:
            pts = [(r["layers"], r["start"]) for r in rows if r["batch"] == min(batches) and r["approach"] == ap]
            starts.append(f"{g(fit(pts)[0] + fit(pts)[1] * a['depth']):.2f}" if len(pts) >= 2 else "-")
        print(f"  of which held before the step starts (weights, LoRA + AdamW state, batch {min(batches)}): "
              + " / ".join(starts) + " GiB")
        if arch == "llava-med" and 1 in batches:
            print("goals (LLaVA-Med 7B + MedAlign, batch 1, length 1024):")
            for ap, limit in GOALS.items():
                pts = [(r["layers"], r["peak"]) for r in rows if r["batch"] == 1 and r["approach"] == ap]
                if len(pts) >= 2:
                    a0, b0, _ = fit(pts)
                    v = g(a0 + b0 * a["depth"])
                    print(f"  {ap:<5} {v:6.2f} GiB < {limit} GiB: {'MET' if v < limit else 'NOT MET'} "
                          f"(extrapolated from {len(pts)} measured depths; the CUDA context and the caching "
                          f"allocator's reserve come on top)")
    print(f"\n({len(results)} measurements, each in a fresh process; {elapsed / 60:.1f} min in all)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="llava-med", help="comma-separated: llava-med, qwen2 [llava-med]")
    p.add_argument("--layers", default="2,3,4", help="decoder layers of the measured students [2,3,4]")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes [1]")
    p.add_argument("--approaches", default=",".join(APPROACHES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (CPU)")
    p.add_argument("--work", default=None, help="folder for the students [a temporary one]")
    p.add_argument("--ntp-all-positions", action="store_true",
                   help="the next-token loss as before issue 13: float32 logits of every position, not only "
                        "the answer's (to measure what that change saved)")
    p.add_argument("--all-logits", action="store_true",
                   help="ours computes the LM head at every position, not only the answer's (logits_to_keep): "
                        "to measure what that saves")
    p.add_argument("--json", default=None, help="also write the measurements here (each as it is taken)")
    p.add_argument("--report", default=None, help="only print the report of measurements a --json run wrote")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-student", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_student:
        out, arch, n = json.loads(args.write_student)
        write_student(Path(out), arch, n)
        return
    if args.worker:
        import warnings
        warnings.filterwarnings("ignore")
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        w = json.loads(args.worker)
        print("RESULT " + json.dumps(measure(Path(w["student"]), w["approach"], w["batch"], w["device"],
                                             w["threads"], w["ntp_all_positions"], w["all_logits"])), flush=True)
        return

    if args.report:
        saved = json.loads(Path(args.report).read_text())
        results = saved["results"]
        report(results, saved["archs"], saved["layers"], saved["batches"], saved["device"], saved["seconds"],
               saved.get("ntp_all_positions", False), saved.get("all_logits", False))
        return
    archs = [a for a in args.arch.split(",") if a]
    layers = sorted(int(x) for x in args.layers.split(","))
    batches = sorted(int(x) for x in args.batches.split(","))

    def save(results):
        if args.json:
            Path(args.json).write_text(json.dumps({"archs": archs, "layers": layers, "batches": batches,
                                                   "device": args.device, "seconds": time.time() - t0,
                                                   "ntp_all_positions": args.ntp_all_positions,
                                                   "all_logits": args.all_logits,
                                                   "results": results}, indent=1))
    approaches = [a for a in args.approaches.split(",") if a]
    unknown = (set(archs) - set(ARCHS)) | (set(approaches) - set(APPROACHES))
    if unknown or min(layers) < LAYER + 1:
        raise SystemExit(f"unknown {sorted(unknown)} or a depth below {LAYER + 1} (the tap needs layers l-1 and l)")
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for arch in archs:
            full = Path(tmp) / f"{arch}-{max(layers)}"
            # in its own process: the weights it builds are not kept in this one
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-student",
                            json.dumps([str(full), arch, max(layers)])], check=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
            print(f"{arch}: student of {max(layers)} layers written ({time.time() - t0:.0f} s)", flush=True)
            for n in layers:
                student = full if n == max(layers) else fewer_layers(full, Path(tmp) / f"{arch}-{n}", n)
                for batch in batches:
                    for ap in approaches:
                        r = spawn(student, ap, batch, args.device, args.threads, args.ntp_all_positions,
                                  args.all_logits)
                        r["arch"] = arch
                        results.append(r)
                        save(results)
                        print(f"  {ap:<9} layers {n} batch {batch}: peak {r['peak'] / GiB:6.2f} GiB (at start "
                              f"{r['start'] / GiB:5.2f}), step {r['step_s']:.0f} s", flush=True)
            shutil_rmtree(full.parent, arch)
    save(results)
    report(results, archs, layers, batches, args.device, time.time() - t0, args.ntp_all_positions, args.all_logits)


def shutil_rmtree(tmp: Path, arch: str) -> None:
    """Free the disk of an architecture's students once measured (they are GBs)."""
    import shutil
    for d in tmp.glob(f"{arch}-*"):
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
