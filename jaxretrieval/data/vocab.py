"""`python -m jaxretrieval.data.vocab ANNOTATIONS.jsonl [...] --output vocab.txt [--min-count N]`

Writes the word vocabulary the word-level tokenizer reads (one word per line, most frequent first) from
the captions of caption-per-line annotation files.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from jaxretrieval.data.sources import CaptionSource, DataError
from jaxretrieval.data.tokenizers import split_words


def build_vocabulary(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """Words seen at least `min_count` times, most frequent first, ties in alphabetical order."""
    counts = Counter(word for caption in captions for word in split_words(caption))
    return [word for word, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n >= min_count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.data.vocab", description=__doc__.split("\n")[0])
    parser.add_argument("annotations", nargs="+", help="JSON-lines annotation files (image paths not checked)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--min-count", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        captions = [record.caption for path in args.annotations
                    for record in CaptionSource(path, check_images=False).records]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    words = build_vocabulary(captions, args.min_count)
    Path(args.output).write_text("".join(f"{word}\n" for word in words))
    print(f"{len(words)} words -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
