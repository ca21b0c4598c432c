"""X-Token (P-KL) projection math: a sparse W from the teacher's vocabulary onto the student's, and the
teacher's distribution moved through it (docs/objectives.md section 8.12; "X-Token: Projection-Guided
Cross-Tokenizer Knowledge Distillation", arXiv 2605.21699).

    P_S~(v | s_t) = sum_u P_T(u | s_t') W[u, v]        rows of W sum to 1

where s_t' is the teacher's state at the same character boundary as the student's state s_t
(`mmdistill.modalities.text.xtoken` re-tokenises and aligns).  The ordinary `reverse_kl` / `jsd`
objectives then score the student against P_S~ (the `kind: cross_tokenizer` teacher's StepDist).

W is initialised from string rules on the decoded token strings, first rule that applies:
  1. special tokens by role: the teacher's eos / pad / bos / unk -> the student's;
     another teacher special token -> the student special token with the same text;
  2. exact string match: the student token(s) whose string equals the teacher token's;
  3. longest prefix: the student token(s) whose string is the longest proper prefix of the
     teacher token's string (a multi-digit teacher numeral "123" -> the student's "1": the
     first piece the student would write);
  4. otherwise (empty strings, unmatched special tokens) the fallback (the student's unk).
Several student tokens with the same string share a row's weight equally.  Every teacher token
is projected (no partition into matched / unmatched tokens), so no teacher mass is dropped.
Student tokens longer than any teacher token (a word-level "####" under a character teacher)
receive no mass from W.  Where the student actually wrote such a token, the teacher has scored
its whole span on the rollout's text, and `move_span_mass` gives the token that exact
probability (taken from the span's first teacher token, so the total stays 1); this goes beyond
the X-Token rules, which would push the student to spell "####" as four "#".  Elsewhere
`smoothing` mixes in a uniform floor so reverse KL stays finite.

    python -m pytest tests/test_xtoken.py -q
"""

from __future__ import annotations

import torch
from torch import Tensor


def projection_from_strings(
    teacher_strings_Vt: list[str],
    student_strings_Vs: list[str],
    special_map: dict[int, int] | None = None,
    fallback_id: int | None = None,
) -> Tensor:
    """The sparse projection `W [Vt, Vs]` (float32, coalesced COO) from the string rules above.

    teacher_strings_Vt / student_strings_Vs: the decoded text of every token id ("" for special tokens)
    special_map:  teacher id -> student id for special tokens (rule 1)
    fallback_id:  the student id for teacher tokens no rule maps (rule 4); None leaves such rows empty
    """
    special_map = special_map or {}
    by_string: dict[str, list[int]] = {}
    for v, s in enumerate(student_strings_Vs):
        if s:
            by_string.setdefault(s, []).append(v)
    longest = max((len(s) for s in by_string), default=0)
    rows, cols, vals = [], [], []
    for u, s in enumerate(teacher_strings_Vt):
        if u in special_map:
            targets = [special_map[u]]
        elif s in by_string:
            targets = by_string[s]
        else:
            targets = next(
                (by_string[s[:n]] for n in range(min(len(s) - 1, longest), 0, -1) if s[:n] in by_string), None
            )
            if targets is None:
                targets = [] if fallback_id is None else [fallback_id]
        for v in targets:
            rows.append(u), cols.append(v), vals.append(1.0 / len(targets))
    W = torch.sparse_coo_tensor(
        torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
        torch.tensor(vals, dtype=torch.float32),
        (len(teacher_strings_Vt), len(student_strings_Vs)),
        check_invariants=True,
    )
    return W.coalesce()


def project_probs(teacher_logp_N_Vt: Tensor, W_Vt_Vs: Tensor) -> Tensor:
    """`P_T @ W`: the teacher's probabilities moved onto the student's vocabulary `[N, Vs]` (float32 or wider)."""
    Vt, Vs = W_Vt_Vs.shape
    if teacher_logp_N_Vt.shape[-1] != Vt:
        raise ValueError(
            f"teacher log-probs have {teacher_logp_N_Vt.shape[-1]} columns but W has Vt={Vt} rows; "
            "truncate the teacher's logits to its tokenizer's length before projecting"
        )
    W = W_Vt_Vs if W_Vt_Vs.is_coalesced() else W_Vt_Vs.coalesce()
    u_E, v_E = W.indices()
    dtype = torch.promote_types(teacher_logp_N_Vt.dtype, torch.float32)
    p_N_Vt = teacher_logp_N_Vt.to(dtype).exp()
    p_N_Vs = p_N_Vt.new_zeros(p_N_Vt.shape[0], Vs)
    return p_N_Vs.index_add_(1, v_E, p_N_Vt[:, u_E] * W.values().to(dtype))


def move_span_mass(
    p_N_Vs: Tensor, W_Vt_Vs: Tensor, span_p_N: Tensor, first_teacher_N: Tensor, student_token_N: Tensor
) -> Tensor:
    """Give a realised student token that spans several teacher tokens its exact teacher probability.

    W cannot express a student token longer than every teacher token ("####" under a character
    teacher): it gets no mass.  On the rollout's own text the teacher has scored the whole span,
    so `P_T(span) = prod of its teacher tokens' probabilities` is known, and it is a sub-event of
    the span's first teacher token u1.  That mass moves from u1's projection to the student token:
    `p(v) - P_T(span) W[u1, v] + P_T(span) [v = token]`; the total stays 1 and nothing goes
    negative.  Rows with `span_p_N = 0` are unchanged.
    """
    first_W_N_Vs = W_Vt_Vs.index_select(0, first_teacher_N).to_dense().to(p_N_Vs.dtype)
    span_p_N1 = span_p_N.to(p_N_Vs.dtype)[:, None]
    out = p_N_Vs - span_p_N1 * first_W_N_Vs
    out = out.scatter_add(1, student_token_N[:, None], span_p_N1)
    return out.clamp_min(0.0)


def smoothed_log(p_N_Vs: Tensor, smoothing: float = 0.0) -> Tensor:
    """`log((1 - smoothing) p + smoothing / Vs)`: a uniform floor keeps reverse KL finite; -inf where p = 0 and no floor."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must lie in [0, 1); got {smoothing}")
    if smoothing:
        p_N_Vs = (1.0 - smoothing) * p_N_Vs + smoothing / p_N_Vs.shape[-1]
    return p_N_Vs.log()


def project_logp(teacher_logp_N_Vt: Tensor, W_Vt_Vs: Tensor, smoothing: float = 0.0) -> Tensor:
    """Student-vocabulary log-probs `[N, Vs]` of `(1 - smoothing) P_T W + smoothing / Vs` (the P-KL target)."""
    return smoothed_log(project_probs(teacher_logp_N_Vt, W_Vt_Vs), smoothing)
