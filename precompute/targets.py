"""MedAlign's teacher targets as pure tensor functions (docs/method.md, "Teacher targets").

The cache stores a teacher's targets at its NATIVE patch grid g; a student with grid G
gets them through one exact linear resize at read time:

    tokens [P, D] --patch_similarity--> S [P, P] --pack_upper--> fp16 [P(P-1)/2]  (stored)
    stored --unpack_upper--> S --resize_similarity(R)--> S_t [Q, Q]   (Q = G*G)
    attention [P] (stored as is) --resize_attention(R)--> a_t [Q]

with R = bilinear_matrix(g, G). `reference_targets` is the reference recipe done the
direct way (interpolate the feature map itself); it exists to check the path above.
Every function accepts optional leading batch dimensions.
"""

import numbers
from functools import lru_cache

import torch
import torch.nn.functional as F

# The version of the target definition these functions implement (last block's patch
# tokens + head-averaged CLS attention). Stored in every cache group; training refuses
# a recipe it does not know, so a changed definition is never mixed with old numbers.
RECIPE = "last_block_tokens+cls_attention/v1"


def patch_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens [..., P, D] -> all pairwise cosines [..., P, P] in float32.

    Normalised in fp32 whatever the input dtype: teachers may run in bf16/fp16, and
    cosines near 1 are where low precision hurts most. No clamping: rounding can put
    an entry ~1e-7 outside [-1, 1], exactly as the reference's own F.normalize path does.
    """
    t = F.normalize(tokens.float(), dim=-1)
    return t @ t.transpose(-1, -2)


@lru_cache(maxsize=16)
def _triu(num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(num_patches, num_patches, 1)
    return i, j


def pack_upper(sim: torch.Tensor) -> torch.Tensor:
    """[..., P, P] -> strict upper triangle [..., P(P-1)/2], row-major (torch.triu_indices order).

    A cosine matrix is symmetric with a unit diagonal, so this half holds all of it.
    """
    i, j = _triu(sim.shape[-1])
    return sim[..., i, j]


def unpack_upper(packed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Inverse of pack_upper: [..., P(P-1)/2] -> symmetric [..., P, P], diagonal exactly 1.

    Keeps the input dtype (callers wanting fp32 maths pass `.float()` first).
    """
    P = num_patches
    if packed.shape[-1] != P * (P - 1) // 2:
        raise ValueError(f"packed size {packed.shape[-1]} is not P(P-1)/2 for P={P}")
    i, j = _triu(P)
    out = packed.new_empty(*packed.shape[:-1], P, P)
    out[..., i, j] = packed
    out[..., j, i] = packed
    out.diagonal(dim1=-2, dim2=-1).fill_(1)
    return out


@lru_cache(maxsize=16)
def _bilinear_matrix(src_grid: int, dst_grid: int) -> torch.Tensor:
    # Column k of R is the resize of the k-th one-hot map; in float64 so the only
    # rounding left is the final cast to float32.
    eye = torch.eye(src_grid * src_grid, dtype=torch.float64).view(-1, 1, src_grid, src_grid)
    out = F.interpolate(eye, size=(dst_grid, dst_grid), mode="bilinear", align_corners=False)
    return out.view(src_grid * src_grid, dst_grid * dst_grid).t().float().contiguous()


def check_grid(grid, what: str = "grid") -> int:
    """A patch grid (side length, e.g. 24 for LLaVA-Med's 24 x 24 visual tokens) as an int;
    ValueError for anything else (0, 2.5, "24", True), before torch meets it."""
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ValueError(f"{what} must be a positive integer patch grid side (e.g. 24 for a 24 x 24 token "
                         f"grid), got {grid!r}")
    return int(grid)


def bilinear_matrix(src_grid: int, dst_grid: int) -> torch.Tensor:
    """R [dst*dst, src*src] float32 with R @ x.flatten() == F.interpolate(x, (dst, dst),
    mode="bilinear", align_corners=False).flatten() for any row-major g x g map x.

    Cached per (src, dst); each call returns a fresh copy, so callers may modify it.
    """
    return _bilinear_matrix(check_grid(src_grid, "source grid"), check_grid(dst_grid)).clone()


def resize_similarity(sim: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Native cosine matrix S [..., P, P] -> the student-grid S_t [..., Q, Q] (float32).

    docs/method.md: the reference resizes the normalised features F (F_up = R F), re-normalises
    and takes cosines, i.e. S_t = D^-1/2 (R S R^T) D^-1/2 with D = diag(R S R^T).
    The norm is clamped at 1e-12 like F.normalize's. With R = I this returns S unchanged.
    """
    R = R.to(sim.device, torch.float32)
    G = R @ sim.float() @ R.t()
    inv = G.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(1e-12).reciprocal()
    return G * inv.unsqueeze(-1) * inv.unsqueeze(-2)


def resize_attention(attn: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Native CLS attention a [..., P] -> a_t = R a / max(a) [..., Q] (float32).

    The max is over each sample's native map, as the reference divides before resizing.
    """
    a = attn.float()
    a = a / a.amax(dim=-1, keepdim=True)
    return a @ R.to(a.device, torch.float32).t()


def reference_targets(tokens: torch.Tensor, cls_attention: torch.Tensor,
                      grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference recipe done the direct way: tokens [..., P, D], attention [..., P]
    -> (S_t [..., G*G, G*G], a_t [..., G*G]) in float32.

    This is the CHECK for the stored/resized path (tests, benchmark), not the training
    path: it needs the full token tensor, which the cache deliberately does not keep.
    """
    lead, (P, D) = tokens.shape[:-2], tokens.shape[-2:]
    g = int(round(P ** 0.5))
    if g * g != P:
        raise ValueError(f"{P} patches do not form a square grid")
    feats = F.normalize(tokens.reshape(-1, P, D).float(), dim=-1)
    fmap = feats.transpose(1, 2).reshape(-1, D, g, g)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    feats = F.normalize(fmap.flatten(2).transpose(1, 2), dim=-1)
    sim = feats @ feats.transpose(1, 2)
    a = cls_attention.reshape(-1, P).float()
    amap = (a / a.amax(dim=-1, keepdim=True)).view(-1, 1, g, g)
    amap = F.interpolate(amap, size=(grid, grid), mode="bilinear", align_corners=False)
    Q = grid * grid
    return sim.reshape(*lead, Q, Q), amap.reshape(*lead, Q)


__all__ = ["RECIPE", "bilinear_matrix", "check_grid", "pack_upper", "patch_similarity", "reference_targets",
           "resize_attention", "resize_similarity", "unpack_upper"]
