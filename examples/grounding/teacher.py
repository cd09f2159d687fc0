"""A tiny CLIP-style "expert" teacher trained contrastively on synthetic image-report pairs.

Vision tower: EXACTLY the registered `tiny` teacher's tower (open_clip VisionTransformer,
112 px, patch 16, width 64, 2 blocks), obtained from `load_teacher("tiny", random_init=True)`
itself, so its state dict loads strictly into `load_teacher("tiny", checkpoint)`.
Text tower: a bag of words (nn.EmbeddingBag over the reports' word vocabulary) + a linear
projection. Loss: the symmetric CLIP loss; reports that are the same string count as
positives of each other (soft targets), since a small batch holds many identical reports.

The teacher is trained on its OWN images (a separate seed), not on the student's train or
test images, as an expert CLIP is trained on other data than the downstream task.
Saved as {'state_dict': {'visual.<...>': tensor}} (plus the text tower's keys, which the
build ignores), the layout of an open_clip training checkpoint.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from precompute.teachers import load_teacher

try:
    from . import data as D
except ImportError:  # run as a script from this folder
    import data as D


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class BagOfWords(nn.Module):
    def __init__(self, vocab: list[str], embed_dim: int, width: int = 64):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.EmbeddingBag(len(vocab), width, mode="mean")
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids += [self.vocab[w] for w in words(t) if w in self.vocab]
        return self.proj(self.embed(torch.tensor(ids), torch.tensor(offsets)))


def pixels(teacher, images: list[np.ndarray]) -> torch.Tensor:
    """The teacher's own preprocessing (the one `medalign-cache build` applies)."""
    return torch.stack([teacher.preprocess(Image.fromarray(im, mode="L").convert("RGB")) for im in images])


def train_teacher(out: Path, n_images: int, steps: int, seed: int = 0, batch: int = 64, lr: float = 2e-3,
                  log=print) -> dict:
    torch.manual_seed(seed)
    teacher = load_teacher("tiny", random_init=True, seed=seed)
    visual = teacher.visual
    visual.requires_grad_(True)
    visual.train()
    cases = D.generate_cases(n_images, seed=10_000 + seed, prefix="teacher")
    X = pixels(teacher, [c.image for c in cases])
    reports = [c.report for c in cases]
    vocab = sorted({w for r in reports for w in words(r)})
    embed_dim = visual.proj.shape[1] if getattr(visual, "proj", None) is not None else visual.output_dim
    text = BagOfWords(vocab, embed_dim)
    logit_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    params = list(visual.parameters()) + list(text.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randperm(len(cases), generator=g)[:batch]
        img = F.normalize(visual(X[idx]), dim=-1)
        txt_batch = [reports[i] for i in idx.tolist()]
        txt = F.normalize(text(txt_batch), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.tensor([[a == b for b in txt_batch] for a in txt_batch], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  teacher step {step + 1}/{steps}: CLIP loss {loss.item():.3f}")
    seconds = time.perf_counter() - t0
    visual.eval()
    state = {f"visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()}
    state.update({f"text.{k}": v.detach().clone() for k, v in text.state_dict().items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "vocab": vocab}, out)
    return {"checkpoint": str(out), "n_images": n_images, "steps": steps, "final_loss": float(loss.item()),
            "seconds": seconds}
