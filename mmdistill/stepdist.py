"""Step distributions: the per-step action distributions every objective talks to.

Each class implements the whole `mmdistill.interfaces.StepDist` Protocol; a member that has
no meaning for a family (top-k of a Gaussian) raises a ValueError that says what to use.

A text token is a Categorical step; a continuous robot action a diagonal
Gaussian (with a binary gripper: a GaussianBernoulli); a denoising step under
SDE sampling a Gaussian whose mean comes from the velocity.  Objectives are
written once against this protocol.

All methods return per-step tensors `[B, T]` with zeros where `mask_B_T` is 0.

    python -m pytest tests/test_stepdist.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mmdistill.interfaces import StepDist
from mmdistill.kernels import (
    chunked_divergence,
    chunked_entropy,
    chunked_token_logp,
    generalized_jsd,
    rows_per_chunk,
    topk_tail,
    topk_tail_divergence,
)


def _rows(mask_B_T: Tensor, rows: slice | Tensor) -> Tensor:
    """Indices into the masked (row-major) entries `[N]` that belong to batch rows `rows`, in their order."""
    row_of_N = mask_B_T.bool().nonzero()[:, 0]
    picked = torch.arange(mask_B_T.shape[0], device=mask_B_T.device)[rows]
    if picked.numel() < 2 or bool((picked[1:] > picked[:-1]).all()):  # slices and sorted routing rows: one mask
        return torch.isin(row_of_N, picked).nonzero()[:, 0]
    return torch.cat([(row_of_N == r).nonzero()[:, 0] for r in picked.tolist()])  # any other order, kept


def _no(what: str, family: str, fix: str) -> ValueError:
    return ValueError(f"{family} step distributions have no {what}; {fix}")


def _scatter(values_N: Tensor, mask_B_T: Tensor) -> Tensor:
    out = torch.zeros(mask_B_T.shape, dtype=values_N.dtype, device=values_N.device)
    return out.masked_scatter(mask_B_T.bool(), values_N)


class Categorical:
    """Full logits `[B, T, V]` (small vocabularies, tests, action tokens)."""

    def __init__(self, logits_B_T_V: Tensor, mask_B_T: Tensor, temperature: float = 1.0):
        self.logits_B_T_V = logits_B_T_V
        self.mask_B_T = mask_B_T
        self.temperature = temperature

    def logp_B_T_V(self) -> Tensor:
        logits = self.logits_B_T_V
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.log_softmax(logits / self.temperature, dim=-1)

    def log_prob(self, actions_B_T: Tensor) -> Tensor:
        lp = self.logp_B_T_V().gather(-1, actions_B_T.unsqueeze(-1)).squeeze(-1)
        return lp * self.mask_B_T

    def divergence(self, teacher: Categorical, beta: float) -> Tensor:
        return generalized_jsd(
            self.logits_B_T_V,
            teacher.logits_B_T_V,
            self.mask_B_T,
            beta=beta,
            temperature=self.temperature,
            reduction="none",
        )

    def kl(self, other: Categorical) -> Tensor:
        return self.divergence(other, beta=1.0)

    def mode(self) -> Tensor:
        """The most likely token `[B, T]`: the target of hard-CE / DAgger."""
        return self.logits_B_T_V.argmax(-1)

    def entropy(self) -> Tensor:
        lp = self.logp_B_T_V()
        return -(lp.exp() * lp).sum(-1) * self.mask_B_T

    def topk(self, k: int) -> TopKCategorical:
        """The teacher side of a top-k + tail divergence (no gradient)."""
        with torch.no_grad():
            idx, vals, tails = topk_tail(self.logits_B_T_V[self.mask_B_T.bool()], k, temperature=self.temperature)
        return TopKCategorical(idx, vals, tails, self.mask_B_T)

    def select(self, rows: slice | Tensor) -> Categorical:
        return Categorical(self.logits_B_T_V[rows], self.mask_B_T[rows], self.temperature)

    def to(self, device: torch.device | str) -> Categorical:
        return Categorical(self.logits_B_T_V.to(device), self.mask_B_T.to(device), self.temperature)


class HiddenCategorical:
    """A Categorical defined lazily by hidden states and an LM head.

    Only the masked positions are ever turned into logits, `chunk_size` rows at
    a time, so `B x T x V` logits never exist at once (V = 151,936 for Qwen).
    `vocab_size` truncates padded heads to the tokenizer's real vocabulary.
    """

    def __init__(
        self,
        hidden_B_T_H: Tensor,
        head_weight_V_H: Tensor,
        mask_B_T: Tensor,
        vocab_size: int | None = None,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        head_bias_V: Tensor | None = None,
    ):
        self.hidden_B_T_H = hidden_B_T_H
        self.head_weight_V_H = head_weight_V_H
        self.head_bias_V = head_bias_V
        self.mask_B_T = mask_B_T
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.chunk_size = chunk_size

    def rows(self) -> Tensor:
        return self.hidden_B_T_H[self.mask_B_T.bool()]

    def select(self, idx: Tensor | slice) -> HiddenCategorical:
        """The same distribution on batch rows `idx` (micro-batches of a teacher scored in one large batch; routing)."""
        return HiddenCategorical(
            self.hidden_B_T_H[idx],
            self.head_weight_V_H,
            self.mask_B_T[idx],
            vocab_size=self.vocab_size,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            head_bias_V=self.head_bias_V,
        )

    def to(self, device: torch.device | str) -> HiddenCategorical:
        """Move a teacher scored on another device next to the student (hidden states and head)."""
        bias = self.head_bias_V.to(device) if self.head_bias_V is not None else None
        return HiddenCategorical(
            self.hidden_B_T_H.to(device),
            self.head_weight_V_H.to(device),
            self.mask_B_T.to(device),
            vocab_size=self.vocab_size,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            head_bias_V=bias,
        )

    def log_prob(self, actions_B_T: Tensor) -> Tensor:
        lp_N = chunked_token_logp(
            self.rows(),
            self.head_weight_V_H,
            actions_B_T[self.mask_B_T.bool()],
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            bias=self.head_bias_V,
        )
        return _scatter(lp_N, self.mask_B_T)

    def divergence(self, teacher: HiddenCategorical | TopKCategorical | RoutedCategorical, beta: float) -> Tensor:
        """Per-step generalized JSD with self as student (beta=0 forward KL(T||S), 1 reverse KL(S||T))."""
        if isinstance(teacher, RoutedCategorical):
            return teacher.combine(lambda rows, part: self.select(rows).divergence(part, beta))
        if isinstance(teacher, TopKCategorical):
            return self._topk_divergence(teacher, beta)
        vocab = self.vocab_size or teacher.vocab_size
        if vocab is None and self.head_weight_V_H.shape[0] != teacher.head_weight_V_H.shape[0]:
            vocab = min(self.head_weight_V_H.shape[0], teacher.head_weight_V_H.shape[0])
        d_N = chunked_divergence(
            self.rows(),
            self.head_weight_V_H,
            teacher.rows(),
            teacher.head_weight_V_H,
            beta=beta,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            vocab_size=vocab,
            student_head_bias=self.head_bias_V,
            teacher_head_bias=teacher.head_bias_V,
        )
        return _scatter(d_N, self.mask_B_T)

    def kl(self, other: HiddenCategorical) -> Tensor:
        return self.divergence(other, beta=1.0)

    def entropy(self) -> Tensor:
        e_N = chunked_entropy(
            self.rows(),
            self.head_weight_V_H,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            bias=self.head_bias_V,
        )
        return _scatter(e_N, self.mask_B_T)

    def rows_per_chunk(self) -> int:
        return rows_per_chunk(self.chunk_size, self.vocab_size or self.head_weight_V_H.shape[0])

    def mode(self) -> Tensor:
        """The most likely token `[B, T]` (0 where the mask is 0), computed chunk by chunk."""
        out = []
        with torch.no_grad():
            for h in self.rows().split(self.rows_per_chunk()):
                logits = F.linear(h, self.head_weight_V_H, self.head_bias_V)
                out.append((logits[:, : self.vocab_size] if self.vocab_size is not None else logits).argmax(-1))
        mode_N = torch.cat(out) if out else self.mask_B_T.new_zeros(0, dtype=torch.long)
        return torch.zeros(self.mask_B_T.shape, dtype=torch.long, device=self.mask_B_T.device).masked_scatter(
            self.mask_B_T.bool(), mode_N
        )

    def topk(self, k: int) -> TopKCategorical:
        """The teacher side of a top-k + tail divergence (no gradient)."""
        idx, vals, tails = [], [], []
        with torch.no_grad():
            for h in self.rows().split(self.rows_per_chunk()):
                logits = F.linear(h, self.head_weight_V_H, self.head_bias_V)
                if self.vocab_size is not None:
                    logits = logits[:, : self.vocab_size]
                i, v, t = topk_tail(logits, k, temperature=self.temperature)
                idx.append(i), vals.append(v), tails.append(t)
        return TopKCategorical(torch.cat(idx), torch.cat(vals), torch.cat(tails), self.mask_B_T)

    def _topk_divergence(self, teacher: TopKCategorical, beta: float) -> Tensor:
        rows = self.rows()
        outs = []
        step = self.rows_per_chunk()
        for start in range(0, rows.shape[0], step):
            sl = slice(start, start + step)

            def chunk(h: Tensor, w: Tensor, sl: slice = sl) -> Tensor:
                logits = F.linear(h, w, self.head_bias_V)
                if self.vocab_size is not None:
                    logits = logits[:, : self.vocab_size]
                return topk_tail_divergence(
                    logits,
                    teacher.topk_idx_N_K[sl],
                    teacher.topk_logp_N_K[sl],
                    teacher.tail_logp_N[sl],
                    beta=beta,
                    temperature=self.temperature,
                )

            outs.append(checkpoint(chunk, rows[sl], self.head_weight_V_H, use_reentrant=False))
        d_N = torch.cat(outs) if outs else rows.new_zeros(0)
        return _scatter(d_N, self.mask_B_T)


class RoutedCategorical:
    """Several teachers, each owning some batch rows (multi-teacher routing by task tag).

    `parts` is a list of (row indices, that teacher's StepDist on those rows); every row
    belongs to exactly one part.  Per-step results are assembled back into `[B, T]`.
    """

    def __init__(self, parts: list[tuple[Tensor, object]], mask_B_T: Tensor):
        self.parts, self.mask_B_T = parts, mask_B_T

    def combine(self, fn) -> Tensor:  # fn(rows, part_dist) -> [len(rows), T]
        out_B_T = None
        for rows, part in self.parts:
            vals = fn(rows, part)
            if out_B_T is None:
                out_B_T = vals.new_zeros(self.mask_B_T.shape)
            out_B_T[rows] = vals
        return out_B_T

    def log_prob(self, actions_B_T: Tensor) -> Tensor:
        return self.combine(lambda rows, part: part.log_prob(actions_B_T[rows]))

    def entropy(self) -> Tensor:
        return self.combine(lambda rows, part: part.entropy())

    def kl(self, other: StepDist) -> Tensor:
        raise _no(
            "student side", "routed teacher", "routed teachers are only the target: call student.divergence(teacher)"
        )

    def divergence(self, teacher: StepDist, beta: float) -> Tensor:
        raise _no(
            "student side", "routed teacher", "routed teachers are only the target: call student.divergence(teacher)"
        )

    def mode(self) -> Tensor:
        out_B_T = torch.zeros(self.mask_B_T.shape, dtype=torch.long, device=self.mask_B_T.device)
        for rows, part in self.parts:
            out_B_T[rows] = part.mode()
        return out_B_T

    def topk(self, k: int) -> RoutedCategorical:
        return RoutedCategorical([(rows, part.topk(k)) for rows, part in self.parts], self.mask_B_T)

    def select(self, idx: Tensor | slice) -> RoutedCategorical:
        B = self.mask_B_T.shape[0]
        keep_B = torch.zeros(B, dtype=torch.bool, device=self.mask_B_T.device)
        keep_B[idx] = True
        new_index_B = keep_B.long().cumsum(0) - 1
        parts = []
        for rows, part in self.parts:
            mine = rows[keep_B[rows]]
            if mine.numel():
                parts.append((new_index_B[mine], part.select(torch.searchsorted(rows, mine))))
        return RoutedCategorical(parts, self.mask_B_T[idx])

    def to(self, device: torch.device | str) -> RoutedCategorical:
        return RoutedCategorical(
            [(rows.to(device), part.to(device)) for rows, part in self.parts], self.mask_B_T.to(device)
        )


class TopKCategorical:
    """A teacher distribution kept as its top-k log-probs plus one tail bucket."""

    def __init__(self, topk_idx_N_K: Tensor, topk_logp_N_K: Tensor, tail_logp_N: Tensor, mask_B_T: Tensor):
        self.topk_idx_N_K = topk_idx_N_K
        self.topk_logp_N_K = topk_logp_N_K
        self.tail_logp_N = tail_logp_N
        self.mask_B_T = mask_B_T

    def log_prob(self, actions_B_T: Tensor) -> Tensor:
        """Log-prob of actions in the top-k; actions outside get the tail bucket's mass (an upper bound)."""
        a_N = actions_B_T[self.mask_B_T.bool()]
        hit = self.topk_idx_N_K == a_N.unsqueeze(-1)
        lp_N = torch.where(hit.any(-1), (self.topk_logp_N_K * hit).sum(-1), self.tail_logp_N)
        return _scatter(lp_N, self.mask_B_T)

    def kl(self, other: StepDist) -> Tensor:
        raise _no("student side", "top-k", "a top-k teacher is only the target: call student.divergence(teacher)")

    def divergence(self, teacher: StepDist, beta: float) -> Tensor:
        raise _no("student side", "top-k", "a top-k teacher is only the target: call student.divergence(teacher)")

    def mode(self) -> Tensor:
        """The most likely stored token `[B, T]` (the top-k lists are sorted, most likely first)."""
        out = torch.zeros(self.mask_B_T.shape, dtype=torch.long, device=self.mask_B_T.device)
        return out.masked_scatter(self.mask_B_T.bool(), self.topk_idx_N_K[:, 0])

    def topk(self, k: int) -> TopKCategorical:
        """Keep the first k stored tokens; the mass of the others joins the tail bucket."""
        K = self.topk_idx_N_K.shape[1]
        if k >= K:
            return self
        rest = torch.cat([self.topk_logp_N_K[:, k:], self.tail_logp_N[:, None]], dim=1)
        return TopKCategorical(
            self.topk_idx_N_K[:, :k], self.topk_logp_N_K[:, :k], torch.logsumexp(rest, dim=1), self.mask_B_T
        )

    def select(self, rows: slice | Tensor) -> TopKCategorical:
        n = _rows(self.mask_B_T, rows)
        return TopKCategorical(self.topk_idx_N_K[n], self.topk_logp_N_K[n], self.tail_logp_N[n], self.mask_B_T[rows])

    def to(self, device: torch.device | str) -> TopKCategorical:
        return TopKCategorical(
            self.topk_idx_N_K.to(device),
            self.topk_logp_N_K.to(device),
            self.tail_logp_N.to(device),
            self.mask_B_T.to(device),
        )

    def entropy(self) -> Tensor:
        p = self.topk_logp_N_K.exp()
        h = -(p * self.topk_logp_N_K).sum(-1)
        tail = self.tail_logp_N
        h = h - torch.where(torch.isfinite(tail), tail.exp() * tail, torch.zeros_like(tail))
        return _scatter(h, self.mask_B_T)


class Gaussian:
    """Diagonal Gaussian per step: `mean_B_T_D`, `std_B_T_D` (continuous actions, SDE denoising steps).

    Log-probs and KLs sum over the action dimensions (the true log-density).
    """

    def __init__(self, mean_B_T_D: Tensor, std_B_T_D: Tensor, mask_B_T: Tensor):
        self.mean_B_T_D = mean_B_T_D
        self.std_B_T_D = std_B_T_D.expand_as(mean_B_T_D)
        self.mask_B_T = mask_B_T

    def log_prob(self, actions_B_T_D: Tensor) -> Tensor:
        var = self.std_B_T_D**2
        lp = -((actions_B_T_D - self.mean_B_T_D) ** 2) / (2 * var) - self.std_B_T_D.log() - 0.5 * math.log(2 * math.pi)
        return lp.sum(-1) * self.mask_B_T

    def divergence(self, teacher: Gaussian, beta: float) -> Tensor:
        """Per-step KL in closed form: beta = 1 reverse KL(self || teacher), beta = 0 forward KL(teacher || self)."""
        if beta == 1.0:
            return self.kl(teacher)
        if beta == 0.0:
            return teacher.kl(self)
        raise ValueError(
            f"the generalized JSD(beta={beta}) between Gaussians has no closed form; use beta 0 (forward KL) or 1 (reverse KL)"
        )

    def mode(self) -> Tensor:
        """The most likely action `[B, T, D]` (the mean): the target of hard-CE / DAgger."""
        return self.mean_B_T_D

    def kl(self, other: Gaussian) -> Tensor:
        v1, v2 = self.std_B_T_D**2, other.std_B_T_D**2
        kl = (
            (other.std_B_T_D / self.std_B_T_D).log() + (v1 + (self.mean_B_T_D - other.mean_B_T_D) ** 2) / (2 * v2) - 0.5
        )
        return kl.sum(-1) * self.mask_B_T

    def entropy(self) -> Tensor:
        h = 0.5 * math.log(2 * math.pi * math.e) + self.std_B_T_D.log()
        return h.sum(-1) * self.mask_B_T

    def topk(self, k: int) -> StepDist:
        raise _no("top-k form", "Gaussian", "use objective topk: null (continuous actions compare in closed form)")

    def select(self, rows: slice | Tensor) -> Gaussian:
        return Gaussian(self.mean_B_T_D[rows], self.std_B_T_D[rows], self.mask_B_T[rows])

    def to(self, device: torch.device | str) -> Gaussian:
        return Gaussian(self.mean_B_T_D.to(device), self.std_B_T_D.to(device), self.mask_B_T.to(device))


@dataclass
class VelocityStepDist:
    """A flow model's denoising step seen by objectives: its velocity `[B, T, D]` on the rollout's
    states and, for stochastic (SDE) rollouts, the step Gaussian `N(mu(x_t, v), std^2)` built from it.

    velocity_B_T_D:  the model's velocity at each state (with gradient for the student)
    gaussian:        the SDE step distribution, None for deterministic (ODE / flow-matching) rollouts
    kl_weight_B_T:   w(t) with `KL(step(v1) || step(v2)) = w(t) ||v1 - v2||^2` (None without noise)
    dt_B_T:          sigma_next - sigma (< 0)
    logprob_reduce:  "sum" (true log-density) or "mean" over D (Flow-GRPO's code), for `log_prob`
    """

    velocity_B_T_D: Tensor
    gaussian: Gaussian | None
    kl_weight_B_T: Tensor | None
    dt_B_T: Tensor
    mask_B_T: Tensor
    logprob_reduce: str = "sum"

    def divergence(self, other: VelocityStepDist, beta: float) -> Tensor:
        """Per-step KL between two step Gaussians at the same states: both share the std, so forward
        (beta 0) and reverse (beta 1) are the same `w(t) ||v_self - v_other||^2` (docs/objectives.md section 6)."""
        if beta not in (0.0, 1.0):
            raise ValueError(f"flow steps have closed-form forward / reverse KL only (beta 0 or 1); got {beta}")
        if self.kl_weight_B_T is None:
            raise ValueError(
                "this rollout is deterministic (noise_level 0); sample with rollout.noise_level > 0 for step KLs"
            )
        return self.kl_weight_B_T * (self.velocity_B_T_D - other.velocity_B_T_D).pow(2).sum(-1) * self.mask_B_T

    def mode(self) -> Tensor:
        """The most likely next state of every step (the step Gaussian's mean)."""
        if self.gaussian is None:
            raise ValueError("this rollout is deterministic (noise_level 0); it has no step Gaussians")
        return self.gaussian.mean_B_T_D

    def log_prob(self, actions_B_T_D: Tensor) -> Tensor:
        """Log-probs `[B, T]` of the sampled next states on the rollout's convention."""
        if self.gaussian is None:
            raise ValueError("this rollout is deterministic (noise_level 0 or flow matching); it has no step log-probs")
        lp_B_T = self.gaussian.log_prob(actions_B_T_D)
        return lp_B_T if self.logprob_reduce == "sum" else lp_B_T / actions_B_T_D.shape[-1]

    def kl(self, other: VelocityStepDist) -> Tensor:
        return self.divergence(other, beta=1.0)

    def entropy(self) -> Tensor:
        if self.gaussian is None:
            raise ValueError("this rollout is deterministic (noise_level 0); it has no step entropy")
        return self.gaussian.entropy()

    def topk(self, k: int) -> StepDist:
        raise _no("top-k form", "flow (velocity)", "use objective topk: null")

    def select(self, rows: slice | Tensor) -> VelocityStepDist:
        g = self.gaussian.select(rows) if self.gaussian is not None else None
        w = self.kl_weight_B_T[rows] if self.kl_weight_B_T is not None else None
        return VelocityStepDist(
            self.velocity_B_T_D[rows], g, w, self.dt_B_T[rows], self.mask_B_T[rows], self.logprob_reduce
        )

    def to(self, device: torch.device | str) -> VelocityStepDist:
        g = self.gaussian.to(device) if self.gaussian is not None else None
        w = self.kl_weight_B_T.to(device) if self.kl_weight_B_T is not None else None
        return VelocityStepDist(
            self.velocity_B_T_D.to(device), g, w, self.dt_B_T.to(device), self.mask_B_T.to(device), self.logprob_reduce
        )


class GaussianBernoulli:
    """A robot action per step: Gaussian arm dimensions times an independent binary gripper.

    mean_B_T_D, std_B_T_D:  the diagonal Gaussian over the D continuous arm dimensions
    gripper_logit_B_T:      logit of P(close); the gripper is independent of the arm
    open_value, close_value: how the gripper is written in an action (robosuite: -1 open, +1 close)

    repeat:                 the decision is executed `repeat` times in a row (an action chunk that
                            is ONE decision): actions hold `repeat` copies, `[B, T, repeat * (D + 1)]`

    An action `[B, T, D + 1]` holds the arm dimensions first and the gripper last.  `log_prob` reads
    the gripper by its side of the midpoint of `open_value` and `close_value` (robosuite
    acts on the sign, so a continuous gripper value from another policy is read the same way);
    with `repeat > 1` it reads the mean of the copies (exact for a repeated action; a chunk of
    independent draws is read as its average).  `mode`, `sample` and `from_noise` return the copies.
    Log-probs, entropies and KLs are the arm's summed Gaussian terms plus the gripper's Bernoulli
    term (the true log-mass-density of the product, one decision per step whatever `repeat`).
    `entropy_per_dim()` gives the D + 1 terms `[B, T, D + 1]` for logging; `arm` is the Gaussian
    part as a `Gaussian`.
    """

    def __init__(
        self,
        mean_B_T_D: Tensor,
        std_B_T_D: Tensor,
        gripper_logit_B_T: Tensor,
        mask_B_T: Tensor,
        open_value: float = -1.0,
        close_value: float = 1.0,
        repeat: int = 1,
    ):
        if open_value == close_value:
            raise ValueError(f"gripper open_value and close_value are both {open_value}; use distinct values (-1, 1)")
        if int(repeat) < 1:
            raise ValueError(
                f"GaussianBernoulli repeat={repeat}: a decision is executed at least once; use repeat >= 1"
            )
        self.arm = Gaussian(mean_B_T_D, std_B_T_D, mask_B_T)
        self.gripper_logit_B_T = gripper_logit_B_T
        self.mask_B_T = mask_B_T
        self.open_value, self.close_value = float(open_value), float(close_value)
        self.repeat = int(repeat)

    @classmethod
    def from_flat(
        cls,
        flat_B_T_F: Tensor,
        mask_B_T: Tensor,
        log_std_D: Tensor | None = None,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
        open_value: float = -1.0,
        close_value: float = 1.0,
        repeat: int = 1,
    ) -> GaussianBernoulli:
        """Build from a policy head's flat output.

        Without `log_std_D`, F = 2D + 1 laid out `[mean (D), log_std (D), gripper_logit (1)]`
        (a state-dependent std); with it (a state-independent parameter broadcast over `[B, T]`),
        F = D + 1 laid out `[mean (D), gripper_logit (1)]`.  log-std is clamped to
        `[log_std_min, log_std_max]` (no gradient outside the range).
        """
        F_ = flat_B_T_F.shape[-1]
        if log_std_D is None:
            if F_ < 3 or F_ % 2 == 0:
                raise ValueError(
                    f"GaussianBernoulli.from_flat: last dim {F_} is not 2D + 1 [mean, log_std, gripper_logit]; "
                    "pass log_std_D for a state-independent std (then F = D + 1)"
                )
            D = (F_ - 1) // 2
            mean, log_std = flat_B_T_F[..., :D], flat_B_T_F[..., D : 2 * D]
        else:
            D = log_std_D.shape[-1]
            if F_ != D + 1:
                raise ValueError(
                    f"GaussianBernoulli.from_flat: last dim {F_} != D + 1 = {D + 1} with log_std_D of {D} dims; "
                    "lay the output out as [mean (D), gripper_logit (1)]"
                )
            mean, log_std = flat_B_T_F[..., :D], log_std_D.expand_as(flat_B_T_F[..., :D])
        std = log_std.clamp(log_std_min, log_std_max).exp()
        return cls(mean, std, flat_B_T_F[..., -1], mask_B_T, open_value, close_value, repeat)

    @property
    def mean_B_T_D(self) -> Tensor:
        return self.arm.mean_B_T_D

    @property
    def std_B_T_D(self) -> Tensor:
        return self.arm.std_B_T_D

    def _like(self, mean: Tensor, std: Tensor, logit: Tensor, mask: Tensor) -> GaussianBernoulli:
        return GaussianBernoulli(mean, std, logit, mask, self.open_value, self.close_value, self.repeat)

    def _check(self, other: object, what: str) -> GaussianBernoulli:
        if not isinstance(other, GaussianBernoulli):
            raise ValueError(
                f"{what}: a GaussianBernoulli compares only with another GaussianBernoulli, got "
                f"{type(other).__name__}; give student and teacher the same arm + gripper head"
            )
        if other.mean_B_T_D.shape[-1] != self.mean_B_T_D.shape[-1]:
            raise ValueError(
                f"{what}: arm dims differ (self {self.mean_B_T_D.shape[-1]}, other {other.mean_B_T_D.shape[-1]}); "
                "student and teacher must act in the same action space"
            )
        if other.repeat != self.repeat:
            raise ValueError(
                f"{what}: one decision is repeated {self.repeat} times by self, {other.repeat} by other; "
                "give student and teacher the same chunk_size"
            )
        return other

    def gripper_closed(self, actions_B_T_A: Tensor) -> Tensor:
        """True where an action's gripper (last dim) is on the close side of the open/close midpoint."""
        g = actions_B_T_A[..., -1]
        mid = 0.5 * (self.open_value + self.close_value)
        return g > mid if self.close_value > self.open_value else g < mid

    def gripper_log_prob(self, closed_B_T: Tensor) -> Tensor:
        """log P(gripper = closed_B_T) `[B, T]`, unmasked."""
        sign = closed_B_T.to(self.gripper_logit_B_T.dtype) * 2 - 1
        return F.logsigmoid(sign * self.gripper_logit_B_T)

    def decision(self, actions_B_T_C: Tensor) -> Tensor:
        """The one decision `[B, T, D + 1]` of actions `[B, T, repeat * (D + 1)]`: the mean of the copies."""
        D = self.mean_B_T_D.shape[-1]
        if actions_B_T_C.shape[-1] != self.repeat * (D + 1):
            raise ValueError(
                f"GaussianBernoulli.log_prob: actions have {actions_B_T_C.shape[-1]} dims, expected "
                f"repeat * (D + 1) = {self.repeat} * {D + 1} (arm dims, then the gripper last, per copy)"
            )
        if self.repeat == 1:
            return actions_B_T_C
        return actions_B_T_C.unflatten(-1, (self.repeat, D + 1)).mean(-2)

    def _action(self, arm_B_T_D: Tensor, closed_B_T: Tensor) -> Tensor:
        """The action `[B, T, repeat * (D + 1)]` of arm values and a gripper decision: the arm, then the gripper
        written as its open / close value, the decision copied `repeat` times."""
        g = torch.where(closed_B_T, self.close_value, self.open_value).to(arm_B_T_D.dtype)
        action_B_T_A = torch.cat([arm_B_T_D, g.unsqueeze(-1)], dim=-1)
        return action_B_T_A if self.repeat == 1 else action_B_T_A.repeat(*([1] * (action_B_T_A.dim() - 1)), self.repeat)

    def log_prob(self, actions_B_T_A: Tensor) -> Tensor:
        """log N(arm) + log Bernoulli(gripper) of actions `[B, T, repeat * (D + 1)]`, `[B, T]`."""
        D = self.mean_B_T_D.shape[-1]
        actions_B_T_A = self.decision(actions_B_T_A)
        arm = self.arm.log_prob(actions_B_T_A[..., :D])
        return arm + self.gripper_log_prob(self.gripper_closed(actions_B_T_A)) * self.mask_B_T

    def _gripper_entropy(self) -> Tensor:
        z = self.gripper_logit_B_T
        p = torch.sigmoid(z)
        return p * F.softplus(-z) + (1 - p) * F.softplus(z)

    def entropy_per_dim(self) -> Tensor:
        """Per-dimension entropies `[B, T, D + 1]` (arm dims in nats of density, gripper last), 0 where masked."""
        h_arm = 0.5 * math.log(2 * math.pi * math.e) + self.std_B_T_D.log()
        h = torch.cat([h_arm, self._gripper_entropy().unsqueeze(-1)], dim=-1)
        return h * self.mask_B_T.unsqueeze(-1)

    def entropy(self) -> Tensor:
        return self.arm.entropy() + self._gripper_entropy() * self.mask_B_T

    def kl(self, other: GaussianBernoulli) -> Tensor:
        """KL(self || other) in closed form: the arm Gaussians' KL plus the grippers' Bernoulli KL."""
        other = self._check(other, "GaussianBernoulli.kl")
        z, zo = self.gripper_logit_B_T, other.gripper_logit_B_T
        p = torch.sigmoid(z)
        # log p = -softplus(-z), log(1 - p) = -softplus(z)
        kl_g = p * (F.softplus(-zo) - F.softplus(-z)) + (1 - p) * (F.softplus(zo) - F.softplus(z))
        return self.arm.kl(other.arm) + kl_g * self.mask_B_T

    def divergence(self, teacher: GaussianBernoulli, beta: float) -> Tensor:
        """Per-step KL in closed form: beta = 1 reverse KL(self || teacher), beta = 0 forward KL(teacher || self)."""
        teacher = self._check(teacher, "GaussianBernoulli.divergence")
        if beta == 1.0:
            return self.kl(teacher)
        if beta == 0.0:
            return teacher._like(teacher.mean_B_T_D, teacher.std_B_T_D, teacher.gripper_logit_B_T, self.mask_B_T).kl(
                self
            )
        raise ValueError(
            f"the generalized JSD(beta={beta}) of a Gaussian arm has no closed form; "
            "use beta 0 (forward KL) or 1 (reverse KL)"
        )

    def mode(self) -> Tensor:
        """The most likely action `[B, T, D + 1]`: the arm mean and the likelier gripper (close when logit > 0)."""
        return self._action(self.mean_B_T_D, self.gripper_logit_B_T > 0)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One action `[B, T, repeat * (D + 1)]` per step (no gradient): arm from the Gaussian, gripper as open /
        close value."""
        with torch.no_grad():
            eps = torch.randn(
                self.mean_B_T_D.shape, generator=generator, dtype=self.mean_B_T_D.dtype, device=self.mean_B_T_D.device
            )
            arm = self.mean_B_T_D + self.std_B_T_D * eps
            u = torch.rand(
                self.gripper_logit_B_T.shape,
                generator=generator,
                dtype=self.gripper_logit_B_T.dtype,
                device=self.gripper_logit_B_T.device,
            )
            return self._action(arm, u < torch.sigmoid(self.gripper_logit_B_T))

    def from_noise(self, eps_B_T_E: Tensor) -> Tensor:
        """The action `[B, T, repeat * (D + 1)]` that standard-normal noise `[B, T, E >= D + 1]` selects (no
        gradient): arm `mean + std * eps[:D]`, gripper closed when `Phi(eps[D]) < sigmoid(logit)` (an exact
        Bernoulli draw from a normal variate), so pre-drawn noise gives the same episode in any batching."""
        D = self.mean_B_T_D.shape[-1]
        if eps_B_T_E.shape[-1] < D + 1:
            raise ValueError(
                f"GaussianBernoulli.from_noise: noise has {eps_B_T_E.shape[-1]} dims, needs >= D + 1 = {D + 1}"
            )
        with torch.no_grad():
            eps = eps_B_T_E.to(self.mean_B_T_D.dtype)
            arm = self.mean_B_T_D + self.std_B_T_D * eps[..., :D]
            u = 0.5 * (1 + torch.erf(eps[..., D] / math.sqrt(2)))
            return self._action(arm, u < torch.sigmoid(self.gripper_logit_B_T))

    def topk(self, k: int) -> StepDist:
        raise _no(
            "top-k form", "GaussianBernoulli (arm + gripper)", "use objective topk: null (its KLs are closed form)"
        )

    def select(self, rows: slice | Tensor) -> GaussianBernoulli:
        return self._like(
            self.mean_B_T_D[rows], self.std_B_T_D[rows], self.gripper_logit_B_T[rows], self.mask_B_T[rows]
        )

    def to(self, device: torch.device | str) -> GaussianBernoulli:
        return self._like(
            self.mean_B_T_D.to(device),
            self.std_B_T_D.to(device),
            self.gripper_logit_B_T.to(device),
            self.mask_B_T.to(device),
        )
