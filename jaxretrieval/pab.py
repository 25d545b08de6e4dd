"""`python -m jaxretrieval.pab`: the PAB seed's whole inference in one command.

  python -m jaxretrieval.pab --queries query.json --gallery gallery/ --lhp CKPT --uit CKPT --blip2 CKPT \\
      --clip CKPT --out DIR [--weights w1=0.925 w2=0.9 w3=0.9] [--rerank-k 10] [--labels labels.json]

Each scorer given ranks the gallery for every query on this host's devices (`predict`): LHP (BEiT-3), BLIP-2 and
CLIP give their (queries, gallery) score matrices (BLIP-2 by its first query token, as the seed's scorer;
`--blip2-reduce max` for BLIP-2's own ITC); UIT re-scores LHP's top `--rerank-k` gallery images per query with
its ITM head (the rest of each row at its lowest re-score). The ensemble is the seed's iterative fusion,

    S = {[(1 - w1) N(ITM) + w1 N(LHP)] w2 + (1 - w2) N(BLIP-2)} w3 + (1 - w3) N(CLIP),  N: min-max over the matrix,

with each weight used where its name says (the seed passes w2 in w1's place; see fusion.fuse_iterative). A scorer
left out drops out of the sum with its weight, and the run says so; without LHP, UIT re-scores its own ITC top k.
DIR gets one folder per scorer (scores.npz, submission.txt, uit/itm_scores.npz, metrics.json with --labels) and the
fused.npz, submission.txt and metrics.json of the ensemble. Every matrix keeps its query ids and the gallery's
sorted file stems, whatever order the file system lists them in.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxretrieval.errors import ConfigError, command, parse_command_line, probe_output_folder
from jaxretrieval.fuse import parse_weights, ranking_outputs, reported_as, write_outputs
from jaxretrieval.predict import predict
from jaxretrieval.retrieval.fusion import ScoreMatrix, fuse_linear, iterative_weights, scores_from_bytes
from jaxretrieval.retrieval.metrics import metrics_table

SCORERS = ("lhp", "uit", "blip2", "clip")
SEED_WEIGHTS = {"w1": 0.925, "w2": 0.9, "w3": 0.9}  # the seed's --beit3_weight, --blip2_weight, --clip_weight


def ensemble_weights(present: set[str], w1: float, w2: float, w3: float) -> dict[str, float]:
    """The iterative fusion's weight of each matrix (itm, lhp, blip2, clip) that is present; absent ones drop out."""
    weights = iterative_weights(w1, w2, w3, itm="itm", primary="lhp", second="blip2", third="clip")
    kept = {name: weight for name, weight in weights.items() if name in present and weight > 0}
    if not kept:
        raise ConfigError(f"the weights {w1=}, {w2=}, {w3=} give every scorer present ({sorted(present)}) weight 0")
    return kept


def run_scorers(args: argparse.Namespace) -> tuple[dict[str, dict[str, bytes]], dict[str, ScoreMatrix]]:
    """Each scorer's output files, and the matrices the fusion reads (itm: UIT's re-scores)."""
    common = dict(top_k=args.top_k, labels=args.labels, batch_size=args.batch_size, workers=args.workers)
    files: dict[str, dict[str, bytes]] = {}
    for name in ("lhp", "blip2", "clip"):
        if getattr(args, name):
            print(f"pab: scoring with {name} ({getattr(args, name)})", file=sys.stderr)
            overrides = [f"blip2.query_reduce={args.blip2_reduce}"] if name == "blip2" else []
            files[name] = predict(getattr(args, name), args.queries, args.gallery, overrides=overrides, **common)
    matrices = {name: scores_from_bytes(out["scores.npz"], name) for name, out in files.items()}
    if args.uit:
        candidates = matrices.get("lhp")
        print(f"pab: UIT re-scores {'LHP' if candidates else 'its own'} top {args.rerank_k} per query", file=sys.stderr)
        files["uit"] = predict(args.uit, args.queries, args.gallery, itm_k=args.rerank_k, itm_candidates=candidates,
                               **common)
        matrices["itm"] = scores_from_bytes(files["uit"]["itm_scores.npz"], "itm")
    return files, matrices


def compute(args: argparse.Namespace) -> dict[str, dict[str, bytes]]:
    weights = {**SEED_WEIGHTS, **parse_weights(args.weights or [])}
    if sorted(weights) != ["w1", "w2", "w3"]:
        raise ConfigError(f"--weights takes w1=.. w2=.. w3=.., got {sorted(weights)}")
    given = [name for name in SCORERS if getattr(args, name)]
    if not given:
        raise ConfigError(f"name at least one scorer: {', '.join('--' + s for s in SCORERS)}")
    if args.rerank_k < 1 or args.top_k < 1:
        raise ConfigError("--rerank-k and --top-k must be at least 1")
    present = {"itm" if name == "uit" else name for name in given}
    with reported_as(ConfigError):
        fusion = ensemble_weights(present, weights["w1"], weights["w2"], weights["w3"])
    for name in SCORERS:
        if name not in given:
            print(f"pab: no --{name}: its term drops out of the ensemble", file=sys.stderr)
    files, matrices = run_scorers(args)
    with reported_as(ConfigError):
        fused = fuse_linear([matrices[name] for name in fusion], fusion)
    files["ensemble"] = ranking_outputs(fused, "fused.npz", args.top_k, args.labels)
    files["ensemble"]["weights.json"] = (json.dumps(fusion, indent=2) + "\n").encode()
    return files


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.pab", description=__doc__.split("\n")[0])
    parser.add_argument("--queries", required=True, help='JSON lines {"query_index": ..., "caption": ...}')
    parser.add_argument("--gallery", required=True, help="folder of gallery images, ranked by file stem")
    for name, what in (("lhp", "LHP (BEiT-3, system beit3)"), ("uit", "UIT (system uit): ITM re-scores"),
                       ("blip2", "BLIP-2 (system blip2)"), ("clip", "CLIP ViT-L/14@336 (system clip)")):
        parser.add_argument(f"--{name}", metavar="CKPT", help=f"{what} checkpoint; left out: dropped from the ensemble")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--weights", nargs="+", metavar="wN=W", help="w1 w2 w3 (default: the seed's 0.925 0.9 0.9)")
    parser.add_argument("--rerank-k", type=int, default=10, help="LHP candidates UIT re-scores per query (10)")
    parser.add_argument("--blip2-reduce", choices=("first", "max"), default="first",
                        help="BLIP-2's image score: its first query (the seed's blip2_infer.py) or the best query")
    parser.add_argument("--labels", help="JSON object: query id -> relevant gallery stems (prints the metrics)")
    parser.add_argument("--top-k", type=int, default=10, help="gallery stems per submission line (default 10)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="threads decoding images")
    args = parse_command_line(parser, argv)
    out = probe_output_folder(args.out)
    files = compute(args)
    for name, written in files.items():
        write_outputs(out if name == "ensemble" else out / name, written,
                      ("submission.txt", "scores.npz", "fused.npz", "metrics.json", "itm_scores.npz", "weights.json"))
    if args.labels:
        rows = {name: json.loads(written["metrics.json"]) for name, written in files.items()}
        for name, metrics in rows.items():
            print(f"{name}:\n{metrics_table(metrics)}")
    print(f"wrote {', '.join(f'{n}/' for n in files if n != 'ensemble')} and the ensemble's "
          f"{', '.join(files['ensemble'])} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
