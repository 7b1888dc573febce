"""Certification of a trained workdir: sound bound, certificates, PGD audit.

``certify.py`` is a thin wrapper around :func:`run`, which runs these phases:

1. :func:`lipjax.certification.workdir.restore`: ``config.json`` and an Orbax
   checkpoint into the model and the saved power-iteration vectors, without
   writing to the workdir;
2. :func:`bound_phase`: the certifying Lipschitz bound
   (:func:`lipjax.certification.sound_bound.sound_bound`): exact float64
   Gram-matrix norms for every product whose Gram matrix fits
   ``max_exact_bytes``, and for the others float64 Lanczos from fresh random
   starts with a stated failure probability ``delta``. Training's
   warm-started iterations are never used;
3. :func:`certify_phase`: clean and certified accuracy at every ε, radii,
   for the deployed float32 network: the float64 margins must exceed
   ``L eps`` plus a bound on the float32 evaluation error at the point and
   over its ball (:mod:`lipjax.certification.float32_error`);
4. :func:`pgd_phase`: L2 PGD (:func:`lipjax.pgd_l2`) at every ε;
5. :func:`audit_phase`: every certified point is attacked inside
   ``0.99 R_y(x)``; a success would disprove the bound (a soundness
   violation).

The report (a JSON-able dict) is written and printed by
:mod:`lipjax.certification.report`. ε and radii are in [0, 1] pixel units
throughout; ``normalized_units`` only changes how ε is given and labelled.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from lipjax import guarantee
from lipjax.certification import batched
from lipjax.certification import float32_error
from lipjax.certification import report
from lipjax.certification import sound_bound
from lipjax.certification import workdir as workdir_lib
from lipjax.progress import log, progress_bar
from lipjax.training import augment
from lipjax.training import data

# ε (pixel units) certified by default, per dataset; the config's
# eval.eps are added. CIFAR: the reference's 0.141 measured after
# Normalize(0.5, 0.5) (= 0.0705 in pixels) and GloRo's 36/255.
DEFAULT_EPS = {
    "mnist": (0.5, 1.0, 1.58),
    "fashion_mnist": (0.1, 0.25, 0.5, 1.0),
    "cifar10": (0.141 / 2, 36 / 255),
    "cifar100": (0.141 / 2, 36 / 255),
    "tiny_imagenet": (0.141, 36 / 255),
    "synthetic": (),
}
AUDIT_RADIUS_FACTOR = 0.99


def default_eps(config) -> tuple[float, ...]:
  """The dataset's default ε list plus ``config.eval.eps`` (pixel units)."""
  values = list(DEFAULT_EPS.get(config.data.name, ())) + [
      float(e) for e in config.eval.eps]
  unique = {round(v, 10): v for v in values}
  return tuple(sorted(unique.values()))


def pixels_per_normalized_unit(config) -> float:
  """``std`` such that ``eps_pixel = eps_normalized * std``.

  A pixel-space distance ``d`` is ``d / std`` after Normalize(mean, std),
  so the conversion is a single number only when all channel stds agree.

  Raises:
    ValueError: channel stds differ.
  """
  std = config.model.input_std
  if std is None:
    return 1.0
  std = [float(s) for s in std]
  if max(std) != min(std):
    raise ValueError(f"--normalized_units needs one input std for all "
                     f"channels; this model has input_std={std}.")
  return std[0]


def _select_examples(restored, split: str, num_examples: int | None
                     ) -> data.Dataset:
  """The split to certify, cut to its first ``num_examples``."""
  if split not in restored.datasets:
    raise ValueError(f"Unknown split {split!r}; use test, validation or "
                     "train.")
  dataset = restored.datasets[split]
  if num_examples is not None:
    dataset = dataclasses.replace(
        dataset, images=dataset.images[:num_examples],
        labels=dataset.labels[:num_examples])
  if not len(dataset):
    raise ValueError(f"The {split} split of {restored.workdir} is empty.")
  return dataset


def check_arguments(*, eps=None, num_examples=None, batch_size=None,
                    delta=guarantee.DEFAULT_DELTA, pgd_steps=50,
                    pgd_restarts=2, max_exact_gib=4.0, bound_seed=None,
                    bound_scale=1.0) -> None:
  """Refuses bad settings before any work, each with the fix in one line.

  :func:`run` calls it first; ``certify.py`` also calls it before checking
  that it can write its results. The names are certify.py's flags.

  Raises:
    ValueError: the first bad setting.
  """
  if eps is not None:
    values = [float(e) for e in eps]
    if not values:
      raise ValueError("--eps is empty: give radii, e.g. --eps 0.1,0.5, or "
                       "leave it out for the dataset's defaults.")
    if not all(np.isfinite(values)) or min(values) < 0:
      raise ValueError(f"--eps must be finite and >= 0, got {values}.")
  for name, value, least in (("num_examples", num_examples, 1),
                             ("batch_size", batch_size, 1),
                             ("pgd_steps", pgd_steps, 1),
                             ("pgd_restarts", pgd_restarts, 1),
                             ("bound_seed", bound_seed, 0)):
    if value is not None and int(value) < least:
      raise ValueError(f"--{name} must be >= {least}, got {value}.")
  for name, value in (("max_exact_gib", max_exact_gib),
                      ("bound_scale", bound_scale)):
    if not (math.isfinite(float(value)) and float(value) > 0):
      raise ValueError(f"--{name} must be a finite number > 0, got {value}.")
  guarantee.check_delta(delta)


def _eps_in_pixels(config, eps, scale: float) -> np.ndarray:
  """Sorted float64 ε list in pixel units (the default list if None)."""
  eps_pixel = np.asarray(sorted(
      default_eps(config) if eps is None else [float(e) * scale for e in eps]),
                         np.float64)
  if np.any(eps_pixel < 0):
    raise ValueError(f"eps must be >= 0, got {eps_pixel / scale}.")
  return eps_pixel


def bound_phase(restored, *, exact, max_exact_gib: float, delta: float,
                bound_seed: int | None, bound_scale: float, progress: bool,
                guarantee_kind: str = "randomized"):
  """The config's bound, certified; returns ``(bounds, bound_report, lip)``."""
  b = restored.config.bound
  bounds, bound_report = sound_bound.sound_bound(
      restored.model, method=b.method, kind=b.kind, exact=exact,
      max_exact_bytes=int(max_exact_gib * 2**30),
      large_class_threshold=b.large_class_threshold, delta=delta,
      seed=bound_seed, progress=progress, guarantee_kind=guarantee_kind)
  lip = bounds["bound"] * np.float32(bound_scale)
  bound_report["bound_scale"] = bound_scale
  return bounds, bound_report, lip


def evaluation_error(restored, dataset, bounds, *, batch_size: int,
                     scale: float, progress: bool
                     ) -> float32_error.EvaluationError:
  """The float32 evaluation error bound around every example, in batches.

  ``scale`` multiplies the per-layer bounds (``bound_scale``, testing only).
  """
  model = restored.model
  parts = []
  bar = progress_bar(total=len(dataset), initial=0,
                     description="float32 margin", enabled=progress)
  for start in range(0, len(dataset), batch_size):
    images = augment.to_float(dataset.images[start:start + batch_size])
    tails = bounds.get("error_tails")
    parts.append(float32_error.logit_error_bounds(
        model, images, bounds["layer_norms"] * scale,
        bounds["lipschitz_to"] * scale,
        None if tails is None else tuple(t * scale for t in tails)))
    bar.update(len(images))
  bar.close()
  return float32_error.EvaluationError.concatenate(parts)


def certify_phase(logits: np.ndarray, labels: np.ndarray, lip,
                  eps_pixel: np.ndarray, error) -> dict:
  """Certificates that cover the float32 evaluation, and without it.

  Returns:
    ``{"correct" [N], "radius" [N], "certified" [E, N],
    "certified_exact_arithmetic" [E, N]}``: radii and certificates of the
    deployed float32 network (float64 margins minus the evaluation error
    bound), and for comparison those of the network in exact arithmetic.
  """
  correct = np.argmax(logits, axis=1) == labels
  radius, certified = float32_error.certify_float64(logits, labels, lip,
                                                    error, eps_pixel)
  _, exact_arithmetic = float32_error.certify_float64(logits, labels, lip,
                                                      None, eps_pixel)
  return {"correct": correct, "radius": radius, "certified": certified,
          "certified_exact_arithmetic": exact_arithmetic}


def pgd_phase(model_fn, dataset, eps_pixel, correct, certified, *, key,
              batch_size: int, pgd: dict, attack_certified: bool,
              progress: bool):
  """PGD at every ε; returns ``(robust [E, N], pgd_violations)``.

  ``model_fn`` is ``(apply_fn, variables)``. A point broken at a smaller ε
  stays broken. Points certified at an ε are attacked there only with
  ``attack_certified``; ``pgd_violations`` (certified yet broken) is None
  when they were not attacked.
  """
  apply_fn, variables = model_fn
  robust = np.zeros((len(eps_pixel), len(correct)), bool)
  alive = correct.copy()
  pgd_violations = 0 if attack_certified else None
  for i, e in enumerate(eps_pixel):
    targets = alive if attack_certified else alive & ~certified[i]
    idx = np.flatnonzero(targets)
    t_eps = time.perf_counter()
    fooled, _ = batched.attack(
        apply_fn, variables, dataset, idx, np.full(len(idx), e, np.float32),
        key=jax.random.fold_in(key, 100 + i), batch_size=batch_size, pgd=pgd,
        progress=progress, description=f"pgd eps={e:.4g}")
    alive[idx[fooled]] = False
    robust[i] = alive
    log(f"pgd eps={e:.4g}: attacked {len(idx)}, fooled {int(fooled.sum())}, "
        f"PGD accuracy {alive.mean():.4f} "
        f"({time.perf_counter() - t_eps:.1f} s)")
    if attack_certified:
      pgd_violations += int(np.sum(certified[i] & ~alive))
  return robust, pgd_violations


def audit_phase(model_fn, dataset, radius: np.ndarray, *, key,
                batch_size: int, pgd: dict, progress: bool) -> dict:
  """Attacks every certified point inside ``AUDIT_RADIUS_FACTOR`` x radius.

  Returns the audit dict of the report, without ``passed``.
  """
  apply_fn, variables = model_fn
  start = time.perf_counter()
  audited = np.flatnonzero(radius > 0)
  # A radius can be inf (a constant logit difference); the box diameter
  # already covers every input.
  cap = math.sqrt(float(np.prod(dataset.images.shape[1:])))
  audit_eps = np.minimum(AUDIT_RADIUS_FACTOR * radius[audited], cap)
  fooled, norms = batched.attack(
      apply_fn, variables, dataset, audited, audit_eps.astype(np.float32),
      key=key, batch_size=batch_size, pgd=pgd, progress=progress,
      description="audit")
  log(f"audit: {len(audited)} certified points attacked inside "
      f"{AUDIT_RADIUS_FACTOR} x radius, {int(fooled.sum())} violations "
      f"({time.perf_counter() - start:.1f} s)")
  labels = dataset.labels
  return {
      "radius_factor": AUDIT_RADIUS_FACTOR, "attacked": int(len(audited)),
      "violations": int(fooled.sum()),
      "examples": [
          {"index": int(audited[j]), "label": int(labels[audited[j]]),
           "radius": float(radius[audited[j]]),
           "attack_eps": float(audit_eps[j]),
           "adversarial_distance": float(norms[j])}
          for j in np.flatnonzero(fooled)[:20]],
  }


# What the report says about the attack besides its settings.
_PGD_REPORTED = {
    "step_size_note": "first step = step_size x eps, then cosine decay",
    "box": list(batched.BOX),
    "projection": ("exact Euclidean projection onto the L2 ball ∩ box "
                   "(active-set iteration)"),
    "restart_0": "clean point",
}


def _pgd_settings(pgd_steps: int, pgd_restarts: int) -> dict:
  """Every PGD setting explicit, so that the report states what ran."""
  return {"steps": int(pgd_steps), "restarts": int(pgd_restarts),
          "step_size": 5.0 / int(pgd_steps), "schedule": "cosine",
          "loss": "margin"}


def run(workdir: str, *, checkpoint: int | None = None,
        eps: tuple[float, ...] | None = None, split: str = "test",
        exact: bool | str = "auto", max_exact_gib: float = 4.0,
        normalized_units: bool = False, pgd_steps: int = 50,
        pgd_restarts: int = 2, attack_certified: bool = False,
        batch_size: int | None = None, seed: int = 0,
        delta: float = guarantee.DEFAULT_DELTA,
        bound_seed: int | None = None, guarantee_kind: str = "randomized",
        num_examples: int | None = None, data_dir: str | None = None,
        bound_scale: float = 1.0, progress: bool = True) -> dict:
  """Certifies a training workdir; returns the report (see module doc).

  Args:
    workdir: training workdir.
    checkpoint: step to restore (default latest).
    eps: radii, in normalized units if ``normalized_units`` else pixels;
      default :func:`default_eps`.
    split: ``"test"``, ``"validation"`` or ``"train"``.
    exact: True (fail if impossible), ``"auto"`` or False.
    max_exact_gib: per-product Gram matrix limit for exact norms.
    normalized_units: ε given and labelled after the model's Normalize.
    pgd_steps, pgd_restarts: attack strength.
    attack_certified: also attack, at each ε, the points certified at that
      ε. Off by default: if the bound is sound PGD cannot break them, and
      the audit attacks every certified point anyway, inside 0.99 x its
      radius (a larger ball unless the radius is within 1 % of ε).
    batch_size: attack/eval batch (default ``config.eval.batch_size``).
    seed: PRNG seed of the attacks.
    delta: failure probability of the certificate (over the Lanczos start
      vectors of the products without exact norms).
    bound_seed: seed of the Lanczos start vectors; None draws a fresh one
      from the operating system (recorded in the report).
    guarantee_kind: ``"randomized"`` or ``"deterministic"`` (for the
      products whose Gram matrix does not fit; see :func:`lipjax.bound`).
    num_examples: certify only the first N examples of the split.
    data_dir: TFDS data_dir override.
    bound_scale: multiplies the certifying bound. Testing only: a value
      below 1 makes the bound unsound so that the audit must fail.
    progress: progress bars on stderr. A log line per phase (with its
      wall time) is written either way, so a log file shows where a long
      run is.
  """
  check_arguments(eps=eps, num_examples=num_examples, batch_size=batch_size,
                  delta=delta, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
                  max_exact_gib=max_exact_gib, bound_seed=bound_seed,
                  bound_scale=bound_scale)
  pgd = _pgd_settings(pgd_steps, pgd_restarts)
  timings, t0 = {}, time.perf_counter()
  restored = workdir_lib.restore(workdir, checkpoint=checkpoint,
                                 data_dir=data_dir)
  timings["restore_and_data"] = time.perf_counter() - t0
  config = restored.config
  dataset = _select_examples(restored, split, num_examples)
  scale = pixels_per_normalized_unit(config) if normalized_units else 1.0
  eps_pixel = _eps_in_pixels(config, eps, scale)
  batch_size = int(config.eval.batch_size if batch_size is None
                   else batch_size)
  log(f"restored {restored.workdir} step {restored.step}: {len(dataset)} "
      f"{split} examples ({timings['restore_and_data']:.1f} s)")
  key = jax.random.key(seed)

  t = time.perf_counter()
  bounds, bound_report, lip = bound_phase(
      restored, exact=exact, max_exact_gib=max_exact_gib, delta=delta,
      bound_seed=bound_seed, bound_scale=bound_scale, progress=progress,
      guarantee_kind=guarantee_kind)
  timings["bound"] = time.perf_counter() - t
  log(f"bound: {config.bound.method}/{config.bound.kind}, "
      f"{bound_report['guarantee']} ({timings['bound']:.1f} s)")

  t = time.perf_counter()
  model_fn = (batched.make_apply_fn(restored.graphdef),
              (restored.params, restored.rest))
  logits = batched.compute_logits(*model_fn, dataset, batch_size=batch_size,
                                  progress=progress)
  error = evaluation_error(restored, dataset, bounds, batch_size=batch_size,
                           scale=bound_scale, progress=progress)
  cert = certify_phase(logits, dataset.labels, lip, eps_pixel, error)
  correct, radius, certified = (cert["correct"], cert["radius"],
                                cert["certified"])
  timings["certify"] = time.perf_counter() - t
  log(f"clean accuracy {correct.mean():.4f}; certified "
      + ", ".join(f"@{e:.4g} {c.mean():.4f}" for e, c in zip(eps_pixel,
                                                           certified))
      + f" ({timings['certify']:.1f} s)")
  bound_report["float32_margin"] = _margin_report(
      error, dataset.labels, cert["certified_exact_arithmetic"])

  t = time.perf_counter()
  robust, pgd_violations = pgd_phase(
      model_fn, dataset, eps_pixel, correct, certified, key=key,
      batch_size=batch_size, pgd=pgd, attack_certified=attack_certified,
      progress=progress)
  timings["pgd"] = time.perf_counter() - t

  t = time.perf_counter()
  audit = audit_phase(model_fn, dataset, radius,
                      key=jax.random.fold_in(key, 1), batch_size=batch_size,
                      pgd=pgd, progress=progress)
  timings["audit"] = time.perf_counter() - t
  audit["pgd_on_certified_violations"] = pgd_violations
  audit["passed"] = audit["violations"] == 0 and not pgd_violations
  return report.build_report(
      restored=restored, split=split, dataset=dataset, logits=logits,
      radius=radius, certified=certified, robust=robust, eps_pixel=eps_pixel,
      scale=scale, normalized_units=normalized_units, bounds=bounds,
      bound_report=bound_report, lip=lip, audit=audit, timings=timings,
      pgd=dict(pgd, **_PGD_REPORTED, attack_certified=attack_certified,
               batch_size=batch_size, seed=seed),
      total_seconds=time.perf_counter() - t0)


def _margin_report(error, labels, certified_exact_arithmetic) -> dict:
  """What the float32 evaluation margin is and what it cost: per class
  pair ``(label, i)``, how much it takes off the margin (at ``x`` and at
  ``x'``: twice the error bound at ``R = 0``) and adds to the slope."""
  at_r0, slope = error.pair(np.asarray(labels))
  others = np.arange(at_r0.shape[1])[None, :] != np.asarray(labels)[:, None]
  return {
      "covered": True, "assumptions": float32_error.ASSUMPTIONS,
      "elementwise_max": float(np.max(error.elementwise)),
      "elementwise_mean": float(np.mean(error.elementwise)),
      "l2_max": float(np.max(error.l2)), "l2_slope": error.l2_slope,
      "lipschitz_tails": 0 if error.tails is None else len(error.tails),
      "margin_shrink_max": float(np.max(2.0 * at_r0[others])),
      "margin_shrink_median": float(np.median(2.0 * at_r0[others])),
      "slope_growth_max": float(np.max(slope[others])),
      "certified_accuracy_exact_arithmetic": (
          certified_exact_arithmetic.mean(axis=1).astype(float).tolist()),
  }


def exit_code(report_dict: dict) -> int:
  """0 if the audit found no soundness violation, else 1."""
  return 0 if report_dict["audit"]["passed"] else 1
