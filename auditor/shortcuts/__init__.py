"""Shortcut detection over a whole dataset: one module per analysis, registered in an analysis registry.

- :mod:`auditor.shortcuts.registry`: the :class:`~auditor.shortcuts.registry.Analysis` record and
  :func:`~auditor.shortcuts.registry.run_analyses` (measure, intervene, flag).
- :mod:`auditor.shortcuts.catalog`: the list of analysis modules (importing it registers them).
- :mod:`auditor.shortcuts.flags`: the typed flag record and the severity scale.
- :mod:`auditor.shortcuts.probes` and :mod:`auditor.shortcuts.interventions`: what touches the model.

This ``__init__`` imports nothing, so torch-free readers (``auditor gate``) can import the flag module.
"""
