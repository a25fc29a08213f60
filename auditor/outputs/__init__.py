"""Outputs of a finished run: the HTML report, comparison of two runs, CI gates (none imports torch)."""
