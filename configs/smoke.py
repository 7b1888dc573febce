"""Synthetic 8x8 data and a small conv net: trains in seconds, used by tests.

  python train.py --config configs/smoke.py --workdir /tmp/smoke
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "synthetic"
  c.data.download = False
  c.data.synthetic.num_train = 288
  c.data.synthetic.num_test = 64
  c.data.synthetic.image_shape = (8, 8, 1)
  c.data.synthetic.num_classes = 4
  c.model.architecture = "2C2F"
  c.bound.power_iterations = 2
  c.loss.t, c.loss.lam, c.loss.r0 = 5.0, 1.0, 0.5
  c.loss.robust_start_epoch = 1
  c.optimizer.learning_rate, c.optimizer.end_learning_rate = 3e-3, 1e-3
  c.optimizer.decay_start_epoch = 1
  c.batch_size, c.num_epochs = 32, 2
  c.eval.every_epochs = 1
  c.eval.batch_size = 32
  c.eval.eps = (0.05, 0.1)
  c.eval.power_iterations = 5
  c.eval.final_test = False
  c.checkpoint.every_steps = 4
  c.checkpoint.keep = 2
  c.log_every_steps = 2
  c.progress = False
  return c
