"""Glue between fastadv's methods and the training engines people already run.

Each engine has its own module, imported only when asked for, so ``import fastadv`` never imports
transformers, accelerate or Lightning:

- ``fastadv.integrations.hf``: ``AdversarialTrainer``, a ``transformers.Trainer`` whose training
  step runs the adversary's passes.
- ``fastadv.integrations.lightning``: ``adversarial_training_step``, one call for a
  ``LightningModule`` with manual optimization.
- accelerate needs no glue: ``adversary.step(closure, backward=accelerator.backward)``.
"""
