"""The registry of systems: name -> the module that defines it, imported on first use.

A system is one file here: a `System` subclass (see `base.py`) that owns its config section, model, loss, data
fields, evaluation and converters, registered with `register`. `python -m jaxretrieval.systems` lists them.
"""

from __future__ import annotations

import difflib
import importlib

from jaxretrieval.errors import ConfigError
from jaxretrieval.systems.base import System

# name -> module; the module calls `register` for the name when imported.
SYSTEMS: dict[str, str] = {
    "clip": "jaxretrieval.systems.clip",
    "beit3": "jaxretrieval.systems.beit3_lhp",
    "ctl": "jaxretrieval.systems.ctl",
    "cusa": "jaxretrieval.systems.cusa",
    "cfack": "jaxretrieval.systems.cfack",
    "uit": "jaxretrieval.systems.uit",
    "blip2": "jaxretrieval.systems.blip2",
    "vse_infty": "jaxretrieval.systems.vse",
    "aahr": "jaxretrieval.systems.aahr",
}
_REGISTERED: dict[str, System] = {}


def register(system: System, module: str | None = None) -> System:
    """Adds `system` under its name (a module of its own outside the table passes `module`, or nothing for a system
    defined in a test or notebook). A name registered twice is an error."""
    if system.name in _REGISTERED:
        raise ValueError(f"a system named {system.name!r} is already registered ({type(_REGISTERED[system.name])})")
    _REGISTERED[system.name] = system
    SYSTEMS.setdefault(system.name, module or type(system).__module__)
    return system


def unregister(name: str) -> None:
    """Removes a system added with `register` (tests that register a toy system clean up with this)."""
    _REGISTERED.pop(name, None)
    SYSTEMS.pop(name, None)


def get_system(name: str) -> System:
    """The system registered as `name`, importing its module on first use; an unknown name is a ConfigError."""
    if name not in _REGISTERED:
        if name not in SYSTEMS:
            close = difflib.get_close_matches(str(name), list(SYSTEMS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown system '{name}'{hint} (systems: {', '.join(SYSTEMS)})")
        importlib.import_module(SYSTEMS[name])
        if name not in _REGISTERED:
            raise ImportError(f"module {SYSTEMS[name]} did not register a system named {name!r}")
    return _REGISTERED[name]


def main() -> int:
    for name in SYSTEMS:
        system = get_system(name)
        print(f"{name:8s} {system.summary}")
        print(f"{'':8s} model.family {'/'.join(system.families)}; train.loss {'/'.join(system.losses)}; "
              f"eval.protocol {'/'.join(system.protocols)}; data.kind {'/'.join(system.data_kinds)}"
              + (f"; convert {'/'.join(system.converters)}" if system.converters else ""))
    return 0


