"""BLIP-2 gallery embedding (pretrain_vitL shapes): images/s of the scorer's image side, system blip2's jitted
`encode_image` (LAVIS's clip_L ViT-L/14: 23 blocks, ln_vision, the Q-Former's 32 queries, vision_proj, normalised)
against the torch composition LAVIS runs (open_clip's ViT-L/14 cut to 23 blocks, LayerNorm, transformers'
Blip2QFormerModel, Linear), same batch, same machine.

`python benchmarks/blip2_embed.py [--size vitl|tiny] [--batch 8] [--steps 3] [--warmup 1] [--rounds 1]
[--precision fp32|bf16] [--peak-tflops P]`

Random weights on both sides (throughput does not depend on them; tests/test_convert_blip2.py checks the outputs
agree). Each framework runs in a fresh process; --rounds alternates them. FLOPs are analytic (`embed_flops`: every
matmul and attention product of the ViT blocks and the Q-Former's query path, forward only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from harness import add_step_options, print_step_table, save_rows, side_by_side, time_steps, time_torch_step

REPO = Path(__file__).resolve().parents[1]
# image size, patch, ViT width, blocks run, heads; Q-Former width, layers, heads, queries, cross every
SIZES = {"vitl": (224, 14, 1024, 23, 16, 768, 12, 12, 32, 2), "tiny": (32, 8, 48, 2, 2, 32, 4, 2, 8, 2)}


def embed_flops(size: str, batch: int) -> float:
    image, patch, width, blocks, _, q_width, q_layers, _, queries, every = SIZES[size]
    tokens = (image // patch) ** 2 + 1
    vit = 2 * (tokens - 1) * patch * patch * 3 * width + blocks * (2 * tokens * 12 * width * width
                                                                 + 2 * 2 * tokens * tokens * width)
    layer = 2 * queries * 12 * q_width * q_width + 2 * 2 * queries * queries * q_width
    cross = 2 * queries * 2 * q_width * q_width + 2 * 2 * tokens * width * q_width + 2 * 2 * queries * tokens * q_width
    qformer = q_layers * layer + (q_layers // every) * cross + 2 * queries * q_width * 256
    return float(batch * (vit + qformer))


def pixels(size: str, batch: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, SIZES[size][0], SIZES[size][0], 3)).astype(np.float32)


def bench_jax(args: argparse.Namespace) -> dict:
    import jax
    from flax import nnx

    from jaxretrieval.config import load_config
    from jaxretrieval.models import abstract_model, init_params

    name = "blip2_pretrain_vitl" if args.size == "vitl" else "blip2_tiny"
    overrides = [f"model.name={name}", "system=blip2", "train.loss=blip2", "data.tokenizer_kind=wordpiece",
                 "eval.protocol=text_to_image", f"train.precision={args.precision}"]
    if args.size == "tiny":
        overrides.append("blip2.query_tokens=8")
    config = load_config(None, overrides)
    graphdef, _ = abstract_model(config, precision=args.precision)
    params = init_params(config, seed=0, precision=args.precision)
    encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
    batch = jax.numpy.asarray(pixels(args.size, args.batch))
    first, median, _ = time_steps(lambda: jax.block_until_ready(encode(params, batch)), args.warmup, args.steps)
    return {"framework": "jaxretrieval", "device": jax.devices()[0].device_kind, "first_step_s": first,
            "step_s": median}


def bench_torch(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer

    image, patch, width, blocks, heads, q_width, q_layers, q_heads, queries, every = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = VisionTransformer(image_size=image, patch_size=patch, width=width, layers=blocks, heads=heads,
                            mlp_ratio=4.0, output_dim=256, act_layer=QuickGELU).to(device).eval()
    config = transformers.Blip2QFormerConfig(hidden_size=q_width, num_hidden_layers=q_layers,
                                             num_attention_heads=q_heads, intermediate_size=4 * q_width,
                                             cross_attention_frequency=every, encoder_hidden_size=width)
    qformer = transformers.Blip2QFormerModel(config).to(device).eval()
    ln_vision, proj = torch.nn.LayerNorm(width).to(device), torch.nn.Linear(q_width, 256).to(device)
    query_tokens = torch.randn(1, queries, q_width, device=device) * 0.02
    batch = torch.from_numpy(pixels(args.size, args.batch)).permute(0, 3, 1, 2).contiguous().to(device)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            x = vit.conv1(batch).flatten(2).transpose(1, 2)  # LAVIS's clip_L forward: no ln_post, no proj
            cls = vit.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                                device=device)
            x = vit.ln_pre(torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype))
            embeds = ln_vision(vit.transformer(x).float())
            out = qformer(query_embeds=query_tokens.expand(len(batch), -1, -1), encoder_hidden_states=embeds)
            feats = torch.nn.functional.normalize(proj(out.last_hidden_state), dim=-1)
        feats.float().cpu()

    return time_torch_step("torch (LAVIS composition)", device, step, args.warmup, args.steps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vitl")
    parser.add_argument("--batch", type=int, default=8)
    add_step_options(parser, steps=3, warmup=1)
    args = parser.parse_args(argv)
    benches = {"jax": lambda: bench_jax(args), "torch": lambda: bench_torch(args)}
    rows = side_by_side(__file__, argv, args, benches, ("jax", "flax", "torch", "open_clip_torch", "transformers"))
    flops = embed_flops(args.size, args.batch)
    title = f"BLIP-2 gallery embedding ({args.size}), batch {args.batch}, {args.precision}"
    print_step_table(rows, flops, args.batch, title, "batch", "images", args.peak_tflops)
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
