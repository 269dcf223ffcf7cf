"""Model selection: cross-validation and hyperparameter search over training runs, and the
choice of a trained run's re-ranking.

- :mod:`nirdml.selection.crossval`: the Reality-Check protocol (Musgrave et al., ECCV 2020):
  class-disjoint folds of the training classes, one model per fold, validation mean +- std and
  the test metrics of each fold model and of their ensemble (``nirdml crossval``).
- :mod:`nirdml.selection.tune`: an Optuna search over any config keys, scored by the
  cross-validated validation metric (``nirdml tune``).
- :mod:`nirdml.selection.search_space`: the YAML search space of ``tune``, parsed and checked
  against a config before any trial.
- :mod:`nirdml.selection.rerank`: a trained run's re-ranking parameters, every grid point
  scored on its validation classes (``nirdml tune --rerank``; no training).

Import the functions from their modules (``from nirdml.selection.crossval import crossval``):
the package re-exports nothing, so ``crossval`` and ``tune`` always name the modules.
"""
