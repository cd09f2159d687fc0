"""precompute.targets: the stored-at-native-grid path must reproduce docs/method.md's
reference recipe (interpolate the feature map, re-normalise, cosine)."""

import pytest
import torch
import torch.nn.functional as F

from precompute.targets import (bilinear_matrix, pack_upper, patch_similarity, reference_targets,
                                resize_attention, resize_similarity, unpack_upper)


def teacher_like(n: int, grid: int, dim: int = 64, seed: int = 0):
    """Tokens with a shared component, a smooth spatial field and noise (cosines mostly
    positive and spatially correlated, like a CLIP ViT's last block), plus a CLS
    attention map (softmax over smooth logits)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, dim, 1, 1, generator=g)
    field = F.interpolate(torch.randn(n, dim, 4, 4, generator=g), size=(grid, grid), mode="bicubic",
                          align_corners=False)
    tokens = (shared + field + 0.5 * torch.randn(n, dim, grid, grid, generator=g)).flatten(2).transpose(1, 2)
    logits = torch.randn(n, grid * grid, generator=g)
    return tokens, torch.softmax(logits, dim=-1)


def test_patch_similarity_is_a_cosine_matrix():
    tokens = torch.randn(2, 3, 49, 16) * torch.rand(2, 3, 49, 1) * 10  # batch dims, assorted norms
    S = patch_similarity(tokens.bfloat16())
    assert S.shape == (2, 3, 49, 49) and S.dtype == torch.float32
    assert torch.equal(S, S.transpose(-1, -2))
    assert torch.allclose(S.diagonal(dim1=-2, dim2=-1), torch.ones(2, 3, 49), atol=1e-6)
    assert S.abs().max() <= 1 + 1e-6  # rounding only
    # equals the definition, cos(x_i, x_j), computed pair by pair
    t = tokens[1, 2].bfloat16().float()
    assert torch.allclose(S[1, 2, 5, 17], F.cosine_similarity(t[5], t[17], dim=0), atol=1e-6)


@pytest.mark.parametrize("P", [2, 25, 196])
def test_pack_unpack_round_trip(P):
    S = patch_similarity(torch.randn(3, P, 8))
    packed = pack_upper(S)
    assert packed.shape == (3, P * (P - 1) // 2)
    i, j = torch.triu_indices(P, P, 1)
    assert torch.equal(packed, S[:, i, j])          # row-major strict upper triangle
    back = unpack_upper(packed, P)
    off = ~torch.eye(P, dtype=torch.bool)
    assert torch.equal(back[:, off], S[:, off])     # lossless off the diagonal
    assert torch.equal(back.diagonal(dim1=-2, dim2=-1), torch.ones(3, P))  # exactly 1
    assert torch.equal(back, back.transpose(-1, -2))
    assert unpack_upper(packed.half(), P).dtype == torch.float16


def test_unpack_rejects_wrong_size():
    with pytest.raises(ValueError, match="P=10"):
        unpack_upper(torch.zeros(44), 10)


@pytest.mark.parametrize("src,dst", [(14, 24), (24, 24), (24, 14), (5, 7), (7, 3), (3, 1), (1, 4)])
def test_bilinear_matrix_is_f_interpolate(src, dst):
    maps = torch.randn(6, 1, src, src, dtype=torch.float64)
    expected = F.interpolate(maps, size=(dst, dst), mode="bilinear", align_corners=False).flatten(1)
    R = bilinear_matrix(src, dst)
    assert R.shape == (dst * dst, src * src) and R.dtype == torch.float32
    assert torch.allclose(maps.flatten(1) @ R.double().t(), expected, atol=1e-6)
    if src == dst:
        assert torch.equal(R, torch.eye(src * src))


def test_bilinear_matrix_returns_a_private_copy():
    R = bilinear_matrix(14, 24)
    R.zero_()
    assert bilinear_matrix(14, 24).abs().sum() > 0


@pytest.mark.parametrize("g,G", [(14, 24), (24, 24), (24, 14), (5, 7)])
def test_resize_similarity_equals_reference_recipe(g, G):
    tokens, attn = teacher_like(3, g)
    S_ref, a_ref = reference_targets(tokens, attn, G)
    R = bilinear_matrix(g, G)
    S_t = resize_similarity(patch_similarity(tokens), R)
    assert S_t.shape == (3, G * G, G * G)
    assert (S_t - S_ref).abs().max() < 1e-5     # fp32: measured <= 8e-7 for these pairs
    # what training sees: the fp16 triangle from the cache, unpacked and resized
    stored = pack_upper(patch_similarity(tokens)).half()
    S_fp16 = resize_similarity(unpack_upper(stored.float(), g * g), R)
    assert (S_fp16 - S_ref).abs().max() < 1e-3  # fp16: measured 2.4e-4 .. 2.8e-4 (~half an fp16 ulp near 1)
    assert torch.allclose(resize_attention(attn, R), a_ref, atol=1e-6)


def test_resize_on_the_native_grid_is_exactly_the_identity():
    S = unpack_upper(pack_upper(patch_similarity(torch.randn(2, 49, 8))), 49)  # unit diagonal
    assert torch.equal(resize_similarity(S, bilinear_matrix(7, 7)), S)


def test_reference_targets_on_the_native_grid_is_patch_similarity():
    tokens, attn = teacher_like(2, 7)
    S, a = reference_targets(tokens, attn, 7)
    assert torch.allclose(S, patch_similarity(tokens), atol=1e-6)
    assert torch.allclose(a, attn / attn.amax(-1, keepdim=True))


def test_batch_order_and_batch_dims_do_not_matter():
    tokens, attn = teacher_like(5, 14)
    R = bilinear_matrix(14, 24)
    S = resize_similarity(patch_similarity(tokens), R)
    a = resize_attention(attn, R)
    perm = torch.tensor([3, 0, 4, 1, 2])
    # rounding only (a GEMM may block a permuted batch differently)
    assert torch.allclose(resize_similarity(patch_similarity(tokens[perm]), R), S[perm], rtol=0, atol=1e-7)
    assert torch.allclose(resize_attention(attn[perm], R), a[perm], rtol=0, atol=1e-7)
    for i in range(5):  # one sample alone, no batch dim
        assert torch.allclose(resize_similarity(patch_similarity(tokens[i]), R), S[i], atol=1e-6)
    # extra leading dims
    S2, a2 = reference_targets(tokens.view(5, 1, 196, -1), attn.view(5, 1, 196), 24)
    assert S2.shape == (5, 1, 576, 576) and a2.shape == (5, 1, 576)


def test_resize_attention_uses_each_samples_own_max():
    _, attn = teacher_like(2, 14)
    R = bilinear_matrix(14, 24)
    scaled = attn * torch.tensor([[1.0], [250.0]])   # the max-division removes any scale
    out = resize_attention(scaled, R)
    assert torch.allclose(out, resize_attention(attn, R), atol=1e-6)
    assert torch.allclose(out, reference_targets(torch.randn(2, 196, 4), scaled, 24)[1], atol=1e-6)
