"""DAgger-style teacher/student mixing (2605.12913, DAgger for LM agents).

The behaviour policy interpolates teacher and student: at every step (a token here; a turn
for agents) the teacher acts with probability beta_k, else the student, and beta_k anneals
from `beta0` to 0 over the stage.  The student is trained on the teacher's labels at every
visited state, whichever policy acted there: the forward KL(pi_T || pi_S) to the teacher's
full distribution (`label: soft`) or the cross-entropy of the teacher's argmax (`hard`).

    python -m pytest tests/test_objectives_text_methods.py -k dagger
"""
from __future__ import annotations

import math


def mixture_beta(step: int, total_steps: int, beta0: float, schedule: str, anneal_fraction: float = 1.0) -> float:
    """beta_k: linear from beta0 to 0 over `anneal_fraction` of the stage, or exponential (beta0 * 0.5^(k / (0.1 * span)))."""
    span = max(1.0, anneal_fraction * total_steps)
    if schedule == "constant":
        return beta0
    if schedule == "linear":
        return beta0 * max(0.0, 1.0 - step / span)
    if schedule == "exponential":
        return beta0 * math.pow(0.5, step / (0.1 * span))
    raise ValueError(f"objective.schedule must be 'constant', 'linear' or 'exponential', got {schedule!r}")
