"""The functional training state and the jitted train and eval steps.

``graphdef`` (the model's static structure), the optimizer and the config are
closed over; only arrays travel in :class:`TrainState`. One
``train_step(state, batch) -> (state, metrics)`` computes the logits, the
Lipschitz bound (once per step, independent of the batch, so replicated over
devices), the loss and the Adam update; nothing in it touches the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lipjax
from lipjax.certification import radii
from lipjax.power_iteration import PowerState
from lipjax.training import augment
from lipjax.training import losses
from lipjax.training import schedules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a resumed run needs, as arrays.

  Attributes:
    step: int32 scalar, optimizer steps taken; with the config it fixes the
      epoch, the next batch and the augmentation key.
    params: the model's ``nnx.Param`` state.
    rest: the model's other state (batch-norm statistics; often empty).
    opt_state: Optax state.
    power: warm-started power-iteration vectors.
    rng: a typed PRNG key, folded with ``step`` for augmentation.
  """
  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: Any
  power: PowerState
  rng: jax.Array


def build_model(config, *, input_shape, num_classes, rngs):
  m = config.model
  return lipjax.models.build(
      m.architecture, num_classes=num_classes, input_shape=input_shape,
      rngs=rngs, activation=m.activation, input_mean=m.input_mean,
      input_std=m.input_std, batch_norm=m.batch_norm)


def make_learning_rate(config, steps_per_epoch: int) -> optax.Schedule:
  o = config.optimizer
  if (o.schedule == "exponential_with_stopping"
      and o.decay_start_epoch >= config.num_epochs):
    # Decay would start after the last epoch: the rate stays at its start.
    return optax.constant_schedule(o.learning_rate)
  if o.schedule == "exponential_with_stopping":
    return schedules.exponential_with_stopping(
        init_value=o.learning_rate, end_value=o.end_learning_rate,
        decay_start_epoch=o.decay_start_epoch, total_epochs=config.num_epochs,
        steps_per_epoch=steps_per_epoch)
  if o.schedule == "cosine":
    return schedules.cosine(
        init_value=o.learning_rate, end_value=o.end_learning_rate,
        total_epochs=config.num_epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=o.warmup_epochs)
  if o.schedule == "constant":
    return optax.constant_schedule(o.learning_rate)
  raise ValueError(f"Unknown optimizer.schedule {o.schedule!r}; use "
                   "exponential_with_stopping, cosine or constant.")


def make_optimizer(config, learning_rate: optax.Schedule):
  o = config.optimizer
  return optax.adam(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps)


def make_init_fn(config, tx, *, input_shape, num_classes) -> Callable:
  """A function of no arguments that builds a fresh :class:`TrainState`."""

  def init_fn():
    key = jax.random.key(config.seed)
    model_key, power_key, rng = jax.random.split(key, 3)
    model = build_model(config, input_shape=input_shape,
                        num_classes=num_classes, rngs=nnx.Rngs(model_key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    power = lipjax.init_power_state(model, method=config.bound.method,
                                    kind=config.bound.kind, key=power_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      rest=rest, opt_state=tx.init(params), power=power,
                      rng=rng)

  return init_fn


def make_graphdef(config, *, input_shape, num_classes):
  abstract = nnx.eval_shape(lambda: build_model(
      config, input_shape=input_shape, num_classes=num_classes,
      rngs=nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  return graphdef


def loss_schedules(config) -> dict[str, Callable]:
  """Per-epoch hyperparameters (jit-able functions of a traced epoch)."""
  l = config.loss
  start = l.robust_start_epoch
  ramp_epochs = max(config.num_epochs - start, 1)
  return {
      "lam": schedules.epoch_schedule(initial=l.lam, start_epoch=start,
                                      multiplier=l.lam_multiplier,
                                      maximum=l.lam_max),
      "r0": schedules.epoch_schedule(initial=l.r0, start_epoch=start,
                                     multiplier=l.r0_multiplier,
                                     maximum=l.r0_max),
      "gloro_lam": schedules.epoch_schedule(
          initial=l.gloro_lam_initial, start_epoch=start,
          increment=(l.gloro_lam_final - l.gloro_lam_initial) / ramp_epochs,
          maximum=max(l.gloro_lam_final, l.gloro_lam_initial)),
      "lmt_mu": schedules.epoch_schedule(
          initial=l.lmt_mu_initial, start_epoch=start,
          multiplier=l.lmt_mu_growth, maximum=l.lmt_mu_max),
  }


def _loss(config, hyper, epoch, logits, labels, lip):
  """Dispatches on ``config.loss.name``; returns (loss, aux, logged hypers)."""
  l = config.loss
  robust = epoch >= l.robust_start_epoch
  if l.name == "crm":
    lam, r0 = hyper["lam"](epoch), hyper["r0"](epoch)
    loss, aux = losses.crm_loss(
        logits, labels, lip, t=l.t, lam=lam, r0=r0, form=l.form,
        regularize_misclassified=l.regularize_misclassified,
        robust_active=robust)
    return loss, aux, {"lam": lam, "r0": r0}
  if l.name == "gloro":
    lam = jnp.where(robust, hyper["gloro_lam"](epoch), 0.0)
    loss, aux = losses.gloro_loss(logits, labels, lip, eps=l.train_eps,
                                  lam=lam)
    return loss, aux, {"lam": lam}
  if l.name == "lmt":
    mu = jnp.where(robust, hyper["lmt_mu"](epoch), 0.0)
    loss, aux = losses.lmt_loss(logits, labels, lip, eps=l.train_eps, mu=mu)
    return loss, aux, {"mu": mu}
  if l.name == "ce":
    loss = losses.cross_entropy(logits, labels)
    return loss, {"cross_entropy": loss}, {}
  raise ValueError(f"Unknown loss.name {l.name!r}; use crm, gloro, lmt or ce.")


def _lipschitz_stats(lip: jax.Array) -> dict[str, jax.Array]:
  if lip.ndim == 2:
    off = ~jnp.eye(lip.shape[0], dtype=bool)
    return {"lipschitz_mean": jnp.sum(jnp.where(off, lip, 0)) / off.sum(),
            "lipschitz_max": jnp.max(jnp.where(off, lip, 0))}
  return {"lipschitz_mean": jnp.mean(lip), "lipschitz_max": jnp.max(lip)}


def make_train_step(config, graphdef, tx, learning_rate, *,
                    steps_per_epoch: int) -> Callable:
  """The pure ``train_step(state, batch) -> (state, metrics)`` (not jitted).

  ``batch`` holds ``image`` (uint8 ``[B, H, W, C]``) and ``label`` (int32
  ``[B]``); images are scaled to [0, 1] and augmented here, on device, with
  the key ``fold_in(state.rng, state.step)``.
  """
  hyper = loss_schedules(config)
  augment_cfg = config.data.augment
  augments = (augment_cfg.hflip or augment_cfg.rotation_degrees > 0
              or augment_cfg.translate > 0)
  b = config.bound
  uses_bound_gradient = config.loss.name != "ce"

  def train_step(state: TrainState, batch):
    epoch = state.step // steps_per_epoch
    images = augment.to_float(batch["image"])
    if augments:
      images = augment.augment(
          jax.random.fold_in(state.rng, state.step), images,
          hflip=augment_cfg.hflip,
          rotation_degrees=augment_cfg.rotation_degrees,
          translate=augment_cfg.translate)
    labels = batch["label"]

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest)
      logits = model(images)
      lip, power = lipjax.bound(
          model, method=b.method, kind=b.kind, iterations=b.power_iterations,
          state=state.power, return_state=True, diagonal=1.0,
          large_class_threshold=b.large_class_threshold)
      if not uses_bound_gradient:
        lip = jax.lax.stop_gradient(lip)
      loss, aux, logged = _loss(config, hyper, epoch, logits, labels, lip)
      _, _, rest = nnx.split(model, nnx.Param, ...)
      return loss, (aux, logged, power, lip, logits, rest)

    (loss, (aux, logged, power, lip, logits, rest)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state.params))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    radius = radii.certified_radius(logits, labels, lip)
    correct = jnp.argmax(logits, -1) == labels
    metrics = {
        "loss": loss, "accuracy": jnp.mean(correct),
        "mean_radius": jnp.sum(jnp.where(correct, radius, 0.0))
                       / jnp.maximum(correct.sum(), 1),
        "learning_rate": learning_rate(state.step),
        "grad_norm": optax.tree.norm(grads),
        **aux, **logged, **_lipschitz_stats(lip)}
    new_state = dataclasses.replace(
        state, step=state.step + 1, params=params, rest=rest,
        opt_state=opt_state, power=power)
    return new_state, metrics

  return train_step


def make_eval_lipschitz(config, graphdef) -> Callable:
  """``(state) -> L``: the bound used for per-epoch validation.

  It takes ``config.eval.power_iterations`` more warm-started steps from the
  training vectors (as the reference's evaluation does) without changing
  the training state. It is an estimate from below, not a certificate; the
  final test evaluation and ``certify.py`` use certified norms (Lanczos with a stated failure probability, or exact).
  """
  b = config.bound

  def eval_lipschitz(state: TrainState):
    model = nnx.merge(graphdef, state.params, state.rest)
    return lipjax.bound(model, method=b.method, kind=b.kind,
                        iterations=config.eval.power_iterations,
                        state=state.power,
                        large_class_threshold=b.large_class_threshold)

  return eval_lipschitz


def make_eval_step(config, graphdef) -> Callable:
  """``(params, rest, lip, batch) -> sums``: counts over one masked batch."""
  eps = jnp.asarray(config.eval.eps, jnp.float32).reshape(-1)

  def eval_step(params, rest, lip, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = model(augment.to_float(batch["image"]))
    labels, mask = batch["label"], batch["mask"]
    count = jnp.sum(mask)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    radius = radii.certified_radius(logits, labels, lip)
    certified = radii.is_certified(logits, labels, lip, eps) & mask[None]
    return {"count": count, "correct": jnp.sum(correct),
            "certified": jnp.sum(certified, axis=1),
            "radius_sum": jnp.sum(jnp.where(correct, radius, 0.0))}

  return eval_step
