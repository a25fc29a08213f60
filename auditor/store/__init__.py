"""Finished and running audits on disk: the run directory (every path under ``--out``) and the schema of
its JSON files. No torch: the gate, report and compare read runs through it."""
