"""A run is two stages over one owner of the run directory; drivers differ only in where the map stage runs.

- :mod:`auditor.store.rundir`: every path and format under ``--out`` (no torch).
- :mod:`auditor.run.setup`: validation and resolution before the first batch (:class:`~auditor.run.setup.Plan`).
- :mod:`auditor.run.mapstage`: one batch -> rows, low-res maps, curves (no global state).
- :mod:`auditor.run.flagged`: the expensive subset and the flagged second pass.
- :mod:`auditor.run.reduce`: committed parts + model -> aggregates, analyses, flags, summary, deep dive, report.
- :mod:`auditor.run.local`: the in-process driver (``auditor run``).

This package's ``__init__`` imports nothing, so readers of finished runs (``gate``, ``report``,
``compare``) can use :mod:`auditor.store.rundir` without torch.
"""
