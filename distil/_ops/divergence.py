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
distil.reference.divergence_rows; the argument check (torch-free, shared with the CLI's config):
distil.checks.check_divergence.
"""
from distil.checks import DIVERGENCES, JSD_BETA, SKEW_ALPHA, check_divergence

__all__ = ["DIVERGENCES", "JSD_BETA", "SKEW_ALPHA", "check_divergence"]
