"""The distillation losses: properties, and agreement with independent (loop / numpy) computations."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import attention_distill_loss, cosine_similarity_matrix, visual_alignment_loss


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- cosine similarity

def test_cosine_similarity_matrix_against_loops():
    x = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    sim = cosine_similarity_matrix(x)
    assert sim.shape == (2, 5, 5) and sim.dtype == torch.float32
    xn = x.numpy().astype(np.float64)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                want = xn[b, i] @ xn[b, j] / (np.linalg.norm(xn[b, i]) * np.linalg.norm(xn[b, j]))
                assert abs(sim[b, i, j].item() - want) < 1e-6
    assert torch.allclose(sim, sim.transpose(1, 2))                 # symmetric
    assert torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(2, 5), atol=1e-6)


def test_cosine_similarity_is_float32_for_bf16_and_finite_for_zero_tokens():
    x = torch.randn(1, 4, 8).bfloat16()
    x[0, 2] = 0
    sim = cosine_similarity_matrix(x)
    assert sim.dtype == torch.float32 and torch.isfinite(sim).all()


# ----------------------------------------------------------------------------- L_vis

def test_visual_alignment_loss_zero_when_similarities_match():
    x = torch.randn(3, 6, 16)
    assert visual_alignment_loss(x, cosine_similarity_matrix(x)).item() < 1e-12
    # invariant to each token's scale: cosines only
    assert visual_alignment_loss(x * torch.rand(3, 6, 1) * 5 + 0, cosine_similarity_matrix(x)).item() < 1e-10


def test_visual_alignment_loss_against_numpy():
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    target = _rand(2, 4, 4, seed=2) * 2 - 1
    xn = x.numpy().astype(np.float64)
    xn = xn / np.linalg.norm(xn, axis=-1, keepdims=True)
    s = np.einsum("bid,bjd->bij", xn, xn)
    want = np.mean((s - target.numpy().astype(np.float64)) ** 2)
    assert abs(visual_alignment_loss(x, target).item() - want) < 1e-6


def test_visual_alignment_loss_symmetric_in_its_two_matrices():
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    sx, sy = cosine_similarity_matrix(x), cosine_similarity_matrix(y)
    assert torch.allclose(visual_alignment_loss(x, sy), visual_alignment_loss(y, sx))


def test_visual_alignment_loss_batching():
    x, target = torch.randn(2, 5, 8), _rand(2, 5, 5)
    both = visual_alignment_loss(x, target)
    singles = [visual_alignment_loss(x[i:i + 1], target[i:i + 1]) for i in range(2)]
    assert torch.allclose(both, (singles[0] + singles[1]) / 2, atol=1e-7)
    assert torch.allclose(both, visual_alignment_loss(x.flip(0), target.flip(0)), atol=1e-7)   # batch order


def test_visual_alignment_loss_gradient_flows_and_shape_checked():
    x = torch.randn(2, 5, 8, requires_grad=True)
    visual_alignment_loss(x, _rand(2, 5, 5)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same"):
        visual_alignment_loss(torch.randn(2, 5, 8), _rand(2, 4, 4))


# ----------------------------------------------------------------------------- L_att

def _reference_kl(a_s, a_t):
    """The reference formula written out: L2-normalise, then mean over entries of t (log t - log s)."""
    s = a_s.numpy().astype(np.float64)
    t = a_t.numpy().astype(np.float64)
    s = s / np.linalg.norm(s, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    total = 0.0
    for b in range(s.shape[0]):
        for v in range(s.shape[1]):
            if t[b, v] > 0:
                total += t[b, v] * (np.log(t[b, v]) - np.log(s[b, v]))
    return total / s.size


def _reference_softmax_kl(a_s, a_t, T):
    s = np.log(a_s.numpy().astype(np.float64)) / T
    t = np.log(a_t.numpy().astype(np.float64)) / T
    total = 0.0
    for b in range(s.shape[0]):
        ps = np.exp(s[b] - s[b].max()); ps /= ps.sum()
        pt = np.exp(t[b] - t[b].max()); pt /= pt.sum()
        total += np.sum(pt * (np.log(pt) - np.log(ps)))
    return total / s.shape[0] * T * T


@pytest.mark.parametrize("mode", ["kl", "softmax-kl"])
def test_attention_loss_zero_when_maps_match(mode):
    a = _rand(3, 36) + 0.01
    assert abs(attention_distill_loss(a, a, mode=mode).item()) < 1e-6
    # both modes normalise, so a map and a multiple of it match too
    assert abs(attention_distill_loss(a * 0.01, a * 3, mode=mode).item()) < 1e-6


def test_attention_loss_kl_against_reference_formula():
    a_s, a_t = _rand(2, 36, seed=3) + 1e-3, _rand(2, 36, seed=4)
    a_t[0, :5] = 0  # the teacher's map can hold exact zeros: 0 log 0 = 0
    got = attention_distill_loss(a_s, a_t, mode="kl")
    assert abs(got.item() - _reference_kl(a_s, a_t)) < 1e-6
    # and it is exactly what the reference code calls
    with warnings.catch_warnings():  # torch announces a change of "mean"; ours does not depend on it
        warnings.simplefilter("ignore")
        want = F.kl_div(F.normalize(a_s, dim=-1).log(), F.normalize(a_t, dim=-1), reduction="mean")
    assert torch.allclose(got, want)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_attention_loss_softmax_kl_against_numpy(T):
    a_s, a_t = _rand(2, 36, seed=5) + 1e-3, _rand(2, 36, seed=6) + 1e-3
    got = attention_distill_loss(a_s, a_t, mode="softmax-kl", temperature=T)
    assert abs(got.item() - _reference_softmax_kl(a_s, a_t, T)) < 1e-5
    assert got.item() > 0


@pytest.mark.parametrize("mode", ["kl", "softmax-kl"])
def test_attention_loss_batching(mode):
    a_s, a_t = _rand(2, 36, seed=7) + 1e-3, _rand(2, 36, seed=8) + 1e-3
    both = attention_distill_loss(a_s, a_t, mode=mode)
    singles = [attention_distill_loss(a_s[i:i + 1], a_t[i:i + 1], mode=mode) for i in range(2)]
    assert torch.allclose(both, (singles[0] + singles[1]) / 2, atol=1e-7)
    assert torch.allclose(both, attention_distill_loss(a_s.flip(0), a_t.flip(0), mode=mode), atol=1e-7)


@pytest.mark.parametrize("mode", ["kl", "softmax-kl"])
def test_attention_loss_gradient_flows_even_through_zeros(mode):
    a_s = _rand(2, 36, seed=9)
    a_s[0, 3] = 0.0  # an attention probability that underflowed
    a_s.requires_grad_(True)
    loss = attention_distill_loss(a_s, _rand(2, 36, seed=10), mode=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a_s.grad).all() and a_s.grad.abs().sum() > 0


def test_attention_loss_rejects_bad_arguments():
    a = _rand(2, 36)
    with pytest.raises(ValueError, match="mode"):
        attention_distill_loss(a, a, mode="mse")
    with pytest.raises(ValueError, match="temperature"):
        attention_distill_loss(a, a, mode="softmax-kl", temperature=0)
    with pytest.raises(ValueError, match="same"):
        attention_distill_loss(a, a[:, :30])


# ----------------------------------------------------------------------------- next-token loss

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_loss_against_per_position_loop(dtype):
    """The sum over the learned positions of -log softmax(logits without the `never` column)[label],
    computed position by position in float64; its gradient is zero at positions not learned."""
    from distill.losses import next_token_loss
    g = torch.Generator().manual_seed(0)
    B, T, V, never = 3, 9, 11, 4
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[labels == never] = 0
    labels[0, :5] = -100               # a prompt
    labels[1] = -100                   # a sample with nothing to learn
    loss = next_token_loss(logits, labels, never=never)
    want = 0.0
    for b in range(B):
        for t in range(T - 1):         # position t predicts token t + 1
            if labels[b, t + 1] != -100:
                row = logits[b, t].double().detach().clone()
                row[never] = float("-inf")
                want -= torch.log_softmax(row, -1)[labels[b, t + 1]].item()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[:, -1].abs().sum() == 0
    assert logits.grad[0, :4].abs().sum() == 0 and logits.grad[0, 4:8].abs().sum() > 0
    assert logits.grad[..., never].abs().sum() == 0
    empty = next_token_loss(logits, torch.full_like(labels, -100))
    assert empty.item() == 0.0


def test_next_token_loss_on_the_learned_rows_only():
    """Logits of only the learned positions (what the LM head computes with
    logits_to_keep=learned_positions(labels)) give the same loss and the same gradient
    at those positions as the full [B, T, V] logits; a row count that does not match the
    labels is an error, not a silently shifted loss."""
    from distill.losses import learned_positions, next_token_loss
    g = torch.Generator().manual_seed(1)
    B, T, V, never = 3, 8, 13, 5
    full = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :4] = -100
    labels[2, 6:] = -100               # a shorter, right-padded answer
    keep = learned_positions(labels)
    assert keep.tolist()[2] == [False, False, False, True, True, False, False, False]
    assert keep[:, -1].sum() == 0      # the last position predicts nothing
    rows = full.detach()[keep].clone().requires_grad_(True)     # row-major, as slice_logits_to_keep returns
    want, got = next_token_loss(full, labels, never=never), next_token_loss(rows, labels, never=never)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    want.backward(), got.backward()
    assert torch.allclose(rows.grad, full.grad[keep], atol=1e-7)
    with pytest.raises(ValueError, match="rows of logits"):
        next_token_loss(rows[1:], labels)
