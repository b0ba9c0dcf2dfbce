"""What the divergence kernels (``kernels/divergence.py``, ``csrc/divergence.cpp``) and the ops
that call them agree on, declared once: the divergence a ``beta`` selects, the rows of the
per-slice statistics, the columns of the per-row statistics the second pass and the backward
read, and the math options every launcher takes as one :class:`DivergenceSpec`.

Plain Python, without triton, so that ``fastalign.ops`` (which must import where triton is not
installed) uses the numbers the kernels are compiled with; ``csrc/divergence.h`` repeats them
with a pointer back here.

``beta`` follows TRL's ``DistillationTrainer``: 0 is the forward KL(p_t || p_s), 1 the reverse
KL(p_s || p_t), anything between the generalized JSD
``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = (1 - beta) p_s + beta p_t``.
"""

from __future__ import annotations

from typing import NamedTuple

# The divergence a beta selects (a compile-time constant of every kernel).
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2

# Rows of the [PARTIALS, N] first-pass statistics of one vocabulary slice: per side the max key
# (softcap(z), before the temperature) and sum exp(s) with s = (key - max) / T; the cross term
# of the KL modes (REVERSE_KL: sum exp(s) (s - s_t), FORWARD_KL: sum exp(s_t) (s_t - s); 0 for
# the JSD); and sum exp(s) s for the student's entropy (0 unless asked for).
MAX, SUM_EXP, TEACHER_MAX, TEACHER_SUM_EXP, CROSS, SUM_EXP_SHIFTED = range(6)
PARTIALS = 6
# A masked row's partials: they merge to divergence 0 and entropy 0.
MASKED_PARTIALS = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)

# Columns of the [N, ROW_STATS] merged statistics: each side's max key and log-sum (kept apart,
# so log p = (key - max) / T - log-sum keeps its bits for huge logits), the student's entropy,
# and AUX, the one number per row the backward needs besides them: REVERSE_KL the shift
# log S - log S_t + KL, FORWARD_KL the divergence, JSD KL(p_s || m) (each NaN when the
# divergence is, so that a NaN or infinite divergence never gets a finite gradient).
ROW_MAX, LOG_SUM, TEACHER_ROW_MAX, TEACHER_LOG_SUM, AUX, ENTROPY = range(6)
ROW_STATS = 6

# Rows of the [2, N] second-pass (JSD) sums of one slice: sum p_t log(p_t / m), sum p_s log(p_s / m).
TEACHER_TERM, STUDENT_TERM = 0, 1


class DivergenceSpec(NamedTuple):
    """The math of one call, as every launcher takes it (``spec=``). The JSD's mixture weights
    are ``1 - beta`` (the student's) and ``beta`` (the teacher's), each formed in float64
    before a kernel rounds it to float32: ``1 - beta`` rounded from a float32 ``beta`` would be
    0 for a beta within 6e-8 of 1."""
    mode: int
    beta: float
    inv_temperature: float
    softcap: float | None
    teacher_softcap: float | None

    @property
    def student_weight(self) -> float:
        return 1.0 - self.beta


def mode_of(beta: float) -> int:
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD


def divergence_spec(beta: float, inv_temperature: float, softcap: float | None,
                    teacher_softcap: float | None) -> DivergenceSpec:
    return DivergenceSpec(mode_of(beta), beta, inv_temperature, softcap, teacher_softcap)
