"""Certification of a trained workdir: sound bound, certificates, PGD audit.

``certify.py`` is a thin wrapper around :func:`run`, which

1. restores a training workdir (``config.json`` + an Orbax checkpoint) into
   the model and the saved power-iteration vectors, without writing to it;
2. computes a *sound* Lipschitz bound
   (:func:`lipjax.certified_bounds.sound_bound`): exact float64
   Gram-matrix norms (SPEC §7.6) for every product whose Gram matrix fits
   ``max_exact_bytes``, and for the others power iteration converged to a
   tolerance from the saved vectors and fresh random restarts, max over the
   starts, times :data:`lipjax.CONVERGED_SAFETY_FACTOR`. Training's few
   warm-started iterations are never trusted: they only seed the restarts;
3. certifies the split (clean and certified accuracy at every ε, radii);
4. attacks it with L2 PGD (:func:`lipjax.attacks.pgd_l2`) at every ε, and
   audits the certificates: every certified point is attacked inside
   ``0.99 R_y(x)``; a success would disprove the bound (a soundness
   violation).

The report (a JSON-able dict) is written and printed by
:mod:`lipjax.certification_report`. ε and radii are in [0, 1] pixel units
throughout; ``normalized_units`` only changes how ε is given and labelled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lipjax import attacks
from lipjax import certification_report as report_lib
from lipjax import certified_bounds
from lipjax import certify
from lipjax import checkpointing
from lipjax import data
from lipjax import metric_writer
from lipjax import parallel
from lipjax import power_iteration
from lipjax import train_state as ts

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
BOX = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored training run (host arrays)."""
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  graphdef: Any
  params: nnx.State
  rest: nnx.State
  power: power_iteration.PowerState
  datasets: dict[str, data.Dataset]

  @property
  def model(self):
    return nnx.merge(self.graphdef, self.params, self.rest)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """``workdir/config.json`` as a ConfigDict (JSON lists stand for tuples).

  Raises:
    FileNotFoundError: no such workdir, or no config.json in it.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"The workdir {workdir} does not exist.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a lipjax training workdir "
        "(train.py writes config.json when it starts).")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str, *, checkpoint: int | None = None,
            data_dir: str | None = None) -> Restored:
  """Restores config, model, power state and datasets of a workdir.

  The abstract state is built exactly as training builds it, so a
  checkpoint that does not match its config.json fails with
  :class:`lipjax.checkpointing.IncompatibleCheckpointError`. Nothing is
  written to the workdir.

  Args:
    workdir: a training workdir (absolute or relative).
    checkpoint: the step to restore; the latest if None.
    data_dir: TFDS data_dir overriding the saved config's.

  Raises:
    FileNotFoundError: the workdir, config.json or the checkpoint is missing
      (the message names the path and the available steps).
  """
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  config = load_config(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    # Checked here: Checkpointer() would create the folder.
    raise FileNotFoundError(f"No checkpoints folder {ckpt_dir}: the run "
                            "has not saved a checkpoint yet.")
  checkpointer = checkpointing.Checkpointer(
      workdir, every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep)
  try:
    steps = checkpointer.all_steps()
    step = checkpointer.latest_step() if checkpoint is None else checkpoint
    if step is None or step not in steps:  # Before the long data load.
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' for step {step}'} in "
          f"{ckpt_dir} (available: {sorted(steps)}).")
    d = config.data
    datasets = data.load(
        d.name, data_dir=data_dir or d.data_dir, download=False,
        validation_fraction=d.validation_fraction, split_seed=d.split_seed,
        synthetic=d.synthetic.to_dict() if "synthetic" in d else None,
        max_train_examples=d.max_train_examples,
        max_test_examples=d.max_test_examples)
    train = datasets["train"]
    input_shape = tuple(train.images.shape[1:])
    # The learning-rate schedule does not change the optimizer state's
    # structure, but it is built exactly as training builds it anyway.
    steps_per_epoch = data.num_steps_per_epoch(len(train), config.batch_size)
    tx = ts.make_optimizer(config, ts.make_learning_rate(config,
                                                         steps_per_epoch))
    init_fn = ts.make_init_fn(config, tx, input_shape=input_shape,
                              num_classes=train.num_classes)
    replicated = parallel.replicated(parallel.make_mesh())
    abstract = checkpointing.abstract_like(jax.eval_shape(init_fn),
                                           replicated)
    state = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  graphdef = ts.make_graphdef(config, input_shape=input_shape,
                              num_classes=train.num_classes)
  return Restored(workdir=workdir, config=config,
                  step=int(jax.device_get(state.step)), graphdef=graphdef,
                  params=jax.device_get(state.params),
                  rest=jax.device_get(state.rest),
                  power=jax.device_get(state.power), datasets=datasets)


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


def make_apply_fn(graphdef) -> Callable:
  """``(variables, images) -> logits`` for ``variables = (params, rest)``.

  Build it once per model: :func:`lipjax.pgd_l2` treats it as static.
  """
  return functools.partial(_apply, graphdef)


def _apply(graphdef, variables, images):
  return nnx.merge(graphdef, *variables)(images)


def index_batches(indices: np.ndarray, batch_size: int):
  """Yields ``(idx [batch_size], mask [batch_size])``, the last one padded."""
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[:len(chunk)] = True
    idx = np.zeros(batch_size, np.int64)
    idx[:len(chunk)] = chunk
    yield idx, mask


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn, variables, images):
  return apply_fn(variables, images)


def compute_logits(apply_fn, variables, dataset: data.Dataset, *,
                   batch_size: int, progress: bool = False) -> np.ndarray:
  """Logits of every example, ``[N, K]`` float32, in fixed-shape batches."""
  out = np.zeros((len(dataset), dataset.num_classes), np.float32)
  indices = np.arange(len(dataset))
  bar = metric_writer.progress_bar(total=len(dataset), initial=0,
                                   description="logits", enabled=progress)
  for idx, mask in index_batches(indices, batch_size):
    logits = _logits(apply_fn, variables, data.to_float(dataset.images[idx]))
    out[idx[mask]] = np.asarray(logits)[mask]
    bar.update(int(mask.sum()))
  bar.close()
  return out


@functools.partial(jax.jit, static_argnums=0)
def _predict(apply_fn, variables, images):
  return jnp.argmax(apply_fn(variables, images), axis=-1)


def attack(apply_fn, variables, dataset: data.Dataset, indices: np.ndarray,
           eps: np.ndarray, *, key: jax.Array, batch_size: int,
           pgd: dict, description: str = "pgd",
           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """PGD on ``dataset[indices]`` with per-example radii ``eps``.

  Returns:
    ``(fooled [n] bool, norms [n])``: whether the prediction of the best
    adversarial point differs from the label, and its distance to the clean
    point (pixel units).
  """
  fooled = np.zeros(len(indices), bool)
  norms = np.zeros(len(indices), np.float32)
  positions = np.arange(len(indices))
  # Few points (e.g. the uncertified ones): a smaller power-of-two batch
  # wastes less padding and compiles at most log2(batch_size) shapes.
  batch_size = min(batch_size,
                   1 << max(len(indices) - 1, 1).bit_length())
  bar = metric_writer.progress_bar(total=len(indices), initial=0,
                                   description=description, enabled=progress)
  for b, (pos, mask) in enumerate(index_batches(positions, batch_size)):
    idx = indices[pos]
    x = data.to_float(dataset.images[idx])
    labels = jnp.asarray(dataset.labels[idx])
    radius = jnp.asarray(np.where(mask, eps[pos], 0.0), jnp.float32)
    adv = attacks.pgd_l2(apply_fn, variables, x, labels, radius,
                         key=jax.random.fold_in(key, b), box=BOX, **pgd)
    wrong = np.asarray(_predict(apply_fn, variables, adv) != labels)
    dist = np.linalg.norm(np.asarray(adv - x).reshape(batch_size, -1),
                          axis=1)
    fooled[pos[mask]] = wrong[mask]
    norms[pos[mask]] = dist[mask]
    bar.update(int(mask.sum()))
  bar.close()
  return fooled, norms


def run(workdir: str, *, checkpoint: int | None = None,
        eps: tuple[float, ...] | None = None, split: str = "test",
        exact: bool | str = "auto", max_exact_gib: float = 4.0,
        normalized_units: bool = False, pgd_steps: int = 50,
        pgd_restarts: int = 2, attack_certified: bool = False,
        batch_size: int | None = None, seed: int = 0,
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
    seed: PRNG seed of the attacks and power-iteration restarts.
    num_examples: certify only the first N examples of the split.
    data_dir: TFDS data_dir override.
    bound_scale: multiplies the certifying bound. Testing only: a value
      below 1 makes the bound unsound so that the audit must fail.
    progress: progress bars on stderr. A log line per phase (with its
      wall time) is written either way, so a log file shows where a long
      run is.
  """
  timings, t0 = {}, time.perf_counter()
  restored = restore(workdir, checkpoint=checkpoint, data_dir=data_dir)
  timings["restore_and_data"] = time.perf_counter() - t0
  config = restored.config
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
  scale = pixels_per_normalized_unit(config) if normalized_units else 1.0
  eps_pixel = np.asarray(sorted(
      default_eps(config) if eps is None else [float(e) * scale for e in eps]),
                         np.float64)
  if np.any(eps_pixel < 0):
    raise ValueError(f"eps must be >= 0, got {eps_pixel / scale}.")
  batch_size = int(batch_size or config.eval.batch_size)
  log = metric_writer.log
  log(f"restored {restored.workdir} step {restored.step}: {len(dataset)} "
      f"{split} examples "
      f"({timings['restore_and_data']:.1f} s)")
  key = jax.random.key(seed)

  t = time.perf_counter()
  b = config.bound
  bounds, bound_report = certified_bounds.sound_bound(
      restored.model, method=b.method, kind=b.kind, state=restored.power,
      exact=exact, max_exact_bytes=int(max_exact_gib * 2**30),
      large_class_threshold=b.large_class_threshold,
      key=jax.random.fold_in(key, 0), progress=progress)
  lip = bounds["bound"] * np.float32(bound_scale)
  bound_report["bound_scale"] = bound_scale
  timings["bound"] = time.perf_counter() - t
  log(f"bound: {b.method}/{b.kind}, mode {bound_report['mode']} "
      f"({timings['bound']:.1f} s)")

  t = time.perf_counter()
  apply_fn = make_apply_fn(restored.graphdef)
  variables = (restored.params, restored.rest)
  logits = compute_logits(apply_fn, variables, dataset,
                          batch_size=batch_size, progress=progress)
  labels = dataset.labels
  correct = np.argmax(logits, axis=1) == labels
  radius = np.asarray(certify.certified_radius(logits, labels, lip))
  certified = np.asarray(certify.is_certified(logits, labels, lip,
                                              eps_pixel))  # [E, N]
  timings["certify"] = time.perf_counter() - t
  log(f"clean accuracy {correct.mean():.4f}; certified "
      + ", ".join(f"@{e:.4g} {c.mean():.4f}"
                  for e, c in zip(eps_pixel, certified))
      + f" ({timings['certify']:.1f} s)")

  # Every setting explicit, so that the report states what actually ran.
  pgd = {"steps": int(pgd_steps), "restarts": int(pgd_restarts),
         "step_size": 5.0 / int(pgd_steps), "schedule": "cosine",
         "loss": "margin"}
  t = time.perf_counter()
  robust = np.zeros((len(eps_pixel), len(labels)), bool)
  alive = correct.copy()  # Broken at a smaller ε stays broken.
  # Certified points broken at their ε (only counted if they are attacked).
  pgd_violations = 0 if attack_certified else None
  for i, e in enumerate(eps_pixel):
    targets = alive if attack_certified else alive & ~certified[i]
    idx = np.flatnonzero(targets)
    t_eps = time.perf_counter()
    fooled, _ = attack(apply_fn, variables, dataset, idx,
                       np.full(len(idx), e, np.float32),
                       key=jax.random.fold_in(key, 100 + i),
                       batch_size=batch_size, pgd=pgd, progress=progress,
                       description=f"pgd eps={e:.4g}")
    alive[idx[fooled]] = False
    robust[i] = alive
    log(f"pgd eps={e:.4g}: attacked {len(idx)}, fooled {int(fooled.sum())}, "
        f"PGD accuracy {alive.mean():.4f} "
        f"({time.perf_counter() - t_eps:.1f} s)")
    if attack_certified:
      pgd_violations += int(np.sum(certified[i] & ~alive))
  timings["pgd"] = time.perf_counter() - t

  t = time.perf_counter()
  audited = np.flatnonzero(radius > 0)
  # A radius can be inf (a constant logit difference); the box diameter
  # already covers every input.
  cap = math.sqrt(float(np.prod(dataset.images.shape[1:])))
  audit_eps = np.minimum(AUDIT_RADIUS_FACTOR * radius[audited], cap)
  fooled, norms = attack(apply_fn, variables, dataset, audited,
                         audit_eps.astype(np.float32),
                         key=jax.random.fold_in(key, 1), batch_size=batch_size,
                         pgd=pgd, progress=progress, description="audit")
  timings["audit"] = time.perf_counter() - t
  log(f"audit: {len(audited)} certified points attacked inside "
      f"{AUDIT_RADIUS_FACTOR} x radius, {int(fooled.sum())} violations "
      f"({timings['audit']:.1f} s)")
  audit = {
      "radius_factor": AUDIT_RADIUS_FACTOR, "attacked": int(len(audited)),
      "violations": int(fooled.sum()),
      "pgd_on_certified_violations": pgd_violations,
      "examples": [
          {"index": int(audited[j]), "label": int(labels[audited[j]]),
           "radius": float(radius[audited[j]]),
           "attack_eps": float(audit_eps[j]),
           "adversarial_distance": float(norms[j])}
          for j in np.flatnonzero(fooled)[:20]],
  }
  audit["passed"] = audit["violations"] == 0 and not pgd_violations
  return report_lib.build_report(
      restored=restored, split=split, dataset=dataset, logits=logits,
      radius=radius, certified=certified, robust=robust, eps_pixel=eps_pixel,
      scale=scale, normalized_units=normalized_units, bounds=bounds,
      bound_report=bound_report, lip=lip, audit=audit, timings=timings,
      pgd=dict(pgd, step_size_note="first step = step_size x eps, then "
               "cosine decay", attack_certified=attack_certified,
               box=list(BOX), projection=(
                   "exact Euclidean projection onto the L2 ball ∩ box "
                   "(active-set iteration)"), restart_0="clean point",
               batch_size=batch_size, seed=seed),
      total_seconds=time.perf_counter() - t0)


def exit_code(report: dict) -> int:
  """0 if the audit found no soundness violation, else 1."""
  return 0 if report["audit"]["passed"] else 1
