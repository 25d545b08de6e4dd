"""`python -m jaxretrieval.evaluate --config FILE --checkpoint PATH [--output FILE] [key=value ...]`

Embeds the gallery images and every caption of the evaluation split and writes one JSON object of metrics
(percent): image-text recall (i2t_R1 i2t_R5 i2t_R10 t2i_R1 t2i_R5 t2i_R10 rsum), or for eval.protocol
text_to_image R1 R5 R10 mAP mINP.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxretrieval import checkpoint
from jaxretrieval.config import Config, load_config
from jaxretrieval.data.pipeline import EvalInputs
from jaxretrieval.data.reid_pipeline import ReidSplit
from jaxretrieval.data.sources import CaptionSource
from jaxretrieval.data.tokenizers import build_tokenizer
from jaxretrieval.errors import DataError, OutputPathError, command, parse_command_line, probe_file
from jaxretrieval.models import abstract_model
from jaxretrieval.retrieval import embed_all, evaluate_reid, image_text_recall
from jaxretrieval.retrieval.embed import text_image_scores
from jaxretrieval.retrieval.metrics import image_text_recall_topk, ranking_metrics
from jaxretrieval.retrieval.rerank import RerankSpec, rerank_matrix
from jaxretrieval.retrieval.similarity import topk_similarity
from jaxretrieval.sharding import initialize_distributed, make_mesh, tree_shardings, under_mesh
from jaxretrieval.systems import get_system

RECALL_AT = (1, 5, 10)


@functools.lru_cache(maxsize=16)
def encoders(graphdef: nnx.GraphDef, mesh: Mesh | None = None):
    """Jitted (params, pixels) -> image embeddings and (params, tokens) -> text embeddings, normalised; traced
    under `mesh` (when given) so the towers' activation constraints apply. Cached: a run's evaluations reuse one
    compiled pair instead of compiling (and keeping) a new one each time."""
    def image(params: dict, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).encode_image(x, normalize=True)

    def text(params: dict, t: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).encode_text(t, normalize=True)

    wrap = (lambda fn: jax.jit(under_mesh(fn, mesh))) if mesh is not None else jax.jit
    return wrap(image), wrap(text)


def embed_inputs(graphdef: nnx.GraphDef, params: dict, images, tokens: np.ndarray, mesh: Mesh,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, caption embeddings), L2-normalised. images: any sliceable of preprocessed pixels."""
    encode_image, encode_text = encoders(graphdef, mesh)
    image_emb = embed_all(lambda x: encode_image(params, x), images, batch_size, mesh)
    text_emb = embed_all(lambda t: encode_text(params, t), tokens, batch_size, mesh)
    return image_emb, text_emb


def evaluate_retrieval(graphdef: nnx.GraphDef, params: dict, inputs: EvalInputs, mesh: Mesh, batch_size: int,
                       protocol: str = "image_text", folds: int = 1, rerank: RerankSpec | None = None) -> dict:
    """Metrics of `protocol` (see EvalConfig.protocol) on one evaluation split, with `skipped`: the gallery images
    left out because they failed to decode (eval.skip_bad_records; see EvalInputs.without_skipped). `folds` > 1
    adds the image_text metrics averaged over that many folds of consecutive images, prefixed `1k_` (COCO's 5-fold
    1K protocol). `rerank` (text_to_image): also the metrics after re-ranking each caption's top k images with the
    cross-encoder, prefixed `rerank_`."""
    if rerank is None:
        image_emb, text_emb = embed_inputs(graphdef, params, inputs.images, inputs.tokens, mesh, batch_size)
    else:
        image_emb, image_inputs = embed_all(lambda x: rerank.encoder.image(params, x), inputs.images, batch_size, mesh)
        text_emb, text_inputs = embed_all(lambda t: rerank.encoder.text(params, t), inputs.tokens, batch_size, mesh)
    image_emb, text_emb, text_groups, image_groups = inputs.without_skipped(image_emb, text_emb, protocol)
    if protocol == "text_to_image":
        # mAP and mINP need the rank of every relevant image, so this scores the whole (captions, images) matrix.
        relevant = text_groups[:, None] == image_groups[None, :]
        scores = text_image_scores(text_emb, image_emb)
        metrics = ranking_metrics(scores, relevant, RECALL_AT)
        if rerank is not None:
            metrics.update(rerank_metrics(params, scores, relevant, text_inputs, image_inputs, inputs.kept_rows(),
                                          rerank, mesh))
    else:
        metrics = image_text_recall_all(image_emb, text_emb, text_groups, mesh)
        if folds > 1:
            metrics.update(fold_recall(image_emb, text_emb, text_groups, mesh, folds))
    metrics.update(num_images=int(image_emb.shape[0]), num_texts=int(text_emb.shape[0]),
                   skipped=len(inputs.images.skipped))
    return metrics


def rerank_metrics(params: Any, scores: np.ndarray, relevant: np.ndarray, text_inputs: Any, image_inputs: Any,
                   kept: tuple[np.ndarray, np.ndarray], rerank: RerankSpec, mesh: Mesh) -> dict[str, float]:
    """`ranking_metrics` of the re-ranked (captions, images) matrix, keys prefixed `rerank_`, and `rerank_k` (the
    k used: eval.rerank_k, or the gallery size when smaller)."""
    image_rows, text_rows = kept
    k = min(rerank.k, scores.shape[1])
    matrix = rerank_matrix(scores, lambda q, g: rerank.encoder.pair_scores(params, q, g),
                           jax.tree.map(lambda a: a[text_rows], text_inputs),
                           jax.tree.map(lambda a: a[image_rows], image_inputs), k, fill=rerank.fill,
                           combine=rerank.combine, mesh=mesh, batch_size=rerank.batch_size)
    metrics = ranking_metrics(matrix, relevant, RECALL_AT)
    return {**{f"rerank_{key}": value for key, value in metrics.items()}, "rerank_k": k}


def image_text_recall_all(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                          mesh: Mesh) -> dict:
    depth = max(RECALL_AT)
    # too small for top-k lists, or multi-vector images (BLIP-2's queries): score the whole matrix
    if min(len(image_emb), len(text_emb)) < depth or image_emb.ndim == 3:
        metrics = image_text_recall(text_image_scores(text_emb, image_emb).T, text_to_image, RECALL_AT)
    else:  # exact top-k in chunks over the mesh: memory bounded by the chunk, never images x captions
        _, image_top = topk_similarity(image_emb, text_emb, depth, mesh=mesh)
        _, text_top = topk_similarity(text_emb, image_emb, depth, mesh=mesh)
        metrics = image_text_recall_topk(image_top, text_top, text_to_image, RECALL_AT)
    return metrics


def within_modality_recall(embeddings: np.ndarray, groups: np.ndarray, mesh: Mesh, prefix: str) -> dict[str, float]:
    """Recall@K of each item retrieving another item of its group among the others of its own modality (itself left
    out), over the items that have one; `{prefix}R1` ... (percent) and `{prefix}queries`."""
    groups = np.asarray(groups)
    dense = np.unique(groups, return_inverse=True)[1]
    has_other = np.bincount(dense)[dense] > 1
    depth = min(max(RECALL_AT) + 1, len(embeddings))
    if not has_other.any() or depth < 2:
        return {f"{prefix}queries": 0}
    _, top = topk_similarity(embeddings[has_other], embeddings, depth, mesh=mesh)
    rows = np.flatnonzero(has_other)
    # Drop each row's own index (or, where ties pushed it out of the list, the last entry): depth - 1 others.
    keep = top != rows[:, None]
    keep[keep.all(axis=1), -1] = False
    others = top[keep].reshape(len(top), depth - 1)
    hits = groups[others] == groups[rows][:, None]
    out = {f"{prefix}R{k}": 100.0 * float(hits[:, :k].any(axis=1).mean()) for k in RECALL_AT if k < depth}
    return {**out, f"{prefix}queries": int(len(rows))}


def fold_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, mesh: Mesh,
                folds: int) -> dict[str, float]:
    """`image_text_recall_all` per fold of consecutive images (each ranking only its own images and their captions),
    averaged, keys prefixed `1k_`; the image count must divide into the folds."""
    if len(image_emb) % folds:
        raise DataError(f"eval.folds={folds}: the {len(image_emb)} gallery images do not split into equal folds")
    size = len(image_emb) // folds
    per_fold = []
    for fold in range(folds):
        texts = np.flatnonzero(text_to_image // size == fold)
        images = slice(fold * size, (fold + 1) * size)
        per_fold.append(image_text_recall_all(image_emb[images], text_emb[texts], text_to_image[texts] - fold * size,
                                              mesh))
    return {f"1k_{key}": float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}


def evaluate_reid_splits(graphdef: nnx.GraphDef, params: dict, splits: tuple[ReidSplit, ReidSplit], mesh: Mesh,
                         batch_size: int, per_camera: bool = True) -> dict:
    """Re-id metrics of the query split against the gallery images (R1 ... mINP) and against the gallery's identity
    centroids (centroid_R1 ...), from L2-normalised BN-neck features; `skipped` counts the query and gallery images
    left out because they failed to decode (eval.skip_bad_records; see ReidSplit.without_skipped)."""
    encode_image, _ = encoders(graphdef, mesh)
    # Per split (query, gallery): (embeddings, pids, camids) of the images that decoded.
    query, gallery = [split.without_skipped(embed_all(lambda x: encode_image(params, x), split.images, batch_size,
                                                      mesh)) for split in splits]
    sets = (*query, *gallery)
    images = evaluate_reid(*sets, centroids=False)
    centroids = evaluate_reid(*sets, centroids=True, per_camera=per_camera)
    skipped = sum(len(split.images.skipped) for split in splits)
    return {**images, **{f"centroid_{key}": value for key, value in centroids.items()}, "skipped": skipped}


def restore_params(config: Config, path: str | Path, mesh: Mesh) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params placed on the mesh, checkpoint metadata) for the model `config` describes."""
    graphdef, abstract = abstract_model(config, precision=config.train.precision)
    shardings = tree_shardings(abstract, mesh, config.sharding)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params, meta = checkpoint.load_model(path, target)
    return graphdef, params, meta


def saved_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a checkpoint was trained with, with overrides applied."""
    meta = checkpoint.read_meta_at(path)
    return load_config(None, overrides, base=meta["config"], source=f"config saved with checkpoint {path}",
                       notices=False)


def command_config(config_file: str | None, checkpoint_path: str | Path, overrides: list[str]) -> Config:
    """The config of a command reading a checkpoint: --config's file, else the one saved with the checkpoint, with the
    overrides; jax.distributed is started first (from the file's or the overrides' distributed keys), before anything
    touches jax."""
    config = load_config(config_file, overrides) if config_file else None
    early = config or load_config(None, [o for o in overrides if o.startswith("distributed.")])
    initialize_distributed(early.distributed)
    return config or saved_config(checkpoint_path, overrides)


def evaluate_checkpoint(config: Config, checkpoint_path: str | Path, source: CaptionSource | None = None) -> dict:
    """The checkpoint's metrics by its system's evaluation of eval.protocol: e.g. image-text recall on the images and
    captions of `source` (default: eval.split), or for re-id the query split against the gallery."""
    mesh = make_mesh(config.mesh)
    graphdef, params, meta = restore_params(config, checkpoint_path, mesh)
    # The tokenizer the model was trained (or converted) with, as saved in its checkpoint.
    tokenizer = build_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    metrics = get_system(config.system).evaluator(config, tokenizer, source)(graphdef, params, mesh)
    metrics["step"] = meta.get("step")
    return metrics


def run(config: Config, checkpoint_path: str | Path) -> dict:
    return evaluate_checkpoint(config, checkpoint_path)


def probe_output(path: str | None, option: str = "--output") -> Path | None:
    """The metrics file, proven writable before any work starts (None: stdout only)."""
    if path is None:
        return None
    try:
        return probe_file(path, "output file")
    except OutputPathError as e:
        raise OutputPathError(f"{option} {path}: {e}") from None


def write_metrics(metrics: dict, output: Path | None, option: str = "--output") -> None:
    """Called once the metrics are on stdout: writes them to `output` and says on stderr where they are."""
    if output is None:
        print(f"metrics printed to stdout only (pass {option} FILE to keep them in a file)", file=sys.stderr)
        return
    try:
        output.write_text(json.dumps(metrics, indent=2) + "\n")
    except OSError as e:
        raise OutputPathError(f"cannot write the metrics to {option} {output} ({e.strerror or e}); they are printed "
                              f"above; choose another path or fix its permissions") from None
    print(f"metrics written to {output}", file=sys.stderr)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="config file (default: the config saved with the checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or workdir")
    parser.add_argument("--output", help="write the metrics JSON here as well as to stdout")
    parser.add_argument("overrides", nargs="*", help="key.path=value (before or after the options)")
    args = parse_command_line(parser, argv)
    output = probe_output(args.output)
    config = command_config(args.config, args.checkpoint, args.overrides)
    metrics = run(config, args.checkpoint)
    print(json.dumps(metrics, indent=2), flush=True)
    write_metrics(metrics, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
