"""MedAlign's two distillation losses and the next-token loss, as pure tensor functions
(docs/method.md, "Student losses").

- `visual_alignment_loss`: the student's visual tokens (after the alignment transform)
  should relate to each other the way the teacher's patches do: MSE between the
  two cosine-similarity matrices.
- `attention_distill_loss`: the prompt's attention over the image should look like
  the teacher's CLS attention map: KL between the two maps.

Everything is computed in float32 whatever the inputs' dtype: the similarity
matrices are compared entry by entry and bf16 cosines are only good to ~1e-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Attention probabilities are >= 0 and can be exactly 0 (a fully masked or
# underflowed column); their log must stay finite.
_LOG_FLOOR = 1e-12


def _check_shapes(name: str, student: torch.Tensor, teacher: torch.Tensor, ndim: int) -> None:
    if student.ndim != ndim or student.shape != teacher.shape:
        raise ValueError(f"{name}: expected student and teacher of the same {ndim}-D shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """[B, V, D] tokens -> [B, V, V] float32 pairwise cosines (S_ij = cos(x_i, x_j))."""
    if x.ndim != 3:
        raise ValueError(f"cosine_similarity_matrix: expected [B, V, D], got {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=-1)  # eps-guarded: a zero token gives zero cosines, not NaN
    return x @ x.transpose(1, 2)


def visual_alignment_loss(aligned_visual: torch.Tensor, target_sim: torch.Tensor) -> torch.Tensor:
    """L_vis = mean((S_s - S_t)^2) over every entry of every sample (the reference's plain MSE).

    aligned_visual: [B, V, D], the transformed visual hidden states X~;
    target_sim: [B, V, V], the teacher's S_t already at the student's grid.
    """
    sim = cosine_similarity_matrix(aligned_visual)
    _check_shapes("visual_alignment_loss", sim, target_sim, 3)
    return F.mse_loss(sim, target_sim.float(), reduction="mean")


def attention_distill_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                           mode: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """L_att between the student's text-to-image attention a_s and the teacher's map a_t, both [B, V].

    mode "kl" (the reference): both maps L2-normalised, then F.kl_div(a_s.log(), a_t) with
      reduction "mean", i.e. the mean over all B*V entries of a_t * (log a_t - log a_s).
      L2-normalised maps are not distributions, so this is not a true KL (it can be
      negative); it is kept as the reference wrote it so results stay comparable.
      `temperature` is ignored.
    mode "softmax-kl" (a proper KL, our option): each map is read as log-probabilities,
      p = softmax(log(a) / T), so T = 1 just renormalises the map to sum to 1 and T > 1
      flattens it (T < 1 sharpens). Loss = T^2 * KL(p_t || p_s), summed over the V
      visual tokens and averaged over the batch; the T^2 (Hinton et al.) keeps the
      gradient's size roughly independent of T. Zero iff the maps are proportional.

    Both modes average over samples, so a batch of 2 gives the mean of the two
    single-sample losses.
    """
    _check_shapes("attention_distill_loss", student_attn, teacher_attn, 2)
    a_s, a_t = student_attn.float(), teacher_attn.float()
    if mode == "kl":
        a_s = F.normalize(a_s, dim=-1)
        a_t = F.normalize(a_t, dim=-1)
        # = the reference's F.kl_div(..., reduction="mean"), spelled out: torch warns that
        # "mean" will turn into "batchmean" (a V times larger loss) in a future release.
        return F.kl_div(a_s.clamp_min(_LOG_FLOOR).log(), a_t, reduction="none").mean()
    if mode == "softmax-kl":
        if temperature <= 0:
            raise ValueError(f"attention_distill_loss: temperature must be > 0, got {temperature}")
        log_p_s = F.log_softmax(a_s.clamp_min(_LOG_FLOOR).log() / temperature, dim=-1)
        log_p_t = F.log_softmax(a_t.clamp_min(_LOG_FLOOR).log() / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * temperature ** 2
    raise ValueError(f"attention_distill_loss: mode must be 'kl' or 'softmax-kl', got {mode!r}")


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at position t where labels[t + 1] is learned, i.e. the positions
    whose logits the next-token loss reads. Passed as the model's `logits_to_keep`, the LM
    head then computes only those rows, [N, V], instead of [B, T, V] (at Qwen2's 152k
    vocabulary 0.3 GB per sample in bf16, alive through the whole backward)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, never: int | None = None) -> torch.Tensor:
    """SUM over the learned positions of -log p(label), float32: logits [B, T, V] predict
    labels [B, T] shifted by one; labels -100 are not learned. Logits [N, V] are those of
    the learned positions only, in order (the model called with
    `logits_to_keep=learned_positions(labels)`).

    `never`: a token id the model may never predict, whose logit is dropped from the
    softmax: the image placeholder, which a converted student gained as an extra
    vocabulary row (distill/convert.py), so the loss over the original vocabulary is
    exactly the original model's."""
    targets = labels[:, 1:]
    learned = targets != -100
    if logits.ndim == 2 and logits.shape[0] != int(learned.sum()):
        raise ValueError(f"next_token_loss: {logits.shape[0]} rows of logits for {int(learned.sum())} learned "
                         f"positions")
    # Only the learned rows are upcast and go through the softmax: the answer is a small part
    # of a sequence that is mostly image and prompt, and each float32 [B, T, vocab] copy is
    # 0.13 GB per sample at LLaVA-Med's 32k vocabulary, 0.62 GB at Qwen2's 152k (bench_memory.py).
    # (One expression: the 16-bit rows picked out of [B, T, V] are freed once upcast.)
    flat = (logits[:, :-1][learned] if logits.ndim == 3 else logits).float()
    if never is not None:
        flat = flat.index_fill(1, torch.tensor([never], device=flat.device), float("-inf"))
    return F.cross_entropy(flat, targets[learned], reduction="sum")
