"""What the property-based tests share: repeatable Hypothesis settings, and Hypothesis's cache kept out of the repo."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings

# Hypothesis keeps caches (unicode tables, constants) under ./.hypothesis unless told otherwise: not in the repo.
# It reads the variable on first use, which is after the test modules' imports.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "jaxretrieval-hypothesis"))


def fuzz(examples: int):
    """Hypothesis settings: a fixed number of cases drawn the same way on every run (a shared CI machine needs
    repeatable runs), no deadline, no example database written anywhere."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
