"""One Centroids-ReID (CTL) train step, jaxretrieval against the PyTorch original's arrangement, same machine and run.

`python benchmarks/reid_train_step.py [--tiny] --batch 16 --height 256 --width 128 --steps 3 --warmup 1 --rounds 3
[--precision fp32|bf16] [--threads N]`

A step is: forward through the ResNet-50 (last stride 1, no stem ReLU), global average pooling to f, the BNNeck
(frozen bias) and the bias-free classifier; the CTL loss (label-smoothed CE on classifier(bn(f)), batch-hard triplet,
5e-4 x center loss and the query-to-centroid triplet, all on f); backward; Adam (L2 weight decay) on everything but
the centres and SGD on the centres, their gradient scaled by 1 / 5e-4 first. The batch is P identities x K = 4
consecutive rows of random NHWC images. Hyper-parameters are the original's Market-1501 recipe, at a constant lr.

- jaxretrieval: the trainer's own step, `setup_training` on the config `jax_config` builds, jitted on a one-device
  mesh, batch placed with `global_batch`.
- torch: torchvision's ResNet-50 (`--tiny`: its modules at layers (1, 1, 1, 1), width 16) with the original's
  changes, the BNNeck, classifier and centres under the original's module names, the loss written out below from
  the original's losses/*.py and train_ctl_model.py, `torch.optim.Adam` and `torch.optim.SGD`; eager, NCHW, fp32,
  on CUDA when available.

Both sides start from the same weights: the jax process builds the torch model from the same seed and converts its
state dict with `convert.ctl.params_from_lightning`. The first step's losses must then agree (to float rounding in
fp32); the second step's differ a little more, as Adam's first update is lr x sign(gradient) and parameters whose
gradient is rounding noise move either way. Each framework runs in a fresh process pinned to --threads cores;
--rounds alternates them and reports the median round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from harness import alternating_rounds, environment, print_rounds, time_steps, torch_device_name

NUM_CLASSES = 751  # Market-1501's training identities
K = 4  # DATALOADER.NUM_INSTANCE
LR, WEIGHT_DECAY, B1, B2, EPS = 3.5e-4, 5e-4, 0.9, 0.999, 1e-8  # SOLVER.BASE_LR, WEIGHT_DECAY, torch Adam defaults
CENTER_LR, CENTER_WEIGHT = 0.5, 5e-4  # SOLVER.CENTER_LR, SOLVER.CENTER_LOSS_WEIGHT
MARGIN, SMOOTHING = 0.5, 0.1  # SOLVER.MARGIN (both triplets), CrossEntropyLabelSmooth's epsilon
SIZES = {"resnet50": ((3, 4, 6, 3), 64), "tiny": ((1, 1, 1, 1), 16)}
PRESETS = {"resnet50": "resnet50_ctl", "tiny": "resnet_tiny_ctl"}
GROUPS = {"backbone": "backbone", "bn": "neck", "fc_query": "classifier", "center_loss": "centres"}  # torch's names
OUR_GROUPS = {"backbone": "backbone", "neck": "neck", "classifier": "classifier", "center_loss": "centres"}


def make_batch(batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalised-looking NHWC images; batch / K distinct identities, each on K consecutive rows."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(NUM_CLASSES, batch // K, replace=False)
    return {"image": rng.standard_normal((batch, height, width, 3), dtype=np.float32),
            "label": np.repeat(ids, K).astype(np.int32), "camera": rng.integers(0, 6, batch, dtype=np.int32)}


def torch_ctl(model: str, seed: int) -> Any:
    """The original CTLModel's trained modules under its names (backbone.base, bn, fc_query, center_loss.centers).
    The backbone is torchvision's ResNet with the original's changes: last stride 1 and no stem ReLU (its
    modelling/backbones/resnet.py comments the ReLU out; torchvision's top-level `relu` serves the stem only, every
    block has its own). Its forward ends in the global average pool, f, once the ImageNet head is an identity."""
    import torch
    import torchvision
    from torch import nn
    from torchvision.models.resnet import Bottleneck

    layers, width = SIZES[model]
    torch.manual_seed(seed)
    base = torchvision.models.resnet50(weights=None)
    if (layers, width) != SIZES["resnet50"]:  # torchvision fixes the widths: rebuild stem and stages with its code
        base.inplanes = width
        base.conv1, base.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        for i, blocks in enumerate(layers):
            setattr(base, f"layer{i + 1}", base._make_layer(Bottleneck, width * 2**i, blocks, stride=min(i, 1) + 1))
        for m in base.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    base.layer4[0].conv2.stride = (1, 1)
    base.layer4[0].downsample[0].stride = (1, 1)
    base.relu = nn.Identity()
    base.fc = nn.Identity()
    features = width * 32
    ctl = nn.Module()
    ctl.backbone = nn.Module()
    ctl.backbone.base = base
    ctl.bn = nn.BatchNorm1d(features)
    ctl.bn.bias.requires_grad_(False)
    ctl.fc_query = nn.Linear(features, NUM_CLASSES, bias=False)
    nn.init.normal_(ctl.fc_query.weight, std=0.001)
    ctl.center_loss = nn.Module()
    ctl.center_loss.centers = nn.Parameter(torch.randn(NUM_CLASSES, features))
    return ctl


def torch_ctl_loss(f: Any, logits: Any, labels: Any, centers: Any) -> Any:
    """The original's total: CE with label smoothing + batch-hard triplet + 5e-4 x center loss + centroid triplet."""
    import torch
    import torch.nn.functional as F

    def squared(x: Any, y: Any) -> Any:  # |x|^2 + |y|^2 - 2 x.y, as euclidean_dist and CenterLoss expand it
        return (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.T

    def hard_triplet(x: Any, ids: Any) -> Any:  # hardest positive and negative per anchor, MarginRankingLoss
        dist = squared(x, x).clamp(min=1e-12).sqrt()
        same = ids[:, None] == ids[None]
        ap = dist.masked_fill(~same, float("-inf")).max(1).values
        an = dist.masked_fill(same, float("inf")).min(1).values
        return F.relu(ap - an + MARGIN).mean()

    n, classes = logits.shape
    one_hot = F.one_hot(labels, classes).float()
    xent = -((1 - SMOOTHING) * one_hot + SMOOTHING / classes).mul(logits.log_softmax(1)).sum(1).mean()
    # CenterLoss: the full (rows, classes) matrix, other classes zeroed, clamped, summed over the rows
    center = (squared(f, centers) * one_hot).clamp(1e-12, 1e12).sum() / n
    # Slot i: each identity's row i is a query against the centroid of its other K - 1 rows
    grid, ids = f.view(n // K, K, -1), labels.view(n // K, K)[:, 0]
    centroid = torch.stack([
        hard_triplet(torch.cat([grid[:, i], torch.cat([grid[:, :i], grid[:, i + 1:]], 1).mean(1)]),
                     torch.cat([ids, ids])) for i in range(K)]).mean()
    return xent + hard_triplet(f, labels) + CENTER_WEIGHT * center + centroid


def torch_counts(ctl: Any) -> dict[str, int]:
    """Trained parameters per part (the BNNeck's frozen bias is not one)."""
    counts = dict.fromkeys(GROUPS.values(), 0)
    for name, p in ctl.named_parameters():
        if p.requires_grad:
            counts[GROUPS[name.split(".")[0]]] += p.numel()
    return counts


def checksum(arrays: list[np.ndarray]) -> float:
    return float(sum(np.abs(np.asarray(a, np.float64)).sum() for a in arrays))


def bench_torch(args: argparse.Namespace, host: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctl = torch_ctl(args.model, args.seed).train()
    init = checksum([v.numpy() for k, v in ctl.state_dict().items() if not k.endswith("num_batches_tracked")])
    ctl.to(device)
    images = torch.from_numpy(host["image"]).permute(0, 3, 1, 2).contiguous().to(device)  # NCHW, torch's default
    labels = torch.from_numpy(host["label"]).long().to(device)
    centers = ctl.center_loss.centers
    # build_optimizer: Adam over every trainable parameter not named *center*, plain SGD on the centres
    regular = [p for name, p in ctl.named_parameters() if p.requires_grad and "center" not in name]
    opt = torch.optim.Adam(regular, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WEIGHT_DECAY)
    opt_center = torch.optim.SGD([centers], lr=CENTER_LR)

    def step() -> float:
        opt.zero_grad()
        opt_center.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            f = ctl.backbone.base(images)
            logits = ctl.fc_query(ctl.bn(f))
        loss = torch_ctl_loss(f.float(), logits.float(), labels, centers)
        loss.backward()
        opt.step()
        centers.grad *= 1.0 / CENTER_WEIGHT
        opt_center.step()
        return loss.item()  # waits for the step on any device

    first, median, losses = time_steps(step, args.warmup, args.steps)
    name = torch_device_name(device)
    return {"framework": "torch", "step": f"torchvision + original losses ({name})", "params": torch_counts(ctl),
            "init_checksum": init, "first_step_s": first, "step_s": median, "losses": losses[:2]}


def jax_config(args: argparse.Namespace) -> Any:
    from jaxretrieval.config import load_config

    return load_config(None, [
        f"model.name={PRESETS[args.model]}", f"model.num_classes={NUM_CLASSES}", "data.kind=reid_demo",
        "eval.protocol=reid", "train.loss=ctl", f"train.batch_size={args.batch}", f"data.num_instances={K}",
        "train.optimizer=adam", f"train.lr={LR}", f"train.end_lr={LR}", "train.warmup_steps=0",
        f"train.weight_decay={WEIGHT_DECAY}", f"train.b1={B1}", f"train.b2={B2}", f"train.eps={EPS}",
        "train.grad_clip=0", f"ctl.center_lr={CENTER_LR}", f"ctl.center_loss_weight={CENTER_WEIGHT}",
        f"ctl.triplet_margin={MARGIN}", f"ctl.label_smoothing={SMOOTHING}", f"train.precision={args.precision}",
        f"train.seed={args.seed}"])


def library_training(args: argparse.Namespace, start: dict) -> tuple[Any, Any, Callable, Any, Any]:
    """(params, opt_state, step_fn, roles, mesh) from jaxretrieval's own setup_training, parameters set to `start`."""
    import jax

    from jaxretrieval.models import parameter_roles
    from jaxretrieval.sharding import make_mesh
    from jaxretrieval.train import setup_training

    config = jax_config(args)
    mesh = make_mesh(config.mesh)
    _, params, opt_state, step_fn = setup_training(config, mesh)
    params = jax.tree.map(lambda p, new: jax.device_put(np.asarray(new, p.dtype), p.sharding), params, start)
    return params, opt_state, step_fn, parameter_roles(config.model), mesh


def bench_jax(args: argparse.Namespace, host: dict[str, np.ndarray]) -> dict[str, Any]:
    import jax
    import torch

    from convert.ctl import params_from_lightning
    from jaxretrieval.sharding import global_batch

    torch.set_num_threads(1)  # only to build the same starting weights as the torch side
    state = {k: v.numpy() for k, v in torch_ctl(args.model, args.seed).state_dict().items()}
    init = checksum([v for k, v in state.items() if not k.endswith("num_batches_tracked")])
    params, opt_state, step_fn, roles, mesh = library_training(args, params_from_lightning(state))
    batch = global_batch(host, mesh)
    sizes = jax.tree.map(lambda role, p: 0 if role == "state" else int(np.prod(p.shape)), roles, params)
    counts = {name: sum(jax.tree.leaves(sizes[key])) for key, name in OUR_GROUPS.items()}
    live = {"params": params, "opt_state": opt_state, "step": 0}

    def step() -> float:
        live["step"] += 1
        live["params"], live["opt_state"], metrics = step_fn(live["params"], live["opt_state"], batch,
                                                             np.int32(live["step"]))
        jax.block_until_ready((live["params"], metrics))
        return float(metrics["loss"])

    first, median, losses = time_steps(step, args.warmup, args.steps)
    return {"framework": "jaxretrieval", "step": f"library ({jax.devices()[0].device_kind})",
            "params": counts, "init_checksum": init, "first_step_s": first, "step_s": median, "losses": losses[:2]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="resnet50")
    parser.add_argument("--tiny", action="store_true", help="--model tiny: layers (1, 1, 1, 1), width 16")
    parser.add_argument("--batch", type=int, default=64, help=f"images per step, {K} per identity")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1: compilation)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate fresh jax and torch processes this many "
                                                              "times and report the median round")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: bf16 compute, fp32 parameters (torch: autocast over the model's forward)")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores for XLA and torch (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frameworks", default="jax,torch", help="jax, torch or both (each in its own process)")
    parser.add_argument("--json", default=None, help="also write the rows and environment to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    if args.batch % K or args.batch // K < 2:
        parser.error(f"--batch must be a multiple of {K} with at least 2 identities")
    frameworks = args.frameworks.split(",")
    if not frameworks or set(frameworks) - {"jax", "torch"}:
        parser.error(f"--frameworks takes jax, torch or both, not {args.frameworks!r}")
    cores = sorted(os.sched_getaffinity(0))
    threads = min(args.threads or len(cores), len(cores))
    env = {**environment(threads, ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "numpy")),
           "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}

    if len(frameworks) > 1:
        print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
        rows = alternating_rounds(__file__, frameworks, argv, args.rounds)
    else:
        os.sched_setaffinity(0, cores[:threads])  # before jax or torch size their thread pools
        import torch

        torch.set_num_threads(threads)
        bench = {"jax": bench_jax, "torch": bench_torch}[frameworks[0]]
        rows = [bench(args, make_batch(args.batch, args.height, args.width, args.seed))]
    for row in rows:
        row.update(model=args.model, batch=args.batch, input=f"{args.height}x{args.width}",
                   precision=args.precision, threads=threads, images_s=args.batch / row["step_s"])

    speed = {row["framework"]: row["images_s"] for row in rows}
    ratio = f"{speed['jaxretrieval'] / speed['torch']:.2f}x" if len(speed) == 2 else "-"
    rounds = f", median of {args.rounds} alternating rounds" if len(rows) > 1 and args.rounds > 1 else ""
    print(f"\n{args.steps} timed steps after {args.warmup} warmup, {threads} threads{rounds}\n")
    header = ["model", "batch", "input", "framework", "step", "precision", "first step (s)", "ms/step (median)",
              "images/s", "jax/torch"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [row["model"], row["batch"], row["input"], row["framework"], row["step"], row["precision"],
                 f"{row['first_step_s']:.2f}", f"{row['step_s'] * 1e3:.0f}", f"{row['images_s']:.2f}",
                 ratio if row["framework"] == "jaxretrieval" else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    print_rounds(rows)
    for row in rows:
        parts = ", ".join(f"{name} {n:,}" for name, n in row["params"].items())
        print(f"{row['framework']} trained parameters: {sum(row['params'].values()):,} ({parts})")
    if len(rows) == 2:
        jax_row, torch_row = sorted(rows, key=lambda row: row["framework"] != "jaxretrieval")
        assert jax_row["params"] == torch_row["params"], "the two sides train different parameters"
        assert jax_row["init_checksum"] == torch_row["init_checksum"], "the two sides start from different weights"
        print("parameter counts agree; both start from the same weights (sum |w| "
              f"{torch_row['init_checksum']:.6e})")
        for i, name in enumerate(["first step", "second step (after one update)"][:len(jax_row["losses"])]):
            a, b = jax_row["losses"][i], torch_row["losses"][i]
            rel = abs(a - b) / abs(b)
            print(f"loss at the {name}: jaxretrieval {a:.7f}, torch {b:.7f}, relative difference {rel:.1e}"
                  + (" (agree to 1e-4)" if rel < 1e-4 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
