"""`python -m jaxretrieval.train --config FILE [--workdir DIR] [key.path=value ...]`

One loop for every system: data -> jitted, sharded train step -> metrics, evaluation, checkpoints.
Writes DIR/metrics.jsonl, DIR/eval/step_N.json and DIR/checkpoints/, and resumes from the newest
checkpoint in DIR (parameters, optimizer state and data position).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxretrieval import checkpoint
from jaxretrieval.config import Config, ConfigError, load_config, save_config, to_dict
from jaxretrieval.data.sources import DataError
from jaxretrieval.gradients import make_ctl_grad_fn, make_grad_fn
from jaxretrieval.losses import training_loss
from jaxretrieval.losses.distributed import LossFn
from jaxretrieval.losses.metric import CTLLossConfig
from jaxretrieval.models import abstract_model, init_params, layer_depth, parameter_roles
from jaxretrieval.optim import learning_rate, make_optimizer
from jaxretrieval.sharding import (
    batch_sharding,
    global_batch,
    initialize_distributed,
    make_mesh,
    replicated,
    tree_shardings,
    under_mesh,
)
from jaxretrieval.tasks import make_task

log = logging.getLogger("jaxretrieval.train")
SHOWN_METRICS = ("i2t", "t2i", "rsum", "R", "mAP", "mINP", "centroid_R1", "centroid_mAP")  # printed after an eval


class NonFiniteLoss(FloatingPointError):
    pass


def contrastive_grad_fn(graphdef: nnx.GraphDef, micro_batches: int = 1, accumulation: str = "cache",
                        loss_fn: LossFn | None = None) -> Callable:
    """make_grad_fn in the train step's form: (loss, metrics, grads, no state)."""
    grad_fn = make_grad_fn(graphdef, micro_batches, accumulation, loss_fn)

    def fn(params, batch, key):
        loss, scalars, grads = grad_fn(params, batch, key)
        names = ("logit_scale", "logit_bias")[:len(scalars)]
        return loss, dict(zip(names, scalars, strict=True)), grads, None

    return fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, seed: int = 0,
                    grad_fn: Callable | None = None):
    """(params, opt_state, batch, step) -> (params, opt_state, metrics); stochastic layers (drop path) draw from
    a key derived from the seed and the step, so a resumed run draws what an uninterrupted one would.

    grad_fn(params, batch, key) -> (loss, metrics, grads, state); state (new batch-norm statistics) replaces
    those leaves after the update. Default: the whole-batch contrastive loss (`contrastive_grad_fn`)."""
    grad_fn = grad_fn or contrastive_grad_fn(graphdef)

    def train_step(params, opt_state, batch, step):
        loss, metrics, grads, state = grad_fn(params, batch, jax.random.fold_in(jax.random.key(seed), step))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if state is not None:
            params = checkpoint.replace_leaves(params, state)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return train_step


def setup_training(config: Config, mesh: Mesh) -> tuple[nnx.GraphDef, dict, Any, Callable]:
    """(graphdef, params, optimizer state, jitted step): fresh state placed by the partition rules; the step is
    traced under the mesh, so the towers' activation constraints apply."""
    cfg = config.train
    graphdef, abstract_params = abstract_model(config.model, precision=cfg.precision)
    param_shardings = tree_shardings(abstract_params, mesh, config.sharding)
    tx = make_optimizer(cfg, layer_depth(config.model), parameter_roles(config.model))
    opt_shardings = tree_shardings(jax.eval_shape(tx.init, abstract_params), mesh, config.sharding)
    params = init_params(config.model, seed=cfg.seed, precision=cfg.precision, shardings=param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    if cfg.loss == "ctl":
        grad_fn = make_ctl_grad_fn(graphdef, CTLLossConfig(
            num_instances=config.data.num_instances, margin=cfg.triplet_margin, label_smoothing=cfg.label_smoothing,
            center_weight=cfg.center_loss_weight))
    else:
        grad_fn = contrastive_grad_fn(graphdef, cfg.micro_batches, cfg.accumulation,
                                      training_loss(cfg.loss, cfg.loss_variant, mesh))
    step = make_train_step(graphdef, tx, cfg.seed, grad_fn=grad_fn)
    step_fn = jax.jit(under_mesh(step, mesh),
                      in_shardings=(param_shardings, opt_shardings, batch_sharding(mesh), replicated(mesh)),
                      out_shardings=(param_shardings, opt_shardings, replicated(mesh)),
                      donate_argnums=(0, 1))
    return graphdef, params, opt_state, step_fn


def data_position(mngr: Any, step: int) -> tuple[int, bool]:
    """(global batch the data loader starts at, whether to restore its saved iterator state). On the process
    count that wrote the checkpoint the iterator state is exact (skipped bad records included); on another the
    stream continues from the checkpoint's step."""
    if not step:
        return 0, False
    saved = checkpoint.read_meta(mngr, step).get("data", {})
    if saved.get("processes") == jax.process_count():
        return saved["start_step"], True
    log.info("checkpoint %d was written by %s processes, this run has %d: the data stream continues from its step",
             step, saved.get("processes", "an unknown number of"), jax.process_count())
    return step, False


class MetricsLog:
    """Appends one JSON object per line to DIR/metrics.jsonl (process 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: Config, workdir: str | Path) -> dict[str, Any]:
    """Trains to `config.train.steps`, resuming from DIR if it holds a checkpoint; returns the last eval."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)

    init_meta = checkpoint.read_meta_at(config.train.init_from) if config.train.init_from else {}
    task = make_task(config, init_meta)
    config, cfg = task.config, task.config.train

    if is_main:
        save_config(config, workdir / "config.yaml")
    mesh = make_mesh(config.mesh)
    graphdef, params, opt_state, step_fn = setup_training(config, mesh)

    mngr = checkpoint.manager(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    start = mngr.latest_step() or 0
    data_start, same_processes = data_position(mngr, start)
    data_iterator = iter(task.loader(data_start))
    if start:
        restored = checkpoint.restore(mngr, start, params=params, opt_state=opt_state,
                                      data_iterator=data_iterator if same_processes else None)
        params, opt_state = restored["params"], restored["opt_state"]
        log.info("resumed from %s at step %d", mngr.directory, start)
    elif cfg.init_from:
        partial = bool(init_meta.get("partial"))
        params, _ = checkpoint.load_model(cfg.init_from, params, partial=partial)
        log.info("initialised %s from %s", "the parts it holds" if partial else "every parameter", cfg.init_from)
    meta = {"config": to_dict(config), **task.meta,
            "data": {"start_step": data_start, "processes": jax.process_count()}}

    lr_at = learning_rate(cfg)
    metrics_log = MetricsLog(workdir / "metrics.jsonl", is_main)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (is_main and cfg.progress_bar), unit="step",
               dynamic_ncols=True)

    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    last_eval: dict[str, Any] = {}

    def record(step: int, metrics: dict[str, jax.Array]) -> None:
        nonlocal window_start
        values = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(f"loss is {values['loss']} at step {step}; stopping (newest checkpoint: "
                                f"{mngr.latest_step()})")
        window.append(values)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            throughput = len(window) * cfg.batch_size / elapsed
            bar.set_postfix(loss=f"{mean['loss']:.4f}", samples_s=f"{throughput:.0f}")
            metrics_log.write({"step": step, **mean, "lr": float(lr_at(step - 1)), "samples_per_s": throughput})
            window.clear()
            window_start = time.perf_counter()

    pending: tuple[int, dict[str, jax.Array]] | None = None
    for step in range(start + 1, cfg.steps + 1):
        batch = global_batch(next(data_iterator), mesh)
        params, opt_state, metrics = step_fn(params, opt_state, batch, np.int32(step))
        # Read the previous step's metrics only now, so the host never stalls the device queue.
        if pending is not None:
            record(*pending)
        pending = (step, metrics)
        save_now = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
        eval_now = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        if save_now or eval_now:
            record(*pending)
            pending = None
        if eval_now:
            last_eval = {"step": step, **task.evaluate(graphdef, params, mesh)}
            if is_main:
                (workdir / "eval").mkdir(exist_ok=True)
                (workdir / "eval" / f"step_{step}.json").write_text(json.dumps(last_eval, indent=2) + "\n")
                metrics_log.write({f"eval_{k}" if k != "step" else k: v for k, v in last_eval.items()})
                bar.write(f"step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in last_eval.items()
                                                      if k.startswith(SHOWN_METRICS)))
        if save_now:
            checkpoint.save(mngr, step, params=params, opt_state=opt_state, data_iterator=data_iterator,
                            meta={**meta, "step": step})
    mngr.wait_until_finished()
    bar.close()
    return last_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--workdir", default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    try:
        config = load_config(args.config, args.overrides)
        if initialize_distributed(config.distributed) and jax.process_index() != 0:
            logging.getLogger().setLevel(logging.WARNING)  # one process reports progress
        result = train(config, workdir)
    except (ConfigError, DataError, checkpoint.CheckpointError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
