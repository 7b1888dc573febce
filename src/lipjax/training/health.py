"""The divergence guard: is a training step healthy enough to keep?

A step is healthy when its loss and the parameters it produced are finite
and its Lipschitz bound estimate is finite and, when the loss uses the bound
(every loss but plain cross-entropy), sane: at most
``checkpoint.max_lipschitz`` (a larger bound certifies nothing) and at most
``checkpoint.max_lipschitz_growth`` times the estimate of the previous
checked step (a jump that large is the start of a divergence, long before
the values overflow; healthy training changes the bound by a few percent
per step). The training loop checks every logged step and every step it is
about to checkpoint, saves only healthy ones and stops at the first
unhealthy one with :class:`NonFiniteLossError`, so the newest checkpoint is
one from before the divergence.
"""

from __future__ import annotations

import math
import re


class NonFiniteLossError(FloatingPointError):
  """Training diverged: a non-finite loss or parameters, or a wild bound."""


def problem(values: dict, *, params_finite: bool = True,
            previous_lipschitz: float | None, checkpoint_config,
            bound_in_loss: bool) -> str | None:
  """What is wrong with a step, or None when it is healthy.

  Args:
    values: the step's metrics as floats (``loss``, ``lipschitz_max``).
    params_finite: whether the parameters after the step are finite.
    previous_lipschitz: ``lipschitz_max`` of the previous checked step of
      this process (None for its first).
    checkpoint_config: ``config.checkpoint`` (``max_lipschitz``,
      ``max_lipschitz_growth``).
    bound_in_loss: whether the loss uses the bound (else only its
      finiteness is checked).
  """
  loss, lip = values["loss"], values["lipschitz_max"]
  if not math.isfinite(loss):
    return f"the loss is {loss}"
  if not params_finite:
    return "the parameters are not finite"
  if not math.isfinite(lip):
    return f"the Lipschitz bound estimate is {lip}"
  if not bound_in_loss:
    return None
  if lip > checkpoint_config.max_lipschitz:
    return (f"the Lipschitz bound estimate is {lip:.3g}, above "
            f"checkpoint.max_lipschitz = {checkpoint_config.max_lipschitz:g}")
  growth = checkpoint_config.max_lipschitz_growth
  if previous_lipschitz is not None and lip > growth * previous_lipschitz:
    return (f"the Lipschitz bound estimate jumped from "
            f"{previous_lipschitz:.3g} to {lip:.3g}, more than "
            f"checkpoint.max_lipschitz_growth = {growth:g} times")
  return None


def diverged_message(*, step: int, epoch: int, problem_text: str,
                     last_good_step: int, checkpoint_step: int | None,
                     optimizer) -> str:
  """The one-line error: what happened, what is kept, the command's fix.

  Args:
    step: the unhealthy step (1-based count of optimizer steps).
    epoch: its 0-based epoch.
    problem_text: :func:`problem`'s answer.
    last_good_step: the last step checked and found healthy.
    checkpoint_step: the newest checkpoint (all are healthy), or None.
    optimizer: ``config.optimizer`` (its rates are divided by 10).
  """
  lower = (f"--config.optimizer.learning_rate={optimizer.learning_rate / 10:g}"
           f" --config.optimizer.end_learning_rate="
           f"{optimizer.end_learning_rate / 10:g}")
  if checkpoint_step is None:
    fix = ("No checkpoint was saved before it; run the same command again "
           f"with a 10x lower learning rate: {lower}")
  else:
    fix = (f"The newest good checkpoint is step {checkpoint_step} and nothing "
           "after it was saved; resume from it with a 10x lower learning "
           f"rate: the same command with --checkpoint {checkpoint_step} "
           f"{lower}")
  limit = re.search(r"checkpoint\.(max_lipschitz\w*)", problem_text)
  if limit:
    fix += (" (or, if such a bound is expected, a larger "
            f"--config.checkpoint.{limit.group(1)})")
  return (f"Training diverged at step {step} (epoch {epoch + 1}): "
          f"{problem_text}. The last good step was {last_good_step}. {fix}.")
