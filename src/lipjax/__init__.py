"""lipjax: certifiably robust classifiers with CRM and LipLT in JAX.

The public API is flat::

  import lipjax
  L = lipjax.bound([W0, W1, W2], method="liplt", kind="pairwise")
  radii = lipjax.certified_radius(logits, labels, L)

The package has three parts, by what a user does:

* the **bound engine**, at the top level: activations, models, linear maps,
  power iteration, exact norms, the naive and LipLT bounds and
  :func:`lipjax.bound`;
* :mod:`lipjax.training`: data, losses, schedules, train steps, the loop,
  checkpoints (imported on demand, so ``import lipjax`` stays light);
* :mod:`lipjax.certification`: certified radii, attacks, the sound bound
  with its report, and the workdir pipeline behind ``certify.py``.

See README.md for more.
"""


from lipjax import activations
from lipjax import bounds
from lipjax import certification
from lipjax import exact
from lipjax import guarantee
from lipjax import lanczos
from lipjax import linear_maps
from lipjax import models
from lipjax import power_iteration
from lipjax.activations import ACTIVATIONS
from lipjax.api import BoundInfo
from lipjax.api import EXACT_SAFETY_FACTOR
from lipjax.api import bound
from lipjax.api import init_power_state
from lipjax.bounds import bound_from_norms
from lipjax.bounds import liplt_bound
from lipjax.bounds import naive_bound
from lipjax.bounds import required_products
from lipjax.certification.attacks import pgd_l2
from lipjax.certification.attacks import project_l2_box
from lipjax.certification.radii import certified_accuracy
from lipjax.certification.radii import certified_radius
from lipjax.certification.radii import clean_accuracy
from lipjax.certification.radii import is_certified
from lipjax.linear_maps import LinearChain
from lipjax.linear_maps import LinearOp
from lipjax.linear_maps import from_matrices
from lipjax.linear_maps import from_model
from lipjax.linear_maps import to_chain
from lipjax.norm_certificates import NormCertificate
from lipjax.power_iteration import PowerState

__version__ = "0.1.0"

__all__ = (
    "ACTIVATIONS",
    "BoundInfo",
    "EXACT_SAFETY_FACTOR",
    "LinearChain",
    "LinearOp",
    "NormCertificate",
    "PowerState",
    "activations",
    "bound",
    "bound_from_norms",
    "bounds",
    "certification",
    "certified_accuracy",
    "certified_radius",
    "clean_accuracy",
    "exact",
    "guarantee",
    "lanczos",
    "from_matrices",
    "from_model",
    "init_power_state",
    "is_certified",
    "linear_maps",
    "liplt_bound",
    "models",
    "naive_bound",
    "pgd_l2",
    "power_iteration",
    "project_l2_box",
    "required_products",
    "to_chain",
)
