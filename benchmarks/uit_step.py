"""UIT train step: system uit's jitted step (ITC + ITM + MLM + MIM with the EDA copy, AdamW with the lr x 2 groups)
against the PyTorch composition of CMP (benchmarks/uit_torch.py: timm's Swin, transformers' BERT, CMP's heads and
losses, AdamW), same sizes, same batch, same machine.

`python benchmarks/uit_step.py [--size swinb|tiny] [--batch 8] [--steps 3] [--warmup 1] [--rounds 1]
[--precision fp32|bf16] [--peak-tflops P]`

Both sides train on one synthetic batch (images, captions and their EDA copies as token rows, 10 masked positions,
person ids in pairs). The torch side runs without BERT dropout (ours applies none) and draws its ITM negatives in one
multinomial call (CMP loops over rows); it is eager, with `torch.autocast` for bf16, on CUDA when available. Each
framework runs in a fresh process; --rounds alternates them and reports the median round. FLOPs are counted
analytically (`uit_flops`: every matmul and attention product of one step's forward, x3 for the backward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from harness import (
    add_step_options,
    print_step_table,
    save_rows,
    side_by_side,
    time_torch_step,
    time_trainer_step,
)

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # swin (image size, patch, embed, depths, heads, window), bert (vocab, width, layers, heads, fusion), dims
    "swinb": {"swin": (224, 4, 128, (2, 2, 18, 2), (4, 8, 16, 32), 7), "bert": (30522, 768, 12, 12, 6),
              "embed_dim": 2048, "length": 56, "mim_block": 32},
    "tiny": {"swin": (64, 4, 16, (2, 2), (2, 4), 4), "bert": (160, 32, 4, 2, 2), "embed_dim": 32, "length": 32,
             "mim_block": 16},
}
MASKS = 10


def swin_flops(image: int, patch: int, embed: int, depths: tuple, window: int) -> tuple[float, int, int]:
    """(forward FLOPs of one image, final tokens, final width): patch embedding, patch merging, every block's qkv,
    projection, MLP and windowed attention (window padding left out)."""
    side, width = image // patch, embed
    flops = 2 * side * side * patch * patch * 3 * embed
    for stage, depth in enumerate(depths):
        if stage:
            side //= 2
            flops += 2 * side * side * 4 * width * 2 * width
            width *= 2
        tokens, w = side * side, min(window, side)
        flops += depth * (2 * tokens * 12 * width * width + 2 * 2 * tokens * w * w * width)
    return flops, side * side, width


def bert_flops(length: int, width: int, layers: int, image_tokens: int = 0, image_width: int = 0) -> float:
    """Forward FLOPs of `layers` BERT layers over one caption; with image tokens, each layer cross-attends to them."""
    layer = 2 * length * 12 * width * width + 2 * 2 * length * length * width
    if image_tokens:
        layer += 2 * length * 2 * width * width + 2 * 2 * image_tokens * image_width * width \
            + 2 * 2 * length * image_tokens * width
    return layers * layer


def uit_flops(size: str, batch: int) -> float:
    """One train step: the Swin twice (the ITC / ITM pass and SimMIM's), the text layers over the caption and its EDA
    copy, the fusion layers over 3 ITM pairs per caption (the positive and two negatives) for both, the whole BERT
    over the masked caption, the heads; x3 for forward and backward."""
    s = SIZES[size]
    image, patch, embed, depths, _, window = s["swin"]
    vocab, width, layers, _, fusion = s["bert"]
    length = s["length"]
    vision, tokens, image_width = swin_flops(image, patch, embed, depths, window)
    stride = image // int(tokens ** 0.5)
    mim = vision + 2 * tokens * image_width * stride * stride * 3
    text = bert_flops(length, width, fusion)
    cross = bert_flops(length, width, layers - fusion, tokens + 1, image_width)
    heads = 2 * (3 * image_width + 4 * width) * s["embed_dim"] + 2 * 6 * 2 * width * 2 * width \
        + 2 * MASKS * width * (width + vocab)
    forward = vision + mim + 2 * text + 6 * cross + (text + cross) + heads
    return 3.0 * forward * batch


def make_batch(size: str, batch: int) -> dict[str, np.ndarray]:
    s = SIZES[size]
    image, vocab, length = s["swin"][0], s["bert"][0], s["length"]
    rng = np.random.default_rng(0)

    def captions() -> np.ndarray:
        rows = np.zeros((batch, length), np.int32)
        for row, count in zip(rows, rng.integers(length // 3 + 2, length - 1, batch), strict=True):
            row[0], row[1:count], row[count] = 1, rng.integers(5, vocab, count - 1), 2  # [CLS] words [SEP]
        return rows

    text = captions()
    positions = np.stack([rng.choice(np.arange(1, length // 3 + 1), MASKS, replace=False) for _ in range(batch)])
    masked = text.copy()
    np.put_along_axis(masked, positions, 3, axis=1)
    return {"image": rng.normal(size=(batch, image, image, 3)).astype(np.float32), "text": text,
            "text_eda": captions(), "group": np.arange(batch, dtype=np.int32) // 2, "mlm_tokens": masked,
            "mlm_positions": positions.astype(np.int32),
            "mlm_labels": np.take_along_axis(text, positions, axis=1).astype(np.int32)}


def config_overrides(size: str, args: argparse.Namespace) -> list[str]:
    s = SIZES[size]
    image, patch, embed, depths, heads, window = s["swin"]
    vocab, width, layers, text_heads, fusion = s["bert"]
    return [f"train.batch_size={args.batch}", f"train.precision={args.precision}", "uit.drop_path=0.0",
            f"model.image.image_size={image}", f"model.image.patch_size={patch}", f"model.image.width={embed}",
            f"uit.swin_depths=[{','.join(map(str, depths))}]", f"uit.swin_heads=[{','.join(map(str, heads))}]",
            f"uit.swin_window={window}", f"model.text.vocab_size={vocab}", f"model.text.width={width}",
            f"model.text.layers={layers}", f"model.text.heads={text_heads}", f"uit.fusion_from={fusion}",
            f"model.text.context_length={s['length']}", f"model.embed_dim={s['embed_dim']}",
            f"uit.mim_block={s['mim_block']}", f"uit.mim_images={args.batch}", "model.name=custom", "model.family=uit",
            f"uit.fast_bert_layers=[{fusion - 2},{fusion - 1},{layers - 2},{layers - 1}]"]


def bench_jax(args: argparse.Namespace) -> dict:
    from jaxretrieval.config import load_config

    config = load_config(REPO / "configs" / "pab" / "uit_swinb.yaml", config_overrides(args.size, args))
    return time_trainer_step(config, make_batch(args.size, args.batch), args.warmup, args.steps)


def bench_torch(args: argparse.Namespace) -> dict:
    import torch
    from uit_torch import CMPTorch

    s = SIZES[args.size]
    image, patch, embed, depths, heads, window = s["swin"]
    vocab, width, layers, text_heads, fusion = s["bert"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CMPTorch({"image_size": image, "patch_size": patch, "embed_dim": embed, "depths": depths,
                      "num_heads": heads, "window_size": window, "drop_path_rate": 0.0},
                     {"vocab_size": vocab, "width": width, "layers": layers, "heads": text_heads, "ffn_dim": 4 * width,
                      "fusion_from": fusion, "dropout": 0.0}, embed_dim=s["embed_dim"],
                     mim_block=s["mim_block"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    b = make_batch(args.size, args.batch)
    long = lambda x: torch.from_numpy(x).long().to(device)  # noqa: E731
    labels = np.full((args.batch, MASKS), -100)
    labels[:] = b["mlm_labels"]
    batch = {"image": torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous().to(device),
             "text_ids": long(b["text"]), "text_atts": long(b["text"] > 0), "text_ids_eda": long(b["text_eda"]),
             "text_atts_eda": long(b["text_eda"] > 0), "text_ids_masked": long(b["mlm_tokens"]),
             "masked_pos": long(b["mlm_positions"]), "masked_ids": long(labels), "idx": long(b["group"])}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model.train_losses(batch)["loss"]
        loss.backward()
        optimizer.step()
        loss.item()

    return time_torch_step("torch (CMP)", device, step, args.warmup, args.steps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="swinb")
    parser.add_argument("--batch", type=int, default=8)
    add_step_options(parser, steps=3, warmup=1)
    args = parser.parse_args(argv)
    benches = {"jax": lambda: bench_jax(args), "torch": lambda: bench_torch(args)}
    rows = side_by_side(__file__, argv, args, benches, ("jax", "flax", "torch", "timm", "transformers"))
    flops = uit_flops(args.size, args.batch)
    title = f"UIT train step ({args.size}), batch {args.batch}, {args.precision}"
    print_step_table(rows, flops, args.batch, title, "step", "samples", args.peak_tflops)
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
