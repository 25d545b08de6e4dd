"""Reading PyTorch weights without running pickled code: safetensors, pickles under `weights_only=True`, and
TorchScript archives (OpenAI's released CLIP files), plus the JSON files that travel with them."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert import ConvertError
from jaxretrieval.errors import require, weights_only_reason

INSTALL_EXTRA = "convert"  # pyproject's extra with torch and safetensors


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding serialised code; `torch.save` zips hold only data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConvertError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise ConvertError(f"{path}: expected a JSON object at the top level")
    return loaded


def to_numpy(state: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    import torch

    if isinstance(state.get("state_dict"), dict):  # a training checkpoint (open_clip's own `epoch_N.pt`)
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        # numpy has no bfloat16; float32 holds every fp16/bf16 value exactly.
        out[key.removeprefix("module.")] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def require_torch() -> Any:
    return require("torch", INSTALL_EXTRA, "reading PyTorch weights")


def load_pickle(path: Path) -> Any:
    """A `torch.save` file opened with `torch.load(weights_only=True)`: tensors and plain containers only (plus the
    argparse options unilm's training checkpoints keep beside the weights)."""
    torch = require_torch()
    with path.open("rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle stream
        raise ConvertError(f"cannot read {path}: not a PyTorch checkpoint, safetensors file or TorchScript archive")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"refusing to load {path}: torch.load(weights_only=True), the only way pickles are "
                           f"opened here, rejects it: {weights_only_reason(e)}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ConvertError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None


def load_tensors(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """(state dict as numpy arrays, how it was stored: safetensors | torchscript | pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist or is not a file")
    torch = require_torch()
    if path.suffix == ".safetensors":
        load_file = require("safetensors.torch", INSTALL_EXTRA, f"reading {path}").load_file
        try:
            return to_numpy(load_file(str(path)), path), "safetensors"
        except Exception as e:  # the safetensors reader raises its own error types
            raise ConvertError(f"cannot read {path} as safetensors: {e}") from None
    if is_torchscript(path):
        # The documented exception to weights_only (OpenAI's released CLIP files): torch.jit.load reads the
        # archive with TorchScript's own loader, not Python's pickle, and only state_dict() is used, no code run.
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ConvertError(f"cannot load TorchScript archive {path}: {e}") from None
        return to_numpy(dict(module.state_dict()), path), "torchscript"
    loaded = load_pickle(path)
    if not isinstance(loaded, dict):
        raise ConvertError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return to_numpy(loaded, path), "pickle"


def load_hf_weights(folder: Path) -> dict[str, np.ndarray]:
    """model.safetensors, sharded safetensors (model.safetensors.index.json) or pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return load_tensors(folder / "model.safetensors")[0]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            state.update(load_tensors(folder / shard)[0])
        return state
    if (folder / "pytorch_model.bin").is_file():
        return load_tensors(folder / "pytorch_model.bin")[0]
    raise ConvertError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    save_file = require("safetensors.numpy", INSTALL_EXTRA, "writing .safetensors files").save_file
    # The metadata `save_pretrained` writes; transformers 4.x refuses safetensors files without it.
    save_file({key: np.array(value, order="C") for key, value in state.items()}, str(path),
              metadata={"format": "pt"})


STATE_WRAPPERS = ("model", "module", "state_dict")  # unilm's / X-VLM's --model_key choices, first match wins


def load_wrapped_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict as numpy, the loaded dict) of a torch checkpoint holding a bare state dict or one under a key of
    STATE_WRAPPERS (read with weights_only=True); a missing file or a non-dict is a ConvertError naming it."""
    if not path.is_file():
        raise ConvertError(f"{path} does not exist or is not a file")
    loaded = load_pickle(path)
    if not isinstance(loaded, dict):
        raise ConvertError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    wrapper = next((key for key in STATE_WRAPPERS if isinstance(loaded.get(key), dict)), None)
    return to_numpy(loaded[wrapper] if wrapper else loaded, path), loaded if wrapper else {}


def under(state: dict[str, Any], base: str) -> dict[str, Any]:
    """The entries whose key starts with `base`, keyed without it."""
    return {key[len(base):]: value for key, value in state.items() if key.startswith(base)}


def count_indexed(state: dict[str, Any], pattern: str) -> int:
    """1 + the largest integer the regex `pattern` captures in a key (0 when none matches): a layer count."""
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def listed(keys: list[str]) -> str:
    """The first 20 keys, comma-separated, and how many there are in all when more."""
    more = f" ... ({len(keys)} in all)" if len(keys) > 20 else ""
    return ", ".join(keys[:20]) + more


def head_count(width: int, heads: int | None, what: str, flag: str = "--heads", head_dim: int = 64,
               where: str = "") -> int:
    """`heads` when given, else width / head_dim (the 64-wide heads of BERT-base, ViT-B and ViT-L); a ConvertError
    when that does not divide the width. `what` names the tower, `flag` the option that sets its heads."""
    prefix = f"{where}: " if where else ""
    if heads is None:
        if width % head_dim:
            raise ConvertError(f"{prefix}the {what} is {width} wide, no multiple of {head_dim}-wide heads: give its "
                               f"head count with {flag}")
        heads = width // head_dim
    if heads <= 0 or width % heads:
        raise ConvertError(f"{prefix}{flag} {heads} does not divide the {what}'s width {width}")
    return heads


def check_keys(state: dict[str, Any], needed: set[str], where: str, system: str,
               reason: Callable[[str], str | None]) -> Counter:
    """The keys of `state` beyond `needed`, counted by `reason(key)` (a skip's reason; "" passes the key silently,
    None makes it unexpected). Missing keys, then unexpected ones, are a ConvertError naming them."""
    missing = sorted(needed - state.keys())
    if missing:
        raise ConvertError(f"{where}: {len(missing)} required keys missing: {listed(missing)}")
    skipped: Counter = Counter()
    unexpected = []
    for key in sorted(state.keys() - needed):
        why = reason(key)
        if why is None:
            unexpected.append(key)
        elif why:
            skipped[why] += 1
    if unexpected:
        raise ConvertError(f"{where}: {len(unexpected)} unexpected keys (no place in system {system}): "
                           f"{listed(unexpected)}")
    return skipped


def head_pairs(ours: str, theirs: str, kind: str) -> list[tuple[str, str, bool]]:
    """(our path, their key, transposed) of a torch Linear ("linear": weight transposed to our kernel) or LayerNorm
    ("norm": weight to our scale) and its bias."""
    weight = (f"{ours}/kernel", f"{theirs}.weight", True) if kind == "linear" else (f"{ours}/scale",
                                                                                    f"{theirs}.weight", False)
    return [weight, (f"{ours}/bias", f"{theirs}.bias", False)]
