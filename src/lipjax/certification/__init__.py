"""Certification: from logits and a Lipschitz bound to a guarantee.

* :mod:`~lipjax.certification.radii`: certified radius and accuracy from
  logits and pairwise / per-class / global bounds (``lipjax.certified_radius``);
* :mod:`~lipjax.certification.attacks`: L2 PGD inside the pixel box
  (``lipjax.pgd_l2``);
* :mod:`~lipjax.certification.sound_bound`: the bound a certificate rests
  on, with a per-product report of where each norm came from;
* :mod:`~lipjax.certification.workdir`: restoring a training workdir;
* :mod:`~lipjax.certification.pipeline`: ``certify.py``'s run, phase by
  phase (bound, certify, attack, audit);
* :mod:`~lipjax.certification.report` and
  :mod:`~lipjax.certification.figures`: ``certify.json``, the table, PNGs.

Nothing is imported here: :mod:`lipjax` imports the light modules it
re-exports, and the workdir pipeline (which needs training's data and
checkpoints) is imported only by those who run it.
"""
