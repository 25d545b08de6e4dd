"""Checkpoint converters between PyTorch releases and jaxretrieval checkpoints: `python -m convert --help`."""

from __future__ import annotations

from jaxretrieval.errors import UserError


class ConvertError(UserError, ValueError):
    """A source that cannot be converted: unknown format, missing or unexpected keys, wrong shapes."""


__all__ = ["ConvertError"]
