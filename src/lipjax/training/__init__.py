"""Training certifiably robust classifiers: ``train.py``'s library.

Modules, in the order a training run uses them:

* :mod:`~lipjax.training.config_files` (``--config FILE[:VARIANT]`` and its
  overrides, checked before absl parses them) and
  :mod:`~lipjax.training.config_checks` (unknown keys and names and values
  out of range): errors that name the fix;
* :mod:`~lipjax.training.data` (TFDS array_record datasets, splits,
  ``python -m lipjax.training.data prepare``),
  :mod:`~lipjax.training.batches` (deterministic batches),
  :mod:`~lipjax.training.augment`, :mod:`~lipjax.training.tiny_imagenet`
  (a TFDS builder);
* :mod:`~lipjax.training.losses` (CRM, GloRo, LMT, cross-entropy) and
  :mod:`~lipjax.training.schedules` (learning rate, per-epoch λ/r0/μ);
* :mod:`~lipjax.training.steps`: the train state and the pure jitted
  train/eval steps;
* :mod:`~lipjax.training.parallel` (mesh, shardings, multi-host),
  :mod:`~lipjax.training.checkpoints` (Orbax), :mod:`~lipjax.training.metrics`
  (``metrics.jsonl``);
* :mod:`~lipjax.training.loop`: ``train_and_evaluate(config, workdir)``.

Nothing is imported here, so that ``import lipjax`` does not pull in TFDS or
Orbax.
"""
