"""Every config key, with its meaning. Other configs import and override this.

Not a recipe by itself (it is the MNIST recipe of docs/training.md#recipes on
whatever dataset is named); use one of the dataset configs:

  python train.py --config configs/fashion_mnist.py --workdir runs/fmnist
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0                      # params init, power-iteration init, dropout-free rng

  c.data = ml_collections.ConfigDict()
  c.data.name = "mnist"           # mnist | fashion_mnist | cifar10 | cifar100 | tiny_imagenet | synthetic
  c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.download = True          # prepare the dataset if missing (needs the `prepare` extra and network)
  c.data.validation_fraction = 0.1  # held out from the official train split (reference: 90/10)
  c.data.split_seed = 0           # seed of the train/validation permutation
  c.data.max_train_examples = config_dict.placeholder(int)  # first N of the official train split; None = all
  c.data.max_test_examples = config_dict.placeholder(int)   # first N of the test split; None = all
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.hflip = False    # random horizontal flip, p = 0.5
  c.data.augment.rotation_degrees = 0.0  # random rotation in [-deg, deg]
  c.data.augment.translate = 0.0  # random translation, fraction of the size
  c.data.synthetic = ml_collections.ConfigDict()  # only for name == "synthetic"
  c.data.synthetic.num_train = 512
  c.data.synthetic.num_test = 128
  c.data.synthetic.image_shape = (8, 8, 1)
  c.data.synthetic.num_classes = 4
  c.data.synthetic.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.architecture = "4C3F"   # 3F | 2C2F | 4C3F | 6C2F | 8C2F
  c.model.activation = "relu"     # see lipjax.ACTIVATIONS
  c.model.input_mean = config_dict.placeholder(tuple)  # per channel; None -> 0
  c.model.input_std = config_dict.placeholder(tuple)   # per channel; None -> 1
  c.model.batch_norm = False      # eval-mode BN after convs (bound uses running var)

  c.bound = ml_collections.ConfigDict()
  c.bound.method = "liplt"        # liplt | naive
  c.bound.kind = "pairwise"       # pairwise | per_class | global
  c.bound.power_iterations = 10   # warm-started iterations per train step
  c.bound.large_class_threshold = 101  # pairwise LipLT fallback above this K

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "crm"             # crm | gloro | lmt | ce
  c.loss.form = "softmax"         # CRM: softmax (reference default) | max
  c.loss.t = 5.0                  # CRM temperature (reference `alpha`)
  c.loss.lam = 30.0               # CRM weight lambda
  c.loss.lam_multiplier = 1.0     # per-epoch factor after robust_start_epoch
  c.loss.lam_max = 1000.0
  c.loss.r0 = 2.2                 # CRM: only radii below r0 are penalized
  c.loss.r0_multiplier = 1.0
  c.loss.r0_max = 100.0
  c.loss.robust_start_epoch = 10  # epochs of pure cross-entropy first (E0)
  c.loss.regularize_misclassified = False
  c.loss.train_eps = 0.1551       # GloRo / LMT training epsilon (pixel units)
  c.loss.gloro_lam_initial = 0.1  # GloRo lambda ramps linearly to final
  c.loss.gloro_lam_final = 3.0
  c.loss.lmt_mu_initial = 1e-3    # LMT mu grows by lmt_mu_growth per epoch
  c.loss.lmt_mu_growth = 1.03
  c.loss.lmt_mu_max = 2.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.end_learning_rate = 1e-6
  c.optimizer.schedule = "exponential_with_stopping"  # | cosine | constant
  c.optimizer.decay_start_epoch = 25  # exponential_with_stopping: S (>= num_epochs: constant)
  c.optimizer.warmup_epochs = 0   # cosine only
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-7

  c.batch_size = 512              # global, over all devices and processes
  c.num_epochs = 400

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 5         # validation clean + certified accuracy
  c.eval.batch_size = 1024
  c.eval.eps = (1.58,)            # certification radii, pixel units
  c.eval.power_iterations = 50    # extra warm-started iterations for eval L
  c.eval.final_test = True        # certified (Lanczos) bound + test split at the end

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  # Divergence guard (not for loss ce): a bound estimate above max_lipschitz,
  # or over max_lipschitz_growth x the previous logged one, stops the run
  # and is never saved.
  c.checkpoint.max_lipschitz = 1e6
  c.checkpoint.max_lipschitz_growth = 100.0

  c.log_every_steps = 50
  c.progress = True               # progress bars on stderr
  return c
