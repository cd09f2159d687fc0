"""Does `medalign-distill convert` stream? Peak memory and speed against the checkpoint's size.

Writes a LLaVA-Med-shaped checkpoint (the original layout of tests/originals.py, a Mistral
LM of --hidden width and --layers layers, fp16, in --shards safetensors shards) and a CLIP
folder, converts it in a fresh process, and prints that process's peak resident memory
above what it held before converting (sampled every 5 ms from /proc: anonymous memory, the
real cost, and file-backed pages, mostly the source files' mmaps, which the kernel can drop). A conversion that loaded the model whole would need >= 1x
the checkpoint (2x with the copy it writes); streaming needs about twice the output file
size (OUT_SHARD_BYTES: the tensors, and safetensors' serialisation of them), plus the
source pages the kernel keeps mapped (clean page cache, which it can drop). The run is
repeated with output files of --out-mib and with one output file as large as the model.

    python bench/bench_convert.py [--hidden 1024] [--layers 16] [--shards 4] [--out-mib 64]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
def status():
    fields = {}
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields
import distill.convert as C, transformers, safetensors.torch  # everything imported before the baseline
src, clip, out = map(Path, sys.argv[1:4])
C.OUT_SHARD_BYTES = int(sys.argv[4])
before, peak, done = status(), status(), threading.Event()
def sample():  # every 5 ms: the peaks of anonymous and file-backed resident memory
    while not done.is_set():
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
watcher = threading.Thread(target=sample)
watcher.start()
t = time.perf_counter()
C.convert(src, out, vision_tower=clip, progress=False)
seconds = time.perf_counter() - t
done.set()
watcher.join()
print(json.dumps({"anon": peak["RssAnon"] - before["RssAnon"], "file": peak["RssFile"] - before["RssFile"],
                  "seconds": seconds}))
"""


def write_source(folder: Path, hidden: int, layers: int, shards: int) -> int:
    """A tiny-CLIP LLaVA-Med of real-ish LM size, sharded; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    import originals as O

    O.write_llava_med(folder)          # the layout, config and tokenizer; LM weights replaced below
    for f in folder.glob("model-*.safetensors"):
        f.unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
               num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512))
    (folder / "config.json").write_text(json.dumps(cfg))
    kv = cfg["num_key_value_heads"] * 128
    names = {"model.embed_tokens.weight": (32000, hidden), "lm_head.weight": (32000, hidden),
             "model.norm.weight": (hidden,), "model.mm_projector.0.weight": (hidden, 32),
             "model.mm_projector.0.bias": (hidden,), "model.mm_projector.2.weight": (hidden, hidden),
             "model.mm_projector.2.bias": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        names.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                      p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                      p + "mlp.gate_proj.weight": (cfg["intermediate_size"], hidden),
                      p + "mlp.up_proj.weight": (cfg["intermediate_size"], hidden),
                      p + "mlp.down_proj.weight": (hidden, cfg["intermediate_size"]),
                      p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    keys = list(names)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {k: torch.randn(*names[k], dtype=torch.float16) * 0.02 for k in keys[s::shards]}
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * 2 for t in part.values())
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out-mib", type=int, default=64, help="output file size (OUT_SHARD_BYTES) to measure")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import originals as O

    with tempfile.TemporaryDirectory(prefix="medalign_bench_convert_") as tmp:
        tmp = Path(tmp)
        size = write_source(tmp / "src", args.hidden, args.layers, args.shards)
        clip = O.write_clip(tmp / "clip")
        largest = max(f.stat().st_size for f in (tmp / "src").glob("model-*.safetensors"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        print(f"convert: LLaVA-Med layout, Mistral LM hidden {args.hidden} x {args.layers} layers, fp16, "
              f"{args.shards} source shards ({os.cpu_count()} CPU cores)")
        print(f"checkpoint weights {size / 2**20:.0f} MiB, largest source shard {largest / 2**20:.0f} MiB")
        for label, out_bytes in ((f"output files of {args.out_mib} MiB", args.out_mib * 2**20),
                                 ("one output file (no streaming)", 1 << 62)):
            out = tmp / f"out-{out_bytes}"
            r = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "src"), str(clip), str(out), str(out_bytes)],
                               capture_output=True, text=True, env=env, cwd=ROOT)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{label:34s} peak above baseline: anonymous {m['anon'] / 2**20:5.0f} MiB = "
                  f"{m['anon'] / size:.2f}x the checkpoint, file-backed {m['file'] / 2**20:5.0f} MiB; "
                  f"{m['seconds']:.1f} s = {size / 2**20 / m['seconds']:.0f} MiB/s")


if __name__ == "__main__":
    main()
