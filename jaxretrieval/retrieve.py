"""`python -m jaxretrieval.retrieve --checkpoint PATH --images DIR --captions FILE [--output FILE]`

Zero-shot retrieval on your own folder of images and captions with any checkpoint (trained here or
converted): embeds every image and caption and prints the recall table. FILE holds one caption per line,
`image path<TAB>caption` (.tsv/.txt) or JSON `{"image": ..., "caption": ..., "image_id"?: ...}`, image
paths relative to DIR; captions of the same image are all correct answers for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxretrieval.data.sources import CaptionSource
from jaxretrieval.errors import command, parse_command_line
from jaxretrieval.evaluate import evaluate_checkpoint, probe_output, saved_config, write_metrics
from jaxretrieval.retrieval import recall_table


def retrieve(checkpoint_path: str | Path, images: str | Path, captions: str | Path, *, batch_size: int = 256,
             workers: int = 0) -> dict:
    # The recall table is image-text recall, whatever protocol the checkpoint was trained to report.
    config = saved_config(checkpoint_path, [f"data.workers={workers}", f"eval.batch_size={batch_size}",
                                            "eval.protocol=image_text"])
    return evaluate_checkpoint(config, checkpoint_path, CaptionSource(captions, images))


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.retrieve", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or workdir")
    parser.add_argument("--images", required=True, help="folder the caption file's image paths are relative to")
    parser.add_argument("--captions", required=True, help="caption file (.tsv/.txt or JSON lines)")
    parser.add_argument("--output", help="also write the metrics as JSON here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="threads decoding images")
    args = parse_command_line(parser, argv)
    output = probe_output(args.output)
    metrics = retrieve(args.checkpoint, args.images, args.captions, batch_size=args.batch_size,
                       workers=args.workers)
    print(recall_table(metrics), flush=True)
    write_metrics(metrics, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
