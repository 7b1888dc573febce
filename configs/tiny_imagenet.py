"""Tiny-ImageNet, 8C2F, CRM + LipLT (large-class fallback, K = 200).

  python -m lipjax.training.data prepare tiny_imagenet --data_dir $TFDS_DATA_DIR \
      --manual_dir DIR_WITH_tiny-imagenet-200.zip       # once, needs [prepare]
  python train.py --config configs/tiny_imagenet.py --workdir runs/tiny

Reference recipe (docs/training.md#recipes); no input normalization, so ε is
in pixels. The test split is the labelled 10k validation set
(docs/training.md#data).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "tiny_imagenet"
  c.data.augment.hflip = True
  c.data.augment.rotation_degrees = 20.0
  c.data.augment.translate = 0.2
  c.model.architecture = "8C2F"
  c.bound.power_iterations = 5
  c.loss.t, c.loss.lam, c.loss.r0 = 12.0, 150.0, 0.2
  c.loss.robust_start_epoch = 10
  c.optimizer.learning_rate, c.optimizer.end_learning_rate = 1e-4, 1e-7
  c.optimizer.decay_start_epoch = 100
  c.batch_size, c.num_epochs = 256, 300
  c.eval.batch_size = 256
  c.eval.eps = (0.141, 36 / 255)
  return c
