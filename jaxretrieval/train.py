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
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxretrieval import checkpoint, errors, tensorboard
from jaxretrieval.config import Config, load_config, save_config, to_dict
from jaxretrieval.data.transforms import normalise_pixels
from jaxretrieval.errors import OutputPathError, UserError, probe_folder
from jaxretrieval.gradients import contrastive_grad_fn
from jaxretrieval.models import abstract_model, init_params, layer_depth, parameter_roles, run_once
from jaxretrieval.optim import learning_rate, make_optimizer
from jaxretrieval.resume import Preempted, StopSignal, check_resume_config
from jaxretrieval.retrieval.metrics import metrics_table
from jaxretrieval.sharding import (
    batch_sharding,
    global_batch,
    initialize_distributed,
    make_mesh,
    replicated,
    tree_shardings,
    under_mesh,
)
from jaxretrieval.systems import get_system
from jaxretrieval.tasks import make_task

log = logging.getLogger("jaxretrieval.train")
# printed after an eval
SHOWN_METRICS = ("i2t", "t2i", "rsum", "R", "mAP", "mINP", "rerank_R", "rerank_mAP", "centroid_R1", "centroid_mAP")


class NonFiniteLoss(UserError, FloatingPointError):
    pass


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, seed: int = 0,
                    grad_fn: Callable | None = None, before_step: Callable | None = None,
                    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None):
    """(params, opt_state, batch, step) -> (params, opt_state, metrics); stochastic layers (drop path) draw from
    a key derived from the seed and the step, so a resumed run draws what an uninterrupted one would.

    grad_fn(params, batch, key) -> (loss, metrics, grads, state); state (new batch-norm statistics) replaces
    those leaves after the update. Default: the whole-batch contrastive loss (`gradients.contrastive_grad_fn`).
    `before_step(params) -> params` (a system's, e.g. clamping temperatures) runs first, its result updated.

    A batch may carry `stop` (per row: 1 where that row's process received a stop signal): its maximum over the
    global batch comes back as metrics["stop"], so every process reads the same decision. uint8 `image` pixels
    (data.normalise_on_device) are normalised here with `pixel_stats` (mean, std)."""
    grad_fn = grad_fn or contrastive_grad_fn(graphdef)

    def train_step(params, opt_state, batch, step):
        batch = dict(batch)
        stop = batch.pop("stop", None)
        if pixel_stats is not None and "image" in batch and batch["image"].dtype == jnp.uint8:
            batch["image"] = normalise_pixels(batch["image"], *pixel_stats)
        if before_step is not None:
            params = before_step(params)
        loss, metrics, grads, state = grad_fn(params, batch, jax.random.fold_in(jax.random.key(seed), step))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if state is not None:
            params = checkpoint.replace_leaves(params, state)
        if stop is not None:
            metrics = {**metrics, "stop": stop.max()}
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return train_step


def system_optimizer(config: Config) -> optax.GradientTransformation:
    """The optimiser of config.train for the system's model: its layer depths, parameter roles and lr factors."""
    system = get_system(config.system)
    return make_optimizer(config.train, layer_depth(config), parameter_roles(config), system.role_optimizers(config),
                          system.lr_scale(config))


class TrainingSetup(NamedTuple):
    graphdef: nnx.GraphDef
    params: Any  # abstract: ShapeDtypeStructs with the shardings the partition rules give
    opt_state: Any  # abstract, likewise
    fresh_params: Callable[[], Any]  # freshly initialised parameters, created in their shardings
    init_opt_state: Callable[[Any], Any]  # the optimiser state of given parameters
    step_fn: Callable  # the jitted train step


def prepare_training(config: Config, mesh: Mesh) -> TrainingSetup:
    """Everything the loop needs, nothing allocated: a resumed run restores straight into the abstract state and a
    run from train.init_from reads its parameters, neither paying for a random init. The step is traced under the
    mesh, so the towers' activation constraints apply."""
    cfg = config.train
    system = get_system(config.system)
    graphdef, abstract = abstract_model(config, precision=cfg.precision)
    param_shardings = tree_shardings(abstract, mesh, config.sharding)
    tx = system_optimizer(config)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_shardings = tree_shardings(abstract_opt, mesh, config.sharding)
    step = make_train_step(graphdef, tx, cfg.seed, grad_fn=system.grad_fn(config, graphdef, mesh),
                           before_step=system.before_step(config), pixel_stats=(config.data.mean, config.data.std))
    step_fn = jax.jit(under_mesh(step, mesh),
                      in_shardings=(param_shardings, opt_shardings, batch_sharding(mesh), replicated(mesh)),
                      out_shardings=(param_shardings, opt_shardings, replicated(mesh)),
                      donate_argnums=(0, 1))

    def placed(tree: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    return TrainingSetup(
        graphdef, placed(abstract, param_shardings), placed(abstract_opt, opt_shardings),
        lambda: init_params(config, seed=cfg.seed, precision=cfg.precision, shardings=param_shardings),
        partial(run_once, jax.jit(tx.init, out_shardings=opt_shardings)), step_fn)


def setup_training(config: Config, mesh: Mesh) -> tuple[nnx.GraphDef, dict, Any, Callable]:
    """(graphdef, fresh params, their optimizer state, jitted step): `prepare_training` with the state created."""
    setup = prepare_training(config, mesh)
    params = setup.fresh_params()
    return setup.graphdef, params, setup.init_opt_state(params), setup.step_fn


def data_position(saved: dict[str, Any], step: int) -> tuple[int, bool]:
    """(global batch the data loader starts at, whether to restore its saved iterator state) from a checkpoint's
    metadata. On the process count that wrote the checkpoint the iterator state is exact (skipped bad records
    included); on another the stream continues from the checkpoint's step."""
    data = saved.get("data", {})
    if data.get("processes") == jax.process_count():
        return data["start_step"], True
    log.info("checkpoint %d was written by %s processes, this run has %d: the data stream continues from its step",
             step, data.get("processes", "an unknown number of"), jax.process_count())
    return step, False


class Resumed(NamedTuple):
    step: int  # 0: a fresh start
    params: Any
    opt_state: Any
    data_start: int
    data_iterator: Any


def resume(ckpts: checkpoint.RunCheckpoints, loader: Callable[[int], Any], params: Any, opt_state: Any,
           accept_config: Callable[[int, dict], bool]) -> Resumed:
    """State from the newest checkpoint that verifies and restores. A damaged one (or an unsealed one that does not
    read back) is reported and set aside, or an error with checkpoint.on_corrupt=error. `accept_config(step, saved
    config)` raises for a config the run cannot resume with, and returns whether the data order is unchanged. No
    checkpoint: the fresh state and the start of the data stream."""
    for step in ckpts.steps():
        verdict = ckpts.verify(step)
        if verdict.status == "damaged":
            ckpts.reject(verdict)
            continue
        try:
            saved = checkpoint.read_meta(ckpts.mngr, step)
            same_order = accept_config(step, saved.get("config", {}))
            data_start, exact = data_position(saved, step) if same_order else (step, False)
            data_iterator = iter(loader(data_start))
            restored = checkpoint.restore(ckpts.mngr, step, params=params, opt_state=opt_state,
                                          data_iterator=data_iterator if exact else None, check=False)
        except checkpoint.CheckpointError as e:
            if verdict.status == "ok":  # its files are as written: a mismatch with this run, not damage
                raise
            ckpts.reject(verdict._replace(status="damaged", detail=str(e).split("; check it with")[0]))
            continue
        return Resumed(step, restored["params"], restored["opt_state"], data_start, data_iterator)
    return Resumed(0, params, opt_state, 0, iter(loader(0)))


class MetricsLog:
    """Appends one JSON object per line to DIR/metrics.jsonl (process 0 only), the source of truth, and the same
    scalars to `events` (TensorBoard event files in DIR/tensorboard/) when given."""

    def __init__(self, path: Path, enabled: bool, events: tensorboard.EventLog | None = None):
        self.path = path
        self.enabled = enabled
        self.events = events

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.events is not None:
                self.events.write(record)


def check_disk_space(workdir: Path, params: Any, opt_state: Any) -> None:
    """An error before training when the workdir's disk cannot hold one more checkpoint."""
    needed = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves((params, opt_state))
                 if hasattr(x, "shape"))
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise OutputPathError(f"workdir {workdir} has {free / 2**20:.0f} MiB free, a checkpoint needs about "
                              f"{needed / 2**20:.0f} MiB; free some space or choose another --workdir")


def use_compilation_cache(setting: str | bool, workdir: Path) -> Path | None:
    """Turns on XLA's persistent compilation cache where train.compilation_cache says (see TrainConfig); the folder
    used, or None."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    if setting in (False, "off", ""):
        return None
    auto = setting is True or setting == "auto"
    folder = workdir.absolute().parent / ".jax_cache" if auto else Path(str(setting)).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def train(config: Config, workdir: str | Path, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Trains to `config.train.steps`, resuming from DIR if it holds a checkpoint; returns the last eval. Raises
    Preempted after checkpointing the step reached when SIGTERM / SIGINT arrive (see StopSignal)."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    probe_folder(workdir, "workdir")
    cache = use_compilation_cache(config.train.compilation_cache, workdir)
    log.debug("compilation cache: %s", cache or "off")

    init_meta = checkpoint.read_meta_at(config.train.init_from) if config.train.init_from else {}
    task = make_task(config, init_meta)
    config, cfg = task.config, task.config.train
    ckpts = checkpoint.RunCheckpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints,
                                      on_corrupt=config.checkpoint.on_corrupt)
    mesh = make_mesh(config.mesh)
    setup = prepare_training(config, mesh)
    graphdef, step_fn = setup.graphdef, setup.step_fn
    check_disk_space(workdir, setup.params, setup.opt_state)

    def accept_config(step: int, saved: dict) -> bool:
        return check_resume_config(saved, config, workdir, step, allow_change=allow_config_change, is_main=is_main)

    state = resume(ckpts, task.loader, setup.params, setup.opt_state, accept_config)
    start, params, opt_state, data_iterator = state.step, state.params, state.opt_state, state.data_iterator
    if start:
        log.info("resumed from step %d of %s", start, workdir)
    else:
        if cfg.init_from:
            params = get_system(config.system).init_from(config, cfg.init_from, init_meta, setup.params,
                                                         setup.fresh_params)
            log.info("initialised from %s", cfg.init_from)
        else:
            params = setup.fresh_params()
        opt_state = setup.init_opt_state(params)
    if is_main and not (start and (workdir / "config.yaml").exists()):
        save_config(config, workdir / "config.yaml")
    meta = {"config": to_dict(config), **task.meta,
            "data": {"start_step": state.data_start, "processes": jax.process_count()}}

    lr_at = learning_rate(cfg)
    events = tensorboard.EventLog(workdir, resume_step=start, enabled=is_main and tensorboard.available())
    if is_main and not events.enabled:
        log.info("TensorBoard event files need the tensorboard package: pip install 'jaxretrieval[tensorboard]'")
    metrics_log = MetricsLog(workdir / "metrics.jsonl", is_main, events)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (is_main and cfg.progress_bar), unit="step",
               dynamic_ncols=True)

    window: list[dict[str, float]] = []
    window_start = time.perf_counter()

    def record(step: int, metrics: dict[str, jax.Array], origin: np.ndarray | None) -> bool:
        """Logs a step's metrics; True when a process asked to stop at or before it (the same on every process).
        `origin`: where this process's records of the step's batch came from, named if the loss is not finite."""
        nonlocal window_start
        values = {k: float(v) for k, v in metrics.items()}
        stop = values.pop("stop", 0.0) > 0
        if not math.isfinite(values["loss"]):
            records = task.describe(origin) if origin is not None else []
            shown = ", ".join(records[:8]) + (f" and {len(records) - 8} more" if len(records) > 8 else "")
            raise NonFiniteLoss(f"loss is {values['loss']} at step {step} (records: {shown or 'unknown'}); "
                                f"stopping (newest checkpoint: {ckpts.mngr.latest_step()}, intact)")
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
        return stop

    def evaluate(step: int) -> dict[str, Any]:
        """Runs after the step's checkpoint is committed: a failure loses no training, a rerun repeats only this."""
        try:
            result = {"step": step, **task.evaluate(graphdef, params, mesh)}
        except UserError as e:
            raise type(e)(f"evaluation at step {step} failed: {e}. The checkpoint of step {step} is saved: rerun "
                          f"the same command to repeat only the evaluation") from e
        if is_main:
            (workdir / "eval").mkdir(exist_ok=True)
            (workdir / "eval" / f"step_{step}.json").write_text(json.dumps(result, indent=2) + "\n")
            metrics_log.write({f"eval_{k}" if k != "step" else k: v for k, v in result.items()})
            bar.write(f"step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in result.items()
                                                  if k.startswith(SHOWN_METRICS)))
        return result

    def eval_due(step: int) -> bool:
        return bool(cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps

    last_eval: dict[str, Any] = {}
    if start and eval_due(start):  # the evaluation of the resumed step, unless it finished before the stop
        done = workdir / "eval" / f"step_{start}.json"
        last_eval = json.loads(done.read_text()) if done.exists() else evaluate(start)

    pending: tuple[int, dict[str, jax.Array], np.ndarray | None] | None = None
    stopping = False  # agreed on by every process: read from a step's (replicated) metrics
    # The bar closes however the loop ends, so an error line starts on a line of its own.
    with StopSignal() as stop_signal, bar, events:
        for step in range(start + 1, cfg.steps + 1):
            host_batch = next(data_iterator)
            origin = host_batch.pop("origin", None)  # stays on the host
            host_batch["stop"] = np.full(len(next(iter(host_batch.values()))), stop_signal.received is not None,
                                         np.int32)
            params, opt_state, metrics = step_fn(params, opt_state, global_batch(host_batch, mesh), np.int32(step))
            # Read the previous step's metrics only now, so the host never stalls the device queue.
            if pending is not None:
                stopping |= record(*pending)
            pending = (step, metrics, origin)
            save_now = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
            if save_now or eval_due(step) or stopping:
                stopping |= record(*pending)
                pending = None
            if save_now or stopping:
                ckpts.save(step, params=params, opt_state=opt_state, data_iterator=data_iterator,
                           meta={**meta, "step": step})
            if stopping:
                ckpts.close()
                raise Preempted(step, stop_signal.received, ckpts.directory / str(step))
            if eval_due(step):
                ckpts.seal_committed(wait=True)
                last_eval = evaluate(step)
            ckpts.seal_committed()
    ckpts.close()
    return last_eval


@errors.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--workdir", default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even if model sizes, tokenizer or data order changed since the checkpoint")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = errors.parse_command_line(parser, argv)
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    config = load_config(args.config, args.overrides)
    if initialize_distributed(config.distributed) and jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports progress
    try:
        result = train(config, workdir, allow_config_change=args.allow_config_change)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return errors.EXIT_PREEMPTED
    if jax.process_index() == 0:
        step = result.get("step", config.train.steps)
        print(metrics_table(result, f"step {step} ({config.eval.split} split)"))
        tensorboard_dir = " tensorboard/," if (Path(workdir) / tensorboard.FOLDER).is_dir() else ""
        print(f"outputs in {Path(workdir).absolute()}: config.yaml, metrics.jsonl,{tensorboard_dir} eval/ (these "
              f"metrics: eval/step_{step}.json), checkpoints/ (newest step "
              f"{checkpoint.step_folders(Path(workdir) / 'checkpoints')[-1]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
