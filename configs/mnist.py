"""MNIST, 4C3F, CRM + LipLT pairwise: the reference recipe.

  python train.py --config configs/mnist.py --workdir runs/mnist

No input normalization, so ε is in pixel units as in the paper (1.58).
Recipes: docs/training.md#recipes.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "mnist"
  c.model.architecture = "4C3F"
  c.bound.power_iterations = 10
  c.loss.t, c.loss.lam, c.loss.r0 = 5.0, 30.0, 2.2
  c.loss.robust_start_epoch = 10
  c.optimizer.learning_rate, c.optimizer.end_learning_rate = 1e-3, 1e-6
  c.optimizer.decay_start_epoch = 25
  c.batch_size, c.num_epochs = 512, 400
  c.eval.eps = (1.58,)
  return c
