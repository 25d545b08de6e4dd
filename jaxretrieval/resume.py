"""What keeps a long run safe to stop and restart: stop signals that end the loop after a checkpoint, and the checks
of a config that changed between a run and its resume."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

from jaxretrieval.config import Config, from_dict, save_config, to_dict
from jaxretrieval.errors import ConfigError

log = logging.getLogger("jaxretrieval.train")

# Keys a resumed run cannot change: the parameter shapes (model sizes), the tokenizer, the optimizer state's form and
# the data order (records, batch, seed). Regexes over dotted keys; remat only trades memory for compute, scan_layers
# changes the layout of the same parameters (checkpoints load into either), attention the kernel.
DATA_ORDER = (r"data\.(kind|root|train_file|num_instances|demo_.*)$", r"train\.(batch_size|seed)$")
FROZEN_ON_RESUME = (r"model\.(?!.*remat$|scan_layers$|scan_unroll$|attention$)", r"data\.tokenizer$",
                    r"train\.optimizer$", *DATA_ORDER)


class Preempted(Exception):  # noqa: N818 -- not an error: the run stopped where it was asked to, checkpointed
    def __init__(self, step: int, signum: int | None, checkpoint: Path):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        cause = f"by {signal.Signals(signum).name}" if signum else "with the other processes (one received a signal)"
        super().__init__(f"stopped {cause} after step {step}; its checkpoint is {checkpoint}: rerun the same command "
                         f"to resume")


class StopSignal:
    """SIGTERM / SIGINT (preemption, SLURM time limits, Kubernetes, Ctrl-C): the first asks the loop to finish the step
    in flight, checkpoint it and stop; a second exits at once. Handlers are installed from the main thread only."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # the second signal: no more waiting
        self.received = signum
        log.warning("%s received: finishing the step in flight, then checkpointing and stopping (send it again to "
                    "exit at once)", signal.Signals(signum).name)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], config: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key the resumed run sets differently."""
    try:  # through the schema, so keys added since the run started count as their defaults
        saved = to_dict(from_dict(saved, "the checkpoint's config", notices=False))
    except ConfigError:
        pass
    old, new = _flatten(saved), _flatten(to_dict(config))
    keys = sorted(old.keys() | new.keys())
    return [(key, old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)]


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.match(pattern, key) for pattern in patterns)


def check_resume_config(saved: dict[str, Any], config: Config, workdir: Path, step: int, *,
                        allow_change: bool, is_main: bool) -> bool:
    """Lists a changed config key by key; keys that cannot change mid-run are an error unless `allow_change`. The
    earlier config.yaml is kept as config.step_N.yaml before the new one replaces it. Returns whether the data
    order is the checkpoint's (else the stream restarts from the step with the new order)."""
    changes = config_changes(saved, config)
    if not changes:
        return True
    frozen = [key for key, _, _ in changes if _matches(key, FROZEN_ON_RESUME)]
    listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    if frozen and not allow_change:
        raise ConfigError(f"{workdir} was trained to step {step} with another config, and {', '.join(frozen)} cannot "
                          f"change mid-run (changes: {listing}); use a new --workdir, or pass --allow-config-change")
    log.warning("resuming with a changed config: %s", listing)
    if is_main and (workdir / "config.yaml").exists():
        os.replace(workdir / "config.yaml", workdir / f"config.step_{step}.yaml")
        save_config(config, workdir / "config.yaml")
    return not any(_matches(key, DATA_ORDER) for key, _, _ in changes)
