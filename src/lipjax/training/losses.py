"""Training losses: CRM (certified radius maximization), GloRo and LMT.

Each robust loss takes logits ``[batch, K]``, integer labels ``[batch]`` and
Lipschitz information (a ``[K, K]`` pairwise matrix, ``[K]`` per-class bounds
or a scalar global bound, converted as in :mod:`lipjax.certification.radii`), and returns
``(loss, aux)`` where ``aux`` is a dict of scalars for logging. Everything is
pure and jit-able; hyperparameters are keyword-only and may be traced arrays
(so per-epoch schedules do not trigger recompiles), except for the string and
boolean switches that select code paths.

Gradients flow through the logits and through the Lipschitz bounds (so the
robust terms also shrink ``L_ij`` along the vulnerable directions). Discrete
choices (predicted class, correctness, the CRM active set) are made under
``stop_gradient``. Infinite radii and empty sets are masked *before* any
``exp``/``logsumexp`` with finite stand-in values, so gradients stay finite
(the double-``where`` trick).

References:
  Fazlyab et al., Certified Robustness via Dynamic Margin Maximization and
    Improved Lipschitz Regularization, NeurIPS 2023 (CRM;
    docs/training.md#crm-loss).
  Leino, Wang, Fredrikson, Globally-Robust Neural Networks, ICML 2021
    (GloRo; docs/training.md#gloro).
  Tsuzuku, Sato, Sugiyama, Lipschitz-Margin Training, NeurIPS 2018
    (LMT; docs/training.md#lmt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lipjax.certification import radii

CRM_FORMS = ("softmax", "max")


def _per_example_cross_entropy(logits: jax.Array,
                               labels: jax.Array) -> jax.Array:
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                  *, mask: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Mean softmax cross-entropy with integer labels.

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer labels.
    mask: optional ``[batch]`` bool; the mean is over True rows only (0 if
      there are none).

  Returns:
    A scalar.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  radii.check_logits(logits, labels)
  per_example = _per_example_cross_entropy(logits, labels)
  if mask is None:
    return jnp.mean(per_example)
  mask = jnp.asarray(mask, bool)
  # where, not multiply: a masked-out row with inf CE must not give NaN.
  total = jnp.sum(jnp.where(mask, per_example, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1)


def crm_loss(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
             lipschitz: jax.typing.ArrayLike, *, t, lam, r0,
             form: str = "softmax", regularize_misclassified: bool = False,
             robust_active=True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CRM: cross-entropy plus a soft penalty on small certified radii.

  Exactly the reference code's semantics (docs/training.md#crm-loss), with
  masks instead of boolean filtering. With ``p_b = argmax z_b``::

    R_bi = (z_bp - z_bi) / L_{p i}  (i != p),   R_bp = +inf,
    C    = {b : p_b == y_b}          (all b if regularize_misclassified),
    A    = {b in C : min_i R_bi < r0},
    softmax: robust = 1/(t B) sum_{b in A} log sum_{i != p_b} exp(-t R_bi),
    max:     robust = 1/(t B) sum_{b in A} exp(-t min_i R_bi),
    loss = mean_b CE(z_b, y_b) + [robust_active] lam * robust.

  The robust term is normalized by the full batch size ``B``, not ``|A|``.
  The ``softmax`` form is minus the ``t``-soft-min radius and can be negative.
  Entries with ``R_bi = +inf`` (a zero bound with a positive margin) add
  ``exp(-inf) = 0`` to the sum and are dropped from it; a row with no finite
  radius is never active (even for ``r0 = inf``).

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer labels.
    lipschitz: ``[K, K]`` pairwise (diagonal ignored), ``[K]`` per-class or
      scalar global bound; differentiable.
    t: temperature (code: ``radiusMaximizationAlpha``), > 0.
    lam: weight of the robust term (``radiusMaximizationInitialLambda``).
    r0: only radii below ``r0`` are penalized
      (``radiusMaximizationMaximumPenalizingRadius``).
    form: ``"softmax"`` (every reference run) or ``"max"``.
    regularize_misclassified: also penalize misclassified points, relative to
      their (wrong) predicted class (off in every reference run;
      docs/training.md#crm-loss).
    robust_active: Python or traced bool, ``epoch >= E0`` in the reference.
      When False the loss is pure cross-entropy (the aux terms are still
      computed).

  Returns:
    ``(loss, aux)``; ``aux`` has ``cross_entropy``, ``robust_term`` (before
    ``lam`` and ``robust_active``), ``active_fraction`` (``|A| / B``),
    ``mean_radius`` (mean certified radius over correctly classified points,
    0 if none) and ``accuracy``.

  Raises:
    ValueError: for an unknown ``form`` or bad shapes.
  """
  if form not in CRM_FORMS:
    raise ValueError(f"Unknown CRM form {form!r}; choose one of {CRM_FORMS}.")
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  radii.check_logits(logits, labels)
  batch, num_classes = logits.shape
  predicted = jnp.argmax(jax.lax.stop_gradient(logits), axis=1)
  pair_radii = radii.margins_over_lipschitz(logits, predicted, lipschitz)

  is_self = jnp.arange(num_classes)[None, :] == predicted[:, None]
  # +inf radii (self entry, zero bounds) contribute exp(-inf) = 0: drop them
  # and give the dropped slots a finite value so no inf reaches a gradient.
  valid = ~is_self & jnp.isfinite(pair_radii)
  safe_radii = jnp.where(valid, pair_radii, 0.0)
  min_radius = jax.lax.stop_gradient(jnp.min(pair_radii, axis=1))
  correct = predicted == labels
  keep = correct | regularize_misclassified
  active = keep & (min_radius < r0) & jnp.any(valid, axis=1)

  scores = jnp.where(valid, -t * safe_radii, -jnp.inf)
  # Inactive rows get all-zero scores: their (discarded) logsumexp/max is then
  # finite, so the zero cotangent from the final where cannot turn into NaN.
  scores = jnp.where(active[:, None], scores, 0.0)
  if form == "softmax":
    per_example = jax.nn.logsumexp(scores, axis=1)
  else:
    # exp(-t min_i R_i) = exp(max_i -t R_i): the max skips the -inf slots and
    # its gradient reaches only the (finite) maximizer.
    per_example = jnp.exp(jnp.max(scores, axis=1))
  robust = jnp.sum(jnp.where(active, per_example, 0.0)) / (t * batch)

  ce = cross_entropy(logits, labels)
  loss = ce + jnp.where(robust_active, lam * robust, 0.0)

  # The certified radius of a correct point is its CRM radius (p == y).
  num_correct = jnp.sum(correct)
  mean_radius = jnp.sum(jnp.where(correct, min_radius, 0.0)) / jnp.maximum(
      num_correct, 1)
  aux = {
      "cross_entropy": ce,
      "robust_term": robust,
      "active_fraction": jnp.mean(active.astype(jnp.float32)),
      "mean_radius": mean_radius,
      "accuracy": num_correct / batch,
  }
  return loss, aux


def gloro_loss(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
               lipschitz: jax.typing.ArrayLike, *, eps, lam
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GloRo, TRADES form: CE plus KL to a model with a "bottom" class.

  The bottom logit is the worst case of the other classes at distance
  ``eps`` from the true class (Leino et al. 2021, §3; reference code as in
  docs/training.md#gloro)::

    z_bot = max_{i != y} (z_i + eps L_{y i}),   zbar = [z, z_bot] in R^{K+1},
    loss  = mean_b CE(z_b, y_b) + lam * mean_b KL(q_b || softmax(zbar_b)),
    q     = [softmax(z), 0].

  With the target's bottom entry exactly 0 (``0 log 0 = 0``) the KL has the
  closed form ``logsumexp(zbar) - logsumexp(z) = softplus(z_bot -
  logsumexp(z)) = -log(1 - P_bot)``, which is what is computed: it is finite
  for any logits and strictly positive, so ``loss > CE`` when ``lam > 0``.
  Its gradient is the same whether or not the target ``q`` is detached (the
  terms from ``d q`` sum to zero because ``log q_i - log p_i`` is the same for
  every ``i < K``). The GloRo and reference code clip the target's 0 to
  ``1e-7`` (Keras ``KLDivergence``), which adds ``1e-7 log(1e-7 / P_bot)``;
  we drop that constant-order-1e-6 term. CE is the plain batch mean: the
  reference's correct/incorrect sub-batch reweighting gives NaN on all-correct
  or all-wrong batches and is not reproduced.

  The bottom class is built from the true label ``y``, as the CRM reference
  does; GloRo's own code uses the predicted class, which differs only on
  misclassified points. A scalar global ``L`` becomes ``2 L``, as in the
  reference (sound, but looser than the ``sqrt(2) L`` used elsewhere).

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer labels.
    lipschitz: ``[K, K]`` pairwise, ``[K]`` per-class (``L_y + L_i``) or a
      scalar global bound (``2 L``).
    eps: training radius (``train_eps``).
    lam: weight of the KL term.

  Returns:
    ``(loss, aux)``; ``aux`` has ``cross_entropy``, ``robust_term`` (the mean
    KL, before ``lam``), ``accuracy`` and ``certified_fraction`` (fraction
    with ``z_y > z_bot``, i.e. ``argmax zbar == y`` with ties not counted).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  radii.check_logits(logits, labels)
  num_classes = logits.shape[1]
  lipschitz = jnp.asarray(lipschitz)
  if lipschitz.ndim == 0:
    lipschitz = jnp.full((num_classes, num_classes), 2.0,
                         lipschitz.dtype) * lipschitz
  rows = radii.pairwise_lipschitz(lipschitz, num_classes)[labels]
  is_label = jnp.arange(num_classes)[None, :] == labels[:, None]
  # -inf for i == y is safe: K >= 2 leaves a finite entry for the max, and
  # the max's gradient goes to that entry only.
  z_bot = jnp.max(jnp.where(is_label, -jnp.inf, logits + eps * rows), axis=1)
  kl = jax.nn.softplus(z_bot - jax.nn.logsumexp(logits, axis=1))
  robust = jnp.mean(kl)
  ce = cross_entropy(logits, labels)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  aux = {
      "cross_entropy": ce,
      "robust_term": robust,
      "accuracy": radii.clean_accuracy(logits, labels),
      "certified_fraction": jnp.mean((z_y > z_bot).astype(jnp.float32)),
  }
  return ce + lam * robust, aux


def lmt_loss(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
             lipschitz: jax.typing.ArrayLike, *, eps, mu
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Lipschitz-margin training: CE on logits with the other classes raised.

  ``loss = mean_b CE(z_b + mu eps L_{y_b, .} * (1 - e_{y_b}), y_b)``, where the
  offset is zeroed for misclassified samples (``argmax z != y``, ties to the
  lowest index), as in the reference code (docs/training.md#lmt).

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer labels.
    lipschitz: ``[K, K]`` pairwise, ``[K]`` per-class (``L_y + L_i``) or a
      scalar global bound (``sqrt(2) L``, as in LMT and the reference).
    eps: training radius (``train_eps``).
    mu: margin multiplier (scheduled: ``1e-3 * 1.03^(epoch - E0)``, capped
      at 2).

  Returns:
    ``(loss, aux)``; ``aux`` has ``cross_entropy`` (clean CE),
    ``robust_term`` (``loss - cross_entropy``) and ``accuracy``.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  radii.check_logits(logits, labels)
  num_classes = logits.shape[1]
  rows = radii.pairwise_lipschitz(lipschitz, num_classes)[labels]
  not_label = jnp.arange(num_classes)[None, :] != labels[:, None]
  correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == labels
  offset = jnp.where(not_label & correct[:, None], mu * eps * rows, 0.0)
  loss = cross_entropy(logits + offset, labels)
  ce = cross_entropy(logits, labels)
  aux = {
      "cross_entropy": ce,
      "robust_term": loss - ce,
      "accuracy": jnp.mean(correct.astype(jnp.float32)),
  }
  return loss, aux
