"""Orbax checkpoints: params, optimizer state, the data iterator position, and the metadata (config and
tokenizer) that makes a step folder self-contained for `jaxretrieval.load` and `evaluate`.

Layout: DIR/checkpoints/<step>/{params, opt_state, data, meta}.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxretrieval.errors import CheckpointError
from jaxretrieval.sharding import path_name


def manager(directory: str | Path, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


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


def restore(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any | None = None,
            data_iterator: Any | None = None) -> dict[str, Any]:
    """Restores into the given abstract (or concrete) trees, whose shardings the restored arrays take."""
    where = str(Path(mngr.directory) / str(step))
    check_shapes(params, mngr.item_metadata(step)["params"], where)
    items = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(opt_state)
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return dict(mngr.restore(step, args=ocp.args.Composite(**items)).items())


def load_model(path: str | Path, params: Any, *, partial: bool = False) -> tuple[Any, dict]:
    """(params, meta) of the checkpoint at `path` (see `locate`), restored into the target `params` tree. With
    `partial` the checkpoint may hold a subset of the tree (a converted backbone): the rest keeps `params`'
    values; a key the model lacks is still an error."""
    folder, step = locate(path)
    mngr = manager(folder, read_only=True)
    if not partial:
        restored = restore(mngr, step, params=params)
        return restored["params"], restored["meta"]
    where = str(Path(mngr.directory) / str(step))
    saved = mngr.item_metadata(step)["params"]
    restored = restore(mngr, step, params=_subtree(params, getattr(saved, "tree", saved), where))
    return replace_leaves(params, restored["params"]), restored["meta"]


def _subtree(tree: Any, saved: Any, where: str, prefix: str = "") -> Any:
    """The part of `tree` whose keys `saved` (a checkpoint's nested metadata) holds."""
    if not isinstance(saved, Mapping):
        return tree
    ours = {str(key): key for key in tree} if isinstance(tree, Mapping) else {}  # metadata keys may be strings
    out = {}
    for key, value in saved.items():
        if str(key) not in ours:
            raise CheckpointError(f"{where}: unexpected parameter '{prefix}{key}' (the model has no such part)")
        out[ours[str(key)]] = _subtree(tree[ours[str(key)]], value, where, f"{prefix}{key}/")
    return out


def replace_leaves(tree: dict, new: Mapping) -> dict:
    """`tree` with the leaves that `new` (a nested dict over a subset of its keys) holds."""
    return {key: replace_leaves(value, new[key]) if isinstance(value, dict) and key in new else new.get(key, value)
            for key, value in tree.items()}


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def read_meta_at(path: str | Path) -> dict:
    """The metadata (config, tokenizer, step) of the checkpoint at `path` (see `locate`)."""
    folder, step = locate(path)
    return read_meta(manager(folder, read_only=True), step)


def locate(path: str | Path) -> tuple[Path, int]:
    """(checkpoints folder, step) for a step folder, a checkpoints folder or a training workdir."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.isdigit() and (path / "params").exists():
        return path.parent, int(path.name)
    for folder in (path / "checkpoints", path):
        steps = sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit() and (p / "params").exists())
        if steps:
            return folder, steps[-1]
    raise CheckpointError(f"no checkpoint found in {path} (expected a step folder, a checkpoints folder or a "
                          f"training workdir)")
