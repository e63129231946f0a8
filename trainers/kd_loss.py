"""The sparse, offline KD loss: the student against the teacher's top-k logprobs plus one tail bucket.

Per position the records hold the teacher's top-k ids S and their log-probabilities
l_i at temperature 1 (what every backend returns). Both sides are coarse-grained onto
the k + 1 outcomes S ∪ {tail} and compared there:

  teacher at T=1:  P = (exp l_i for i in S,  r),   r = 1 - sum_S exp l_i
  student at T=1:  Q = (q_i for i in S,  1 - sum_S q_i),  q = softmax(z) over the whole vocabulary
  temperature T:   both are tempered the same way over the k + 1 buckets, P_T ∝ P^(1/T), Q_T ∝ Q^(1/T).

On S this is exactly the renormalised softmax(l / T), resp. softmax(z / T): the
normalising constants cancel. The tail is tempered as ONE outcome of mass r (we do not
know how r splits over the rest of the vocabulary, so T cannot be applied inside it);
because the student's tail is treated identically, a student equal to the teacher
scores 0 at every T. Tails are floored at TAIL_FLOOR (float rounding makes 1 - sum_S
unreliable below that). Where S covers the whole vocabulary the tail bucket is dropped,
so with k = vocabulary the divergence equals the dense full-softmax one at temperature T.

D is forward KL(P_T || Q_T), reverse KL(Q_T || P_T), or TRL/GKD's generalised JSD:
beta * KL(P || M) + (1 - beta) * KL(Q || M) with M = beta * P + (1 - beta) * Q.
loss = alpha * CE(hard targets) + (1 - alpha) * T^2 * D, both summed over label tokens
and divided by the same count. Memory is O(positions * k): the student's logits are
gathered at S, and no vocabulary-sized teacher tensor is ever built.

`logit_mse` is the seeds' variant (Ba & Caruana): MSE between full logit vectors, which
only makes sense with the teacher's full logits; records never hold them, so the trainer
offers `sparse_logit_mse` instead: the teacher's logits are known on S only up to a
per-position constant (l_i = logit_i - log Z), so both sides are centred over S first.
"""

from __future__ import annotations

import math

import torch

#: Smallest tail mass either side may have: 1 - sum_S p is not trustworthy below this.
TAIL_FLOOR = 1e-6
#: Teacher log-probabilities are clamped here, so a stored -inf stays finite.
MIN_LOGPROB = -100.0


def bucket_logprobs(student_logits, top_ids, top_logprobs, normalized: bool = False):
    """(student, teacher) log-probs over S ∪ {tail} at T=1, shape (..., k + 1), and a (...) mask of positions with labels.

    `normalized`: the student's input is already log-softmaxed (saves a pass over the vocabulary).

    `top_ids` < 0 marks missing candidates (padding, unmapped tokens); their mass falls into the tail.
    Positions with no candidate at all get a harmless dummy distribution, masked out by the returned mask.
    """
    valid = top_ids >= 0
    has = valid.any(-1)
    # A dummy candidate (id 0, prob 1) keeps empty positions finite, so no NaN reaches the gradient.
    first = torch.zeros_like(valid)
    first[..., 0] = True
    dummy = first & ~has.unsqueeze(-1)
    valid = valid | dummy
    ids = top_ids.clamp_min(0)
    teacher = _upcast(top_logprobs).clamp_min(MIN_LOGPROB).masked_fill(dummy, 0.0).masked_fill(~valid, -math.inf)
    logits = _upcast(student_logits)
    picked = logits.gather(-1, ids)
    if not normalized:
        picked = picked - torch.logsumexp(logits, -1, keepdim=True)
    student = picked.masked_fill(~valid, -math.inf)
    complete = valid.sum(-1, keepdim=True) >= logits.shape[-1]
    return _with_tail(student, complete), _with_tail(teacher, complete), has


def _with_tail(logprobs, complete):
    """Append log(1 - sum exp(logprobs)) (floored; -inf where the support is the whole vocabulary)."""
    mass = torch.logsumexp(logprobs, -1, keepdim=True)
    tail = torch.log((-torch.expm1(mass)).clamp_min(TAIL_FLOOR))
    return torch.cat([logprobs, tail.masked_fill(complete, -math.inf)], -1)


def _upcast(x):
    """float32 at least (float64 stays float64): bf16 log-probs are too coarse for a divergence."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def temper(logprobs, temperature: float):
    """A distribution over buckets raised to 1/T and renormalised (log space)."""
    return torch.log_softmax(logprobs / temperature, -1) if temperature != 1.0 else logprobs


def divergence(teacher, student, kind: str = "forward", beta: float = 0.5):
    """Per-position D between two log-prob vectors over the same buckets (the last dim)."""
    live = torch.isfinite(teacher)  # -inf in the same buckets on both sides (missing ids, dropped tail)
    t = torch.where(live, teacher, 0.0)
    s = torch.where(live, student, 0.0)
    if kind == "forward":
        terms = t.exp() * (t - s)
    elif kind == "reverse":
        terms = s.exp() * (s - t)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        mix = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), 0)
        terms = beta * t.exp() * (t - mix) + (1 - beta) * s.exp() * (s - mix)
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose one of forward, reverse, jsd")
    return (terms * live).sum(-1)


def sparse_divergence(student_logits, top_ids, top_logprobs, kind: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                      normalized: bool = False):  # fmt: skip
    """Per-position D(teacher || student) over S ∪ {tail} at temperature T, and the mask of positions with labels.

    `normalized`: `student_logits` are log-probabilities already (not for logit_mse, which needs logits).
    """
    if kind == "logit_mse":
        return sparse_logit_mse(student_logits, top_ids, top_logprobs)
    student, teacher, has = bucket_logprobs(student_logits, top_ids, top_logprobs, normalized)
    d = divergence(temper(teacher, temperature), temper(student, temperature), kind, beta)
    return d * has, has


def combine(ce, d_sum, count, alpha: float, temperature: float = 1.0, kind: str = "forward"):
    """alpha * CE + (1 - alpha) * T^2 * d_sum / count (T^2 keeps gradients comparable across T; not for logit_mse)."""
    scale = 1.0 if kind == "logit_mse" else temperature**2
    return alpha * ce + (1.0 - alpha) * scale * d_sum / count


def kd_loss(student_logits, labels, top_ids, top_logprobs, alpha: float = 0.5, temperature: float = 1.0,
            kind: str = "forward", beta: float = 0.5):  # fmt: skip
    """The whole objective for already-shifted logits (..., V), labels (...) with -100 ignored, top-k (..., k).

    Both terms are sums over label tokens divided by their number; positions without top-k add to CE only.
    """
    mask = labels != -100
    count = mask.sum().clamp_min(1)
    ce = torch.nn.functional.cross_entropy(
        _upcast(student_logits[mask]), labels[mask], reduction="sum"
    ) / count
    d, has = sparse_divergence(student_logits, top_ids, top_logprobs, kind, temperature, beta)
    return combine(ce, (d * (has & mask)).sum(), count, alpha, temperature, kind)


def logit_mse(student_logits, teacher_logits):
    """The seeds' logit matching: per-position mean squared difference of full logit vectors (needs full teacher logits)."""
    return (_upcast(student_logits) - _upcast(teacher_logits)).pow(2).mean(-1)


def sparse_logit_mse(student_logits, top_ids, top_logprobs):
    """Logit matching on S: both sides centred over S (teacher logits are known only up to log Z), MSE averaged over S.

    Returns (per-position value, mask of positions with labels), like sparse_divergence.
    """
    valid = top_ids >= 0
    has = valid.any(-1)
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    student = _upcast(student_logits).gather(-1, top_ids.clamp_min(0))
    teacher = _upcast(top_logprobs).clamp_min(MIN_LOGPROB)
    student = torch.where(valid, student, 0.0)
    teacher = torch.where(valid, teacher, 0.0)
    diff = (student - student.sum(-1, keepdim=True) / n) - (teacher - teacher.sum(-1, keepdim=True) / n)
    value = (diff.pow(2) * valid).sum(-1) / n.squeeze(-1)
    return value * has, has
