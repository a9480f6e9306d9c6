"""Training: the dataset cache (``prepare``) and the trainers of ``samliverseg train``.

* ``prepare.py``: the training cache (``samliverseg prepare``);
* ``base.py``: :class:`~samliverseg.training.base.Trainer`, THE run loop (progress events, cancel
  vote, checkpoints and exact resume, validation, export, registration), which every kind fills in
  with hooks: ``decoder.py``, ``adapter.py``, ``unet.py``, ``student.py``, ``semi/trainer.py``
  (the kinds and their classes: ``samliverseg.models.kinds``);
* ``config.py`` (the YAML config, generated ``--help`` and ``--example-config``), ``checkpoint.py``,
  ``progress.py``, ``distributed.py`` (torchrun/DDP), ``train.py`` (``samliverseg train``).

Nothing heavy is imported here; import the submodules you need (``samliverseg.training.prepare``).
"""
