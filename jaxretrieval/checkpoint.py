"""Orbax checkpoints: params, optimizer state, the data iterator position, and the metadata (config and
tokenizer) that makes a step folder self-contained for `jaxretrieval.load` and `evaluate`.

Layout: DIR/checkpoints/<step>/{params, opt_state, data, meta, integrity.json}. Every reader verifies the step's
integrity record (jaxretrieval.integrity) before orbax opens it, and turns any failure inside orbax into a
CheckpointError naming the step and path.

`python -m jaxretrieval.checkpoint verify DIR` checks every checkpoint of a workdir and prints a line each.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxretrieval import errors, integrity
from jaxretrieval.errors import CheckpointError
from jaxretrieval.integrity import Verdict
from jaxretrieval.models.stacking import needs_relayout, relayout
from jaxretrieval.sharding import path_name

log = logging.getLogger(__name__)
MODEL_ITEMS = ("params", "meta")  # what load_model and read_meta read


def manager(directory: str | Path, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    # A read-only manager announces itself with two absl warnings (read_only, save_interval_steps) every time: noise,
    # for `jaxretrieval.load` users too, who never configured logging.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(max(level, logging.ERROR) if read_only else level)
    try:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)
    finally:
        absl.setLevel(level)


def save(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any, data_iterator: Any,
         meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta),
    ))


def write_model(out: str | Path, params: Any, meta: dict, *, step: int = 0) -> Path:
    """A stand-alone model checkpoint (params + meta, no optimizer or data state) at OUT/checkpoints/<step>.

    Written into a temporary sibling folder and renamed into place, so a failure leaves no partial OUT.
    `meta` holds at least {"config": ..., "tokenizer": ...}; `jaxretrieval.load`, `evaluate` and
    `train.init_from` read such a folder.
    """
    out = Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new output folder")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        mngr = manager(staging / "checkpoints")
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                meta=ocp.args.JsonSave({**meta, "step": step})))
        mngr.wait_until_finished()
        mngr.close()
        integrity.seal(staging / "checkpoints" / str(step))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_shapes(expected: Any, found: Any, where: str) -> None:
    """Compares abstract params with a checkpoint's array metadata, naming the first mismatching key."""
    want = {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(found)[0]}
    for key in sorted(want.keys() - have.keys()):
        raise CheckpointError(f"{where}: parameter '{key}' is missing (expected shape {want[key]})")
    for key in sorted(have.keys() - want.keys()):
        raise CheckpointError(f"{where}: unexpected parameter '{key}' of shape {have[key]}")
    for key in sorted(want):
        if want[key] != have[key]:
            raise CheckpointError(f"{where}: parameter '{key}' has shape {have[key]}, the model expects "
                                  f"{want[key]} (a checkpoint of another model size?)")


def _silence_abandoned_reads() -> None:
    """After a failed read orbax leaves its other array reads' coroutines to fail at garbage collection, each printing
    a traceback ("Exception ignored in: <coroutine ...>"); the CheckpointError already says what happened."""
    if errors.debug_enabled() or getattr(sys.unraisablehook, "quiet_orbax", False):
        return
    original = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not repr(unraisable.object).startswith("<coroutine object _read_array"):
            original(unraisable)

    hook.quiet_orbax = True
    sys.unraisablehook = hook


def reading(where: str, read: Callable[[], Any]) -> Any:
    """Runs an orbax read; whatever fails inside orbax / tensorstore / json becomes a CheckpointError naming `where`."""
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure deep inside the readers means the same thing here
        _silence_abandoned_reads()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". See full")[0][:300]
        raise CheckpointError(f"checkpoint {where} cannot be read, it is damaged or incomplete ({type(e).__name__}: "
                              f"{first}); check it with `python -m jaxretrieval.checkpoint verify {where}`") from e


def verified(folder: Path, step: int, items: Iterable[str] | None = None) -> Verdict:
    """The step's verdict; a damaged step is a CheckpointError naming what is wrong and the intact alternatives."""
    verdict = integrity.verify(Path(folder) / str(step), step, items)
    if verdict.status == "damaged":
        others = [s for s in intact_steps(folder) if s != step]
        hint = f"; intact: step {others[-1]} ({Path(folder) / str(others[-1])})" if others else ""
        raise CheckpointError(f"checkpoint step {step} at {verdict.path} is damaged: {verdict.detail}{hint}")
    return verdict


def restore(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any | None = None,
            data_iterator: Any | None = None, check: bool = True) -> dict[str, Any]:
    """Restores into the given abstract (or concrete) trees, whose shardings the restored arrays take. `check=False`
    when the caller has just verified the step (hashing a large checkpoint twice is real time)."""
    folder = Path(mngr.directory)
    where = str(folder / str(step))
    if check:
        verified(folder, step, None if opt_state is not None or data_iterator is not None else MODEL_ITEMS)
    saved = reading(where, lambda: mngr.item_metadata(step))
    targets = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    # A checkpoint whose layers are laid out otherwise (stacked or one per layer, models/stacking.py) is read in
    # its own layout and moved into the model's.
    targets = {name: in_saved_layout(target, _tree(saved[name]), where) for name, target in targets.items()}
    check_shapes(targets["params"][0], _tree(saved["params"]), where)
    items = {name: ocp.args.StandardRestore(target) for name, (target, _) in targets.items()}
    items["meta"] = ocp.args.JsonRestore()
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = dict(reading(where, lambda: mngr.restore(step, args=ocp.args.Composite(**items))).items())
    return {**restored, **{name: back(restored[name]) for name, (_, back) in targets.items()}}


def _tree(metadata: Any) -> Any:
    return getattr(metadata, "tree", metadata)


def in_saved_layout(target: Any, saved: Any, where: str) -> tuple[Any, Callable[[Any], Any]]:
    """(`target` as abstract arrays in the layout of the checkpoint's tree `saved`, a function moving what is read
    into `target`'s layout and shardings); the identity where the layouts agree."""
    if not needs_relayout(saved, target):
        return target, lambda restored: restored
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                            target)
    try:
        in_saved = relayout(abstract, saved, take=_abstract_layer, stack=_abstract_stack)
    except KeyError as e:
        raise CheckpointError(f"{where}: the checkpoint does not fit the model: {e.args[0]}") from None

    def back(restored: Any) -> Any:
        moved = relayout(restored, abstract)
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding) if a.sharding is not None else x, moved,
                            abstract)

    return in_saved, back


def _abstract_layer(stacked: jax.ShapeDtypeStruct, _: int) -> jax.ShapeDtypeStruct:
    sharding = stacked.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=sharding)


def _abstract_stack(layers: list[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
    first = layers[0]
    sharding = first.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(layers), *first.shape), first.dtype, sharding=sharding)


def load_model(path: str | Path, params: Any, *, partial: bool = False,
               ignore: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """(params, meta) of the checkpoint at `path` (see `locate`), restored into the target `params` tree. With
    `partial` the checkpoint may hold a subset of the tree (a converted backbone): the rest keeps `params`'
    values; a key the model lacks is still an error, except the top-level keys in `ignore` (read, then dropped:
    e.g. a CLIP checkpoint's logit scale for a model that has none)."""
    folder, step = locate(path)
    mngr = manager(folder, read_only=True)
    if not partial:
        restored = restore(mngr, step, params=params)
        return restored["params"], restored["meta"]
    where = str(Path(mngr.directory) / str(step))
    verified(folder, step, MODEL_ITEMS)
    saved = reading(where, lambda: mngr.item_metadata(step)["params"])
    saved = getattr(saved, "tree", saved)
    target = _subtree(params, {k: v for k, v in saved.items() if str(k) not in ignore}, where)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target.update({k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=one_device) for k, v in saved.items()
                   if str(k) in ignore and not isinstance(v, Mapping)})
    restored = restore(mngr, step, params=target, check=False)
    kept = {k: v for k, v in restored["params"].items() if str(k) not in ignore}
    return replace_leaves(params, kept), restored["meta"]


def saved_parts(path: str | Path) -> set[str]:
    """The top-level parameter keys of the checkpoint at `path` (see `locate`), read from its metadata."""
    folder, step = locate(path)
    mngr = manager(folder, read_only=True)
    saved = reading(str(Path(mngr.directory) / str(step)), lambda: mngr.item_metadata(step)["params"])
    return {str(key) for key in getattr(saved, "tree", saved)}


def _subtree(tree: Any, saved: Any, where: str, prefix: str = "") -> Any:
    """The part of `tree` whose keys `saved` (a checkpoint's nested metadata) holds."""
    if not isinstance(saved, Mapping):
        return tree
    if isinstance(tree, Mapping) and _per_layer(saved) != _per_layer(tree):
        return tree  # layers stacked on one side, one per layer on the other: restore relays the whole stack out
    ours = {str(key): key for key in tree} if isinstance(tree, Mapping) else {}  # metadata keys may be strings
    out = {}
    for key, value in saved.items():
        if str(key) not in ours:
            raise CheckpointError(f"{where}: unexpected parameter '{prefix}{key}' (the model has no such part)")
        out[ours[str(key)]] = _subtree(tree[ours[str(key)]], value, where, f"{prefix}{key}/")
    return out


def _per_layer(node: Mapping) -> bool:
    return bool(node) and all(str(key).isdigit() for key in node)


def replace_leaves(tree: dict, new: Mapping) -> dict:
    """`tree` with the leaves that `new` (a nested dict over a subset of its keys) holds."""
    return {key: replace_leaves(value, new[key]) if isinstance(value, dict) and key in new else new.get(key, value)
            for key, value in tree.items()}


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    where = str(Path(mngr.directory) / str(step))
    meta = reading(where, lambda: mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {where}: its meta item is not a JSON object")
    return meta


def read_meta_at(path: str | Path) -> dict:
    """The metadata (config, tokenizer, step) of the checkpoint at `path` (see `locate`), its files verified first
    (the params are verified by whatever reads them)."""
    folder, step = locate(path)
    verified(folder, step, ("meta",))
    return read_meta(manager(folder, read_only=True), step)


def read_all(mngr: ocp.CheckpointManager, step: int) -> None:
    """Reads every array and JSON item of a step (as saved, on this host), raising CheckpointError if one fails."""
    where = str(Path(mngr.directory) / str(step))
    present = [name for name in ("params", "opt_state") if (Path(where) / name).is_dir()]
    items = {name: ocp.args.StandardRestore() for name in present}
    reading(where, lambda: mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)))


def step_folders(folder: Path) -> list[int]:
    """The committed steps of a checkpoints folder, oldest first (orbax writes a step under a temporary name and
    renames it when complete, so a cut-off write never has a step's name)."""
    return sorted(int(p.name) for p in Path(folder).glob("*") if p.name.isdigit() and (p / "params").is_dir())


def intact_steps(folder: Path) -> list[int]:
    return [step for step in step_folders(folder)
            if integrity.verify(Path(folder) / str(step), step, MODEL_ITEMS).status != "damaged"]


def locate(path: str | Path) -> tuple[Path, int]:
    """(checkpoints folder, step) for a step folder, a checkpoints folder or a training workdir."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.isdigit() and (path / "params").exists():
        return path.parent, int(path.name)
    for folder in (path / "checkpoints", path):
        steps = step_folders(folder)
        if steps:
            return folder, steps[-1]
    raise CheckpointError(f"no checkpoint found in {path} (expected a step folder, a checkpoints folder or a "
                          f"training workdir)")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RunCheckpoints:
    """A training run's checkpoints folder: saves sealed with an integrity record once committed, and the steps a
    resume may start from, damaged ones reported and set aside (or an error with on_corrupt=error)."""

    def __init__(self, directory: str | Path, *, keep: int | None, on_corrupt: str = "fallback"):
        self.directory = Path(directory).absolute()
        self.on_corrupt = on_corrupt
        self.keep = keep
        self.mngr = manager(self.directory, keep=keep)
        self._unsealed: list[int] = []

    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        return sorted(self.mngr.all_steps(), reverse=True)

    def verify(self, step: int) -> Verdict:
        return integrity.verify(self.directory / str(step), step)

    def reject(self, verdict: Verdict) -> None:
        """A damaged step: an error (on_corrupt=error), else a warning and the step moved to checkpoints_damaged/."""
        if self.on_corrupt == "error":
            raise CheckpointError(f"checkpoint step {verdict.step} at {verdict.path} is damaged: {verdict.detail}; "
                                  f"checkpoint.on_corrupt=error: stopping (move it away, or set "
                                  f"checkpoint.on_corrupt=fallback to resume from the newest intact checkpoint)")
        aside = self.directory.with_name(f"{self.directory.name}_damaged") / f"{verdict.step}-{int(time.time())}"
        log.warning("checkpoint step %d at %s is damaged (%s): moved to %s; resuming from the newest intact one",
                    verdict.step, verdict.path, verdict.detail, aside)
        _sync(f"reject_{verdict.step}")
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(verdict.path), aside)
        _sync(f"rejected_{verdict.step}")
        self.mngr = manager(self.directory, keep=self.keep)

    def save(self, step: int, **items: Any) -> None:
        self.seal_committed(wait=True)  # orbax finishes the previous save before it starts another
        where = self.directory / str(step)
        try:
            save(self.mngr, step, **items)
        except Exception as e:  # noqa: BLE001 -- disk full, permissions: the earlier checkpoints stay as they are
            raise CheckpointError(f"writing checkpoint step {step} to {where} failed ({type(e).__name__}: {e}); "
                                  f"the earlier checkpoints are intact") from e
        self._unsealed.append(step)

    def seal_committed(self, wait: bool = False) -> None:
        """Seals the saved steps once orbax has committed them (`wait`: block until it has)."""
        if not self._unsealed:
            return
        if wait:
            try:
                self.mngr.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"writing checkpoint step {self._unsealed[-1]} to {self.directory} failed "
                                      f"({type(e).__name__}: {e}); the earlier checkpoints are intact") from e
        elif self.mngr.is_saving_in_progress():
            return
        if jax.process_index() == 0:
            for step in self._unsealed:
                if (self.directory / str(step)).is_dir():
                    integrity.seal(self.directory / str(step))
        self._unsealed.clear()

    def close(self) -> None:
        self.seal_committed(wait=True)
        self.mngr.close()


def verify_folder(path: str | Path) -> list[Verdict]:
    """The verdict of every checkpoint in a workdir, checkpoints folder or step folder, oldest first."""
    path = Path(path).expanduser().absolute()
    if path.name.isdigit() and (path / "params").is_dir():
        return [integrity.verify(path, int(path.name))]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = step_folders(folder)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path} (expected a step folder, a checkpoints folder or a "
                              f"training workdir)")
    verdicts = []
    for step in steps:
        verdict = integrity.verify(folder / str(step), step)
        if verdict.status == "unsealed":  # nothing to compare: at least every item must read back
            try:
                read_all(manager(folder, read_only=True), step)
            except CheckpointError as e:
                verdict = verdict._replace(status="damaged", detail=str(e).split("; check it with")[0])
        verdicts.append(verdict)
    return verdicts


@errors.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.checkpoint",
                                     description="Checks checkpoints against their integrity records.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify_cmd = errors.add_verbose(commands.add_parser("verify", help="verify every checkpoint of DIR"))
    verify_cmd.add_argument("dir", help="a training workdir, a checkpoints folder or a step folder")
    args = errors.parse_command_line(parser, argv)
    verdicts = verify_folder(args.dir)
    for verdict in verdicts:
        print(verdict.line())
    damaged = sum(v.status == "damaged" for v in verdicts)
    print(f"{len(verdicts)} checkpoints: {len(verdicts) - damaged} readable, {damaged} damaged", file=sys.stderr)
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
