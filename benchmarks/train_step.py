"""One full train step, jaxretrieval against the PyTorch original, same model, batch and machine.

`python benchmarks/train_step.py --model vit_b32 --batch 16 --steps 10 --warmup 3 [--precision fp32|bf16]
[--threads N] [--rounds R] [--peak-tflops P] [--json FILE] [key.path=value ...]`

A step is: forward through both towers (CLIP) or the image-only and text-only forwards of the one multiway
encoder (BEiT-3), the symmetric contrastive loss, backward, optional global-norm gradient clipping and an AdamW
update. The jax side is jaxretrieval's own `make_train_step`, jitted with a one-device mesh and the trainer's
shardings. The torch side is the original arrangement, chosen by `model.family`:

- clip: open_clip's model and `ClipLoss`, `torch.optim.AdamW` with weight decay on matrices only,
  `clip_grad_norm_`, and the logit-scale clamp after each step.
- beit3: torchscale's `BEiT3` (the encoder unilm wraps) with unilm's BEiT3ForRetrieval heads and ClipLoss, and
  `torch.optim.AdamW` over unilm's layer-decay parameter groups; no clipping unless train.grad_clip > 0.

Both sides take their hyper-parameters from the same loaded config; for beit3 the unilm retrieval recipe
(BEIT3_RECIPE) is applied before any key.path=value overrides given here. Both get the same random batch. Time
per step is the median of --steps synchronised steps after --warmup steps. The jax side's start-up is timed phase
by phase (shapes and shardings, random init, lowering, compilation, first step). FLOPs per step are counted
analytically from the model's shapes (flops.py) and credited to both sides (they do the same work); XLA's own
cost-analysis figure is printed beside it (it misses library calls and counts a scanned layer once);
--peak-tflops adds model FLOPs utilisation. Each
framework runs in a fresh child process pinned to --threads cores; --rounds alternates them and reports the
median round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flops import train_step_flops
from harness import alternating_rounds, environment, print_rounds, time_steps, torch_device_name

PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "open_clip_torch", "torchscale", "timm")

OPEN_CLIP_NAMES = {"vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "vit_l14": "ViT-L-14", "vit_l14_336": "ViT-L-14-336"}
# unilm's retrieval fine-tuning defaults (run_beit3_finetuning.py): AdamW betas 0.9/0.999, eps 1e-8, weight decay
# 0.05 off vectors, the vision position table and the class token, layer decay, drop path, no gradient clipping.
BEIT3_RECIPE = ["model.drop_path=0.1", "train.layer_decay=0.85", "train.weight_decay=0.05", "train.b2=0.999",
                "train.eps=1e-8", "train.grad_clip=0", "train.no_decay=[beit3/vision_positions]"]
FAMILY_RECIPES = {"clip": [], "beit3": BEIT3_RECIPE}
TORCH_NAMES = {"clip": "open_clip", "beit3": "torchscale"}


def random_batch(model_config: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalised-looking NHWC images, random token rows and unique groups. CLIP rows end in EOT (the largest id)
    at a random position; BEiT-3 rows hold ids in [3, vocab) for a random length, then the pad id."""
    rng = np.random.default_rng(seed)
    size, text = model_config.image.image_size, model_config.text
    if model_config.family == "beit3":
        tokens = rng.integers(3, text.vocab_size, (batch, text.context_length), dtype=np.int32)
        lengths = rng.integers(2, text.context_length + 1, batch)
        tokens[np.arange(text.context_length)[None] >= lengths[:, None]] = model_config.multiway.pad_id
    else:
        tokens = rng.integers(1, text.vocab_size - 1, (batch, text.context_length), dtype=np.int32)
        tokens[np.arange(batch), rng.integers(1, text.context_length, batch)] = text.vocab_size - 1
    return {"image": rng.standard_normal((batch, size, size, 3), dtype=np.float32), "text": tokens,
            "group": np.arange(batch, dtype=np.int32)}


def xla_flops(compiled: Any) -> float | None:
    """FLOPs XLA's cost analysis counts for one call of a compiled executable (None where it gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def bench_jax(config: Any, host_batch: dict[str, np.ndarray], warmup: int, steps: int) -> dict[str, Any]:
    import time

    import jax

    from jaxretrieval.models import layer_depth
    from jaxretrieval.optim import decay_mask, layer_lr_scales
    from jaxretrieval.sharding import batch_sharding, make_mesh
    from jaxretrieval.train import prepare_training

    # Start-up, phase by phase: shapes and shardings, random init, lowering, compilation.
    clock = time.perf_counter
    began = clock()
    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    setup = prepare_training(config, mesh)
    setup_s, began = clock() - began, clock()
    params = setup.fresh_params()
    opt_state = setup.init_opt_state(params)
    jax.block_until_ready((params, opt_state))
    init_s, began = clock() - began, clock()
    batch = jax.device_put(host_batch, batch_sharding(mesh))
    lowered = setup.step_fn.lower(params, opt_state, batch, np.int32(0))
    lower_s, began = clock() - began, clock()
    step_fn = lowered.compile()
    compile_s = clock() - began
    sizes = jax.tree.map(lambda p: int(np.prod(p.shape)), params)
    # What the optimizer decays and how it scales lr, summed over parameters, to check against the torch side.
    mask = decay_mask(params, config.train.no_decay)
    decayed = sum(n for n, d in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask), strict=True) if d)
    depth = layer_depth(config.model)
    scales = layer_lr_scales(params, depth, config.train.layer_decay) if depth else jax.tree.map(lambda _: 1.0, params)
    # A stacked layer parameter has one scale per layer along its first axis.
    lr_scale_sum = sum(float(np.sum(np.broadcast_to(np.asarray(s, np.float64), p.shape)))
                       for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(scales), strict=True))
    state = {"params": params, "opt_state": opt_state, "step": 0}

    def step() -> None:
        state["step"] += 1
        state["params"], state["opt_state"], metrics = step_fn(state["params"], state["opt_state"], batch,
                                                               np.int32(state["step"]))
        jax.block_until_ready((state["params"], metrics))

    first, median, _ = time_steps(step, warmup, steps)
    startup = {"setup_s": setup_s, "init_s": init_s, "lower_s": lower_s, "compile_s": compile_s,
               "first_run_s": first}
    return {"framework": "jaxretrieval", "device": jax.devices()[0].device_kind,
            "params": sum(jax.tree.leaves(sizes)), "decayed_params": decayed, "lr_scale_sum": lr_scale_sum,
            "flops": xla_flops(step_fn), "first_step_s": sum(startup.values()), "startup": startup, "step_s": median}


@dataclasses.dataclass
class TorchSide:
    """What the generic torch loop needs from a family: the model (on the batch's device), AdamW's parameter
    groups (each with its own lr and weight_decay), the forward-and-loss on the fixed batch, and an optional
    post-update hook."""

    model: Any
    groups: list[dict[str, Any]]
    loss: Callable[[], Any]
    after_step: Callable[[], None] | None = None


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


def torch_clip(config: Any, images: Any, tokens: Any) -> TorchSide:
    """open_clip's CLIP and ClipLoss; weight decay on matrices only; the scale clamped after each step."""
    import open_clip
    import torch

    cfg = config.train
    model = open_clip_model(config.model).to(images.device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": cfg.lr}]
    loss_fn = open_clip.loss.ClipLoss()

    def loss() -> Any:
        return loss_fn(*model(images, tokens))

    def clamp() -> None:  # open_clip's training loop clamps the scale after each step
        with torch.no_grad():
            model.logit_scale.clamp_(0, config.model.max_logit_scale)

    return TorchSide(model, groups, loss, clamp)


def torchscale_beit3(model_config: Any) -> Any:
    """unilm's BEiT3ForRetrieval on torchscale's BEiT3 (as tests/test_beit3.py builds it), drop path as set."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm's old module path
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

    multiway = model_config.multiway
    # unilm's _get_base_config with the configured sizes.
    args = EncoderConfig(
        encoder_layers=multiway.layers, encoder_embed_dim=multiway.width, encoder_attention_heads=multiway.heads,
        encoder_ffn_embed_dim=multiway.ffn_dim, img_size=model_config.image.image_size,
        patch_size=model_config.image.patch_size, vocab_size=model_config.text.vocab_size,
        max_source_positions=multiway.max_text_positions, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, drop_path_rate=model_config.drop_path)

    class BEiT3ForRetrieval(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            width = multiway.width
            self.beit3 = BEiT3(args)
            self.vision_head = torch.nn.Linear(width, width, bias=False)
            self.language_head = torch.nn.Linear(width, width, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

        def forward(self, image: Any, text: Any, padding_mask: Any) -> tuple[Any, Any]:
            vision = self.beit3(textual_tokens=None, visual_tokens=image, text_padding_position=None)
            vision_cls = torch.nn.functional.normalize(self.vision_head(vision["encoder_out"][:, 0]), dim=-1)
            language = self.beit3(textual_tokens=text, visual_tokens=None, text_padding_position=padding_mask)
            language_cls = torch.nn.functional.normalize(self.language_head(language["encoder_out"][:, 0]), dim=-1)
            return vision_cls, language_cls

    return BEiT3ForRetrieval()


def unilm_layer_id(name: str, layers: int) -> int:
    """unilm's get_num_layer_for_vit (num_max_layer = layers + 2) on a BEiT3ForRetrieval parameter name."""
    if "embed" in name:
        return 0
    found = re.search(r"layers\.(\d+)\.", name)
    return int(found.group(1)) + 1 if found else layers + 1


def unilm_parameter_groups(model: Any, config: Any) -> list[dict[str, Any]]:
    """unilm's get_parameter_groups with its LayerDecayValueAssigner: one group per (layer id, decay or not), lr
    scaled by layer_decay ** (layers + 1 - id); no weight decay on vectors, biases and BEiT3Wrapper's
    no_weight_decay() names."""
    cfg, layers = config.train, config.model.multiway.layers
    skip = {"pos_embed", "cls_token", "beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token",
            "logit_scale"}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name.endswith(".bias") or name in skip)
        layer = unilm_layer_id(name, layers)
        scale = cfg.layer_decay ** (layers + 1 - layer)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                                   "lr": cfg.lr * scale, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def torch_beit3(config: Any, images: Any, tokens: Any) -> TorchSide:
    """torchscale BEiT-3 with unilm's retrieval heads, ClipLoss and layer-decay parameter groups."""
    import torch

    model = torchscale_beit3(config.model).to(images.device)
    padding = tokens == config.model.multiway.pad_id

    def loss() -> Any:  # unilm's utils.ClipLoss on one process
        image, text = model(images, tokens, padding)
        logits = model.logit_scale.exp() * image @ text.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2

    return TorchSide(model, unilm_parameter_groups(model, config), loss)


TORCH_SIDES = {"clip": torch_clip, "beit3": torch_beit3}


def bench_torch(config: Any, host_batch: dict[str, np.ndarray], warmup: int, steps: int,
                compiled: bool = False) -> dict[str, Any]:
    """The original's step, eager or (`compiled`) with the forward and loss under torch.compile."""
    import torch

    cfg = config.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    images = torch.from_numpy(host_batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    tokens = torch.from_numpy(host_batch["text"]).long().to(device)
    side = TORCH_SIDES[config.model.family](config, images, tokens)
    side.model.train()
    params = [p for group in side.groups for p in group["params"]]
    optimizer = torch.optim.AdamW(side.groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    forward_and_loss = torch.compile(side.loss) if compiled else side.loss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = forward_and_loss()
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if side.after_step is not None:
            side.after_step()
        loss.item()  # waits for the step on any device
        if device.type == "cuda":
            torch.cuda.synchronize()

    first, median, _ = time_steps(step, warmup, steps)
    name = torch_device_name(device)
    # Parameters that get no gradient (BEiT-3's mask token) are never decayed by torch's AdamW.
    decayed = sum(p.numel() for g in side.groups if g["weight_decay"] > 0 for p in g["params"] if p.grad is not None)
    lr_scale_sum = sum(g["lr"] / cfg.lr * p.numel() for g in side.groups for p in g["params"])
    framework = TORCH_NAMES[config.model.family] + (" (torch.compile)" if compiled else "")
    return {"framework": framework, "device": name, "params": sum(p.numel() for p in params),
            "decayed_params": decayed, "lr_scale_sum": lr_scale_sum, "flops": None, "first_step_s": first,
            "step_s": median}


def bench_config(model: str, batch: int, precision: str, overrides: list[str]) -> tuple[Any, list[str]]:
    """The loaded config and every override applied: preset, the family's recipe, then the user's overrides."""
    from jaxretrieval.config import load_config

    base = [f"model.name={model}", f"train.batch_size={batch}", f"train.precision={precision}"]
    family = load_config(None, base).model.family
    applied = [*FAMILY_RECIPES[family], *overrides]
    return load_config(None, base + applied), applied


BENCHES = {"jax": bench_jax, "torch": bench_torch,
           "torch-compile": lambda *args: bench_torch(*args, compiled=True)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b32",
                        help="jaxretrieval preset (tiny, vit_b32, vit_b16, ..., beit3_tiny, beit3_base_patch16_224, "
                             "...)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1: compilation)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores for XLA and torch (default: all)")
    parser.add_argument("--frameworks", default="jax,torch",
                        help="comma-separated subset of jax,torch,torch-compile (the original's forward and loss "
                             "under torch.compile); with more than one, each runs in its own process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with both frameworks: alternate fresh jax and torch processes this many times and "
                             "report the median round (evens out a host whose load drifts)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s at this precision (e.g. 989 for an H100 SXM in dense "
                             "bf16): adds model FLOPs utilisation (MFU)")
    parser.add_argument("--json", default=None, help="also write the rows and environment to this file")
    parser.add_argument("overrides", nargs="*", help="config key.path=value, applied to both sides (after the "
                                                     "family's recipe: beit3 gets " + " ".join(BEIT3_RECIPE) + ")")
    args = parser.parse_args(argv)

    frameworks = args.frameworks.split(",")
    if not frameworks or set(frameworks) - set(BENCHES):
        parser.error(f"--frameworks takes some of {', '.join(BENCHES)}, not {args.frameworks!r}")
    cores = sorted(os.sched_getaffinity(0))
    threads = min(args.threads or len(cores), len(cores))
    env = environment(threads, PACKAGES)
    if len(frameworks) > 1:
        _, applied = bench_config(args.model, args.batch, args.precision, args.overrides)
        print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
        print("config overrides: " + (" ".join(applied) or "none"), flush=True)
        rows = alternating_rounds(__file__, frameworks, argv, args.rounds)
        flops = next((row["flops"] for row in rows if row["flops"]), None)
        for row in rows:  # the torch side does the same work; XLA's count stands for both
            row["flops"] = flops
    else:
        # Pinned before jax or torch start their thread pools: XLA's CPU client sizes its pool by the
        # schedulable cores, and torch is told the same number, so both use the same cores.
        os.sched_setaffinity(0, cores[:threads])
        import torch

        torch.set_num_threads(threads)
        config, applied = bench_config(args.model, args.batch, args.precision, args.overrides)
        result = BENCHES[frameworks[0]](config, random_batch(config.model, args.batch), args.warmup, args.steps)
        rows = [{"model": args.model, "batch": args.batch, "precision": args.precision, "threads": threads,
                 **result, "samples_s": args.batch / result["step_s"]}]
    analytic = train_step_flops(bench_config(args.model, args.batch, args.precision, args.overrides)[0].model,
                                args.batch)
    for row in rows:
        row["analytic_flops"] = analytic
        row["tflops_s"] = analytic / row["step_s"] / 1e12
        row["mfu"] = row["tflops_s"] / args.peak_tflops if args.peak_tflops else None
        row["mfu_xla"] = row["flops"] / row["step_s"] / 1e12 / args.peak_tflops if row["flops"] and \
            args.peak_tflops else None

    header = ["model", "batch", "framework", "device", "precision", "params", "first step (s)",
              "step (ms, median)", "samples/s", "jax speed-up", "GFLOP/step (analytic)", "TFLOP/s", "MFU",
              "GFLOP/step (XLA)", "MFU (XLA)"]
    ours = next((row["samples_s"] for row in rows if row["framework"] == "jaxretrieval"), None)
    rounds = f", median of {args.rounds} alternating rounds" if len(frameworks) > 1 and args.rounds > 1 else ""
    print(f"\n{args.steps} timed steps after {args.warmup} warmup, {threads} threads{rounds}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [row["model"], row["batch"], row["framework"], row["device"], row["precision"],
                 f"{row['params'] / 1e6:.2f}M", f"{row['first_step_s']:.2f}", f"{row['step_s'] * 1e3:.1f}",
                 f"{row['samples_s']:.1f}",
                 f"{ours / row['samples_s']:.2f}x" if ours and row["framework"] != "jaxretrieval" else "",
                 f"{row['analytic_flops'] / 1e9:.1f}", f"{row['tflops_s']:.3f}",
                 f"{row['mfu']:.1%}" if row["mfu"] else "-", f"{row['flops'] / 1e9:.1f}" if row["flops"] else "-",
                 f"{row['mfu_xla']:.1%}" if row["mfu_xla"] else "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    for row in rows:
        if row.get("startup"):
            print(f"{row['framework']} start-up: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in row["startup"].items())
                  + f"; {row['first_step_s']:.1f} s from nothing to a finished first step")
    print_rounds(rows)
    if len(rows) >= 2:  # the optimizers must treat the same parameters alike
        decayed, scales = ([row[key] for row in rows[:2]] for key in ("decayed_params", "lr_scale_sum"))
        agree = decayed[0] == decayed[1] and math.isclose(scales[0], scales[1], rel_tol=1e-6)
        print(f"optimizer groups {'agree' if agree else 'DIFFER'}: weight-decayed parameters "
              f"{decayed[0]:,} / {decayed[1]:,}, parameters weighted by lr scale {scales[0]:,.1f} / {scales[1]:,.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "overrides": applied, "steps": args.steps,
                                               "warmup": args.warmup, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
