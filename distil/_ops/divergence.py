"""The divergences the KL+CE losses offer in place of the forward KL, and their one argument check.

With p = softmax(teacher / T) and q = softmax(student / T), every divergence is taken per row, times T²
(as distiller.py's KL), and averaged over the selected rows (batchmean):

- ``"forward_kl"``: KL(p‖q) (distiller.py's ``loss_ce``; the default);
- ``"reverse_kl"``: KL(q‖p);
- ``"jsd"``: β·KL(p‖m) + (1 − β)·KL(q‖m), m = β·p + (1 − β)·q, β = ``jsd_beta`` in [0, 1]: TRL's
  ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=β)`` and Liger's
  ``LigerJSD(beta=β)``; as both special-case them, β = 0 is the forward KL and β = 1 the reverse KL
  (the mixture formula itself vanishes there);
- ``"skew_kl"``: KL(p‖α·p + (1 − α)·q) and ``"skew_reverse_kl"``: KL(q‖α·q + (1 − α)·p), α = ``skew_alpha``
  in [0, 1) (DistiLLM's skew KLs); α = 0 is the plain KL;
- ``"tvd"``: ½·Σ|p − q|, with the subgradient sign(0) = 0 where p_j = q_j.

Near β = 0 or 1 the JSD is O(β²) (or O((1 − β)²)) from per-token terms of O(β) that cancel, so
float32 keeps about 1e-7 / β of relative accuracy there (1e-3 at β = 1e-4).
A token of probability 0 (a -inf logit) contributes exactly 0; a divergence that is infinite (the
reverse KL where p_j = 0 < q_j, as the forward KL where q_j = 0 < p_j) is +inf.
The kernels: csrc/divergence.h (CPU) and kernels/divergence.py (Triton); the float64 definitions:
distil.reference.divergence_rows.
"""
import numbers

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
JSD_BETA = 0.5
SKEW_ALPHA = 0.1
_SKEWED = {"skew_kl": "forward_kl", "skew_reverse_kl": "reverse_kl"}


def check_divergence(divergence, jsd_beta, skew_alpha):
    """``(divergence, divergence_param)`` for the ops from the public arguments: ``jsd_beta`` and
    ``skew_alpha`` are refused for another divergence (unless left at their defaults), and the end
    points that are plain KLs (β = 0 or 1, α = 0) become those."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    for name, value in (("jsd_beta", jsd_beta), ("skew_alpha", skew_alpha)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if jsd_beta != JSD_BETA and divergence != "jsd":
        raise ValueError(f"jsd_beta is a parameter of divergence='jsd', not of {divergence!r}")
    if skew_alpha != SKEW_ALPHA and divergence not in _SKEWED:
        raise ValueError(f"skew_alpha is a parameter of divergence='skew_kl' / 'skew_reverse_kl', not of "
                         f"{divergence!r}")
    if divergence == "jsd":
        if not 0 <= jsd_beta <= 1:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        if jsd_beta in (0, 1):
            return ("forward_kl" if jsd_beta == 0 else "reverse_kl"), 0.0
        return divergence, float(jsd_beta)
    if divergence in _SKEWED:
        if not 0 <= skew_alpha < 1:
            raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")
        if skew_alpha == 0:
            return _SKEWED[divergence], 0.0
        return divergence, float(skew_alpha)
    return divergence, 0.0
