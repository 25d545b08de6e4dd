"""One full CLIP train step, jaxretrieval against open_clip (PyTorch), same model, batch and machine.

`python benchmarks/train_step.py --model vit_b32 --batch 16 --steps 10 --warmup 3 [--precision fp32|bf16]
[--threads N] [--rounds R] [--json FILE]`

A step is: forward through both towers, symmetric InfoNCE, backward, global-norm gradient clipping and an
AdamW update. The jax side is jaxretrieval's own `make_train_step`, jitted with a one-device mesh and the
trainer's shardings; the torch side is open_clip's model and `ClipLoss` with `torch.optim.AdamW` and
`clip_grad_norm_`, using the same hyper-parameters and the same weight-decay mask (matrices only). Both get
the same random batch. Time per step is the median of --steps synchronised steps after --warmup steps (the
first warmup step, which includes jax's compilation, is reported separately). Each framework runs in a fresh
child process pinned to --threads cores; --rounds alternates them and reports the median round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

OPEN_CLIP_NAMES = {"vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "vit_l14": "ViT-L-14", "vit_l14_336": "ViT-L-14-336"}


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float]:
    """(first step seconds, median step seconds after warmup); `step` must block until it is done."""
    times = []
    for _ in range(max(warmup, 1) + steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[max(warmup, 1):])


def random_batch(model_config: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalised-looking NHWC images, token rows with EOT (the largest id) at a random position, unique groups."""
    rng = np.random.default_rng(seed)
    size, text = model_config.image.image_size, model_config.text
    tokens = rng.integers(1, text.vocab_size - 1, (batch, text.context_length), dtype=np.int32)
    tokens[np.arange(batch), rng.integers(1, text.context_length, batch)] = text.vocab_size - 1
    return {"image": rng.standard_normal((batch, size, size, 3), dtype=np.float32), "text": tokens,
            "group": np.arange(batch, dtype=np.int32)}


def bench_jax(config: Any, host_batch: dict[str, np.ndarray], warmup: int, steps: int) -> dict[str, Any]:
    import jax

    from jaxretrieval.sharding import batch_sharding, make_mesh
    from jaxretrieval.train import setup_training

    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    _, params, opt_state, step_fn = setup_training(config, mesh)
    batch = jax.device_put(host_batch, batch_sharding(mesh))
    state = {"params": params, "opt_state": opt_state}
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    def step() -> None:
        state["params"], state["opt_state"], metrics = step_fn(state["params"], state["opt_state"], batch)
        jax.block_until_ready((state["params"], metrics))

    first, median = time_steps(step, warmup, steps)
    return {"framework": "jaxretrieval", "device": jax.devices()[0].device_kind, "params": n_params,
            "first_step_s": first, "step_s": median}


def open_clip_model(model_config: Any) -> Any:
    """open_clip's model of the same shape: its registered config for named presets, a custom one for tiny."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    quick_gelu = model_config.activation == "quick_gelu"
    if model_config.name in OPEN_CLIP_NAMES:
        return open_clip.create_model(OPEN_CLIP_NAMES[model_config.name], pretrained=None,
                                      force_quick_gelu=quick_gelu)
    image, text = model_config.image, model_config.text
    vision_cfg = CLIPVisionCfg(image_size=image.image_size, patch_size=image.patch_size, width=image.width,
                               layers=image.layers, head_width=image.width // image.heads,
                               mlp_ratio=image.mlp_ratio)
    text_cfg = CLIPTextCfg(context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
                           heads=text.heads, layers=text.layers, mlp_ratio=text.mlp_ratio)
    return CLIP(model_config.embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu,
                init_logit_scale=model_config.init_logit_scale)


def bench_torch(config: Any, host_batch: dict[str, np.ndarray], warmup: int, steps: int) -> dict[str, Any]:
    import open_clip
    import torch

    cfg = config.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = open_clip_model(config.model).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    loss_fn = open_clip.loss.ClipLoss()
    images = torch.from_numpy(host_batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    tokens = torch.from_numpy(host_batch["text"]).long().to(device)
    max_scale = config.model.max_logit_scale

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            image_features, text_features, scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():  # open_clip's training loop clamps the scale after each step
            model.logit_scale.clamp_(0, max_scale)
        loss.item()  # waits for the step on any device
        if device.type == "cuda":
            torch.cuda.synchronize()

    first, median = time_steps(step, warmup, steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"framework": "open_clip", "device": name, "params": sum(p.numel() for p in params),
            "first_step_s": first, "step_s": median}


def environment(threads: int) -> dict[str, Any]:
    """Host, thread count and package versions, read without starting jax or torch (the children do that)."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    packages = ["jax", "jaxlib", "flax", "optax", "torch", "open_clip_torch"]
    return {"date": date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), **{name: version(name) for name in packages}}


def run_isolated(name: str, argv: list[str]) -> dict[str, Any]:
    """Runs one framework in a fresh process, so neither's thread pools or allocator touch the other's run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        subprocess.run([sys.executable, __file__, *argv, "--frameworks", name, "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"][0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b32", help="jaxretrieval preset (tiny, vit_b32, vit_b16, ...)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1: compilation)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores for XLA and torch (default: all)")
    parser.add_argument("--frameworks", default="jax,torch",
                        help="comma-separated subset of jax,torch; with both, each runs in its own process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with both frameworks: alternate fresh jax and torch processes this many times and "
                             "report the median round (evens out a host whose load drifts)")
    parser.add_argument("--json", default=None, help="also write the rows and environment to this file")
    args = parser.parse_args(argv)

    frameworks = args.frameworks.split(",")
    if not frameworks or set(frameworks) - {"jax", "torch"}:
        parser.error(f"--frameworks takes jax, torch or both, not {args.frameworks!r}")
    cores = sorted(os.sched_getaffinity(0))
    threads = min(args.threads or len(cores), len(cores))
    env = environment(threads)
    if len(frameworks) > 1:
        print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
        runs = [run_isolated(name, argv) for _ in range(args.rounds) for name in frameworks]
        rows = []
        for i in range(len(frameworks)):
            mine = runs[i::len(frameworks)]  # runs are round-major
            median = sorted(mine, key=lambda r: r["step_s"])[(len(mine) - 1) // 2]
            rows.append({**median, "round_step_s": [r["step_s"] for r in mine]})
    else:
        # Pinned before jax or torch start their thread pools: XLA's CPU client sizes its pool by the
        # schedulable cores, and torch is told the same number, so both use the same cores.
        os.sched_setaffinity(0, cores[:threads])
        import torch

        torch.set_num_threads(threads)
        from jaxretrieval.config import load_config

        config = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}",
                                    f"train.precision={args.precision}"])
        bench = {"jax": bench_jax, "torch": bench_torch}[frameworks[0]]
        result = bench(config, random_batch(config.model, args.batch), args.warmup, args.steps)
        rows = [{"model": args.model, "batch": args.batch, "precision": args.precision, "threads": threads,
                 **result, "samples_s": args.batch / result["step_s"]}]

    header = ["model", "batch", "framework", "device", "precision", "params", "first step (s)",
              "step (ms, median)", "samples/s", "jax/torch"]
    speed = {row["framework"]: row["samples_s"] for row in rows}
    ratio = f"{speed['jaxretrieval'] / speed['open_clip']:.2f}x" if len(speed) == 2 else "-"
    rounds = f", median of {args.rounds} alternating rounds" if len(frameworks) > 1 and args.rounds > 1 else ""
    print(f"\n{args.steps} timed steps after {args.warmup} warmup, {threads} threads{rounds}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [row["model"], row["batch"], row["framework"], row["device"], row["precision"],
                 f"{row['params'] / 1e6:.2f}M", f"{row['first_step_s']:.2f}", f"{row['step_s'] * 1e3:.1f}",
                 f"{row['samples_s']:.1f}", ratio if row["framework"] == "jaxretrieval" else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    for row in rows:
        if len(row.get("round_step_s", [])) > 1:
            print(f"{row['framework']} rounds (ms/step): " + ", ".join(f"{t * 1e3:.0f}" for t in row["round_step_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "steps": args.steps, "warmup": args.warmup,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
