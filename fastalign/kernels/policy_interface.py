"""What the policy kernels (``kernels/policy.py``) and the ops that call them agree on, declared
once: the columns of the per-sequence statistics and the codes of the KL estimators.

Plain Python, without triton, so that ``fastalign.ops`` (which must import where triton is not
installed) reads the same numbers the kernels are compiled with: ``kernels/policy.py`` wraps
them in ``tl.constexpr``, ``ops/policy_torch.py`` builds its ``[B, STATS]`` tensor by them and
``fastalign.losses.policy_loss`` aggregates by them.
"""

# Columns of the [B, STATS] masked sums per sequence: the per-token loss (clipped surrogate, dual
# clip, KL penalty), the token count, the clip counts below and above, the ratio,
# (log ratio)^2 / 2 (the approximate KL to the old policy) and the KL estimate to the reference.
LOSS, COUNT, CLIP_LOW, CLIP_HIGH, RATIO, APPROX_KL, KL = range(7)
STATS = 7

# The sampled-token KL estimators by name (the ``kl_estimator`` option) and the ``KL_KIND`` code
# the kernels are specialized on; KL_NONE: no reference, no KL term.
KL_NONE = 0
KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}
