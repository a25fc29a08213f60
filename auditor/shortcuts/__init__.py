"""Shortcut detection over a whole dataset: one module per analysis, registered in an analysis registry.

- :mod:`auditor.shortcuts.registry`: the :class:`~auditor.shortcuts.registry.Analysis` record, what an
  analysis may read (``AnalysisInputs``) and ask of the model (``Intervener``).
- :mod:`auditor.shortcuts.catalog`: every analysis module (importing it registers them) and
  :func:`~auditor.shortcuts.catalog.run_analyses` (measure, intervene, one test family, flag).
- :mod:`auditor.shortcuts.removals`: the counterfactual evidence several analyses share.
- :mod:`auditor.shortcuts.flags`: the typed flag record and the severity scale.
- :mod:`auditor.shortcuts.probes` and :mod:`auditor.shortcuts.interventions`: what touches the model.

This ``__init__`` imports nothing, so torch-free readers (``auditor gate``) can import the flag module.
"""
