"""Exception hierarchy; each class maps to a CLI exit code (DESIGN.md §3)."""

from __future__ import annotations


class AuditorError(Exception):
    """Base class of every error auditor raises on purpose (exit code 3 unless overridden)."""

    exit_code: int = 3


class ConfigError(AuditorError, ValueError):
    """Invalid configuration or command-line usage (exit code 2)."""

    exit_code = 2


class DataError(AuditorError):
    """Unreadable or inconsistent data: images, masks, manifests (exit code 3)."""

    exit_code = 3


class ModelError(AuditorError):
    """The model could not be loaded or does not support what was asked of it (exit code 3)."""

    exit_code = 3


class MethodNotApplicableError(ModelError, ValueError):
    """A method's requirement on the model is not met (e.g. ``cam`` without a GAP + Linear head)."""
