"""What every whole-model converter does with the sizes it read: a config of its system, named like the preset of the
same sizes (else "custom"), and the WordPiece vocabulary given with --vocab, checked against the embedding table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert import ConvertError
from jaxretrieval.config import Config, load_config
from jaxretrieval.data.wordpiece import WordPieceTokenizer
from jaxretrieval.errors import ConfigError, UserError
from jaxretrieval.models import MODEL_PRESETS


def preset_name(family: str, overrides: list[str], accept: Callable[[str], bool] = lambda preset: True) -> str:
    """The first preset of `family` (and `accept`ed) whose model the `model.*` overrides leave unchanged: the
    preset's own sizes and the preset overridden with ours are equal; "custom" when none is."""
    plain = [o for o in overrides if not o.startswith("model.")]
    for preset, values in MODEL_PRESETS.items():
        if values.get("family") != family or not accept(preset):
            continue
        try:
            own = load_config(None, [*plain, f"model.name={preset}"], notices=False).model
            if load_config(None, [*overrides, f"model.name={preset}"], notices=False).model == own:
                return preset
        except ConfigError:
            continue
    return "custom"


def named_config(overrides: list[str], name: str, source: str, system: str) -> Config:
    """The config of `overrides` on preset `name`; invalid sizes are a ConvertError naming the system."""
    try:
        return load_config(None, [*overrides, f"model.name={name}"], source=source, notices=False)
    except ConfigError as e:
        raise ConvertError(f"the checkpoint's sizes make no valid system-{system} config: {e}") from None


def wordpiece_vocab(vocab: str | Path | None, context_length: int, vocab_size: int,
                    where: str) -> WordPieceTokenizer | None:
    """The --vocab tokenizer (None without one); more ids than the model embeds is a ConvertError."""
    if vocab is None:
        return None
    try:
        tokenizer = WordPieceTokenizer.from_file(vocab, context_length)
    except (UserError, OSError, ValueError) as e:
        raise ConvertError(f"--vocab {vocab}: {e}") from None
    if tokenizer.vocab_size > vocab_size:
        raise ConvertError(f"--vocab {vocab} has {tokenizer.vocab_size} tokens but {where} embeds only {vocab_size}: "
                           f"not this model's vocabulary")
    return tokenizer
