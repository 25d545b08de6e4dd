"""VSE-infinity train step: system vse_infty's jitted step (region and text encoders in train mode, the hinge loss on
the hardest negative, AdamW with BERT at 0.1x lr, gradient clipping at 2) against the PyTorch baseline composed in
tests/vse_torch.py (vse_infty's EncoderImageAggr and EncoderText over transformers' BertModel, ContrastiveLoss with
max_violation, torch AdamW param groups as the original's, clip_grad_norm_ 2.0), same sizes, batch and machine.

`python benchmarks/vse_step.py [--size base|tiny] [--batch N] [--length L] [--steps 5] [--warmup 2] [--rounds 1]
[--precision fp32|bf16] [--peak-tflops P]`

Both sides train on one synthetic batch: BUTD-like region features (K = 36 x 2048 for both sizes) with 20% of each
image's regions dropped, as the original's training data does, and captions of L / 3 to L tokens, the longest L.
The torch side gets what the original's collate gives (regions cut to the batch's longest set, zero padding; the
captions 0-padded to L) and runs its GPO as the original does (lengths through the CPU for pack_padded_sequence); ours
gets the K regions with their lengths. BERT runs without dropout on both sides (ours has none; the original fine-tunes
with 0.1). The torch side is eager, on CUDA when available (cudnn.benchmark, as the original), BERT attention through
SDPA, `torch.autocast` for bf16. Each framework runs in a fresh process; --rounds alternates them and reports the
median round. FLOPs are counted analytically (`vse_flops`: every matmul of one step's forward, x3 for the backward).
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
SIZES = {  # bert (vocab, width, layers, heads, ffn), regions (count, width), embed_dim, caption length, batch
    "base": {"bert": (30522, 768, 12, 12, 3072), "regions": (36, 2048), "embed_dim": 1024, "length": 32,
             "batch": 128},
    "tiny": {"bert": (1000, 128, 2, 2, 512), "regions": (36, 2048), "embed_dim": 256, "length": 24, "batch": 32},
}
REGION_DROP, MARGIN, LR, BERT_LR_SCALE, WEIGHT_DECAY, GRAD_CLIP = 0.2, 0.2, 5e-4, 0.1, 1e-4, 2.0
GPO_WIDTH = 32  # GPO(32, 32): positional encodings and GRU hidden width


def vse_flops(size: str, batch: int, length: int) -> float:
    """One train step: per image fc and the MLP over all K regions, GPO's GRU (both directions) and weighted sum; per
    caption BERT (projections, feed-forward, attention's two products), the linear to the joint space and GPO; the
    B x B similarity of the loss. x3 for forward and backward."""
    s = SIZES[size]
    _, width, layers, _, ffn = s["bert"]
    regions, region_dim = s["regions"]
    e = s["embed_dim"]

    def gpo(n: int) -> float:
        return 2 * 2 * n * 3 * (GPO_WIDTH * GPO_WIDTH * 2) + 2 * n * GPO_WIDTH + 2 * n * e

    image = 2 * regions * (region_dim * e + region_dim * e // 2 + e // 2 * e) + gpo(regions)
    bert = layers * (2 * length * (4 * width * width + 2 * width * ffn) + 2 * 2 * length * length * width)
    text = bert + 2 * length * width * e + gpo(length)
    return 3.0 * (batch * (image + text) + 2 * batch * batch * e)


def make_batch(size: str, batch: int, length: int) -> dict[str, np.ndarray]:
    s = SIZES[size]
    vocab = s["bert"][0]
    count, region_dim = s["regions"]
    rng = np.random.default_rng(0)
    regions = np.abs(rng.normal(size=(batch, count, region_dim))).astype(np.float32)
    kept = count - rng.binomial(count, REGION_DROP, batch)
    kept[0] = count  # the batch's longest set is whole, as it nearly always is at batch 128
    regions[np.arange(count)[None] >= kept[:, None]] = 0
    text = np.zeros((batch, length), np.int32)
    lengths = rng.integers(max(3, length // 3), length + 1, batch)
    lengths[0] = length
    for row, n in zip(text, lengths, strict=True):
        row[0], row[1:n - 1], row[n - 1] = 101, rng.integers(1000 if vocab > 2000 else 5, vocab, n - 2), 102
    return {"image": regions, "image_lengths": kept.astype(np.int32), "text": text}


def config_overrides(size: str, args: argparse.Namespace) -> list[str]:
    s = SIZES[size]
    vocab, width, layers, heads, ffn = s["bert"]
    return ["system=vse_infty", "model.name=custom", "model.family=vse", f"model.embed_dim={s['embed_dim']}",
            f"model.text.vocab_size={vocab}", f"model.text.width={width}", f"model.text.layers={layers}",
            f"model.text.heads={heads}", f"model.text.mlp_ratio={ffn / width}",
            f"model.text.context_length={args.length}", f"vse_infty.region_dim={s['regions'][1]}",
            "vse_infty.region_mlp=true", "vse_infty.hinge_warmup_epochs=0",
            f"vse_infty.margin={MARGIN}", f"vse_infty.bert_lr_scale={BERT_LR_SCALE}", "data.kind=precomp",
            "data.tokenizer_kind=wordpiece", "train.loss=hinge", f"train.batch_size={args.batch}",
            f"train.precision={args.precision}", "train.optimizer=adamw", f"train.lr={LR}", "train.warmup_steps=0",
            "train.steps=1000", f"train.weight_decay={WEIGHT_DECAY}", "train.decay_vectors=true", "train.b2=0.999",
            "train.eps=1e-8", f"train.grad_clip={GRAD_CLIP}"]


def bench_jax(args: argparse.Namespace) -> dict:
    from jaxretrieval.config import load_config

    config = load_config(None, config_overrides(args.size, args))
    return time_trainer_step(config, make_batch(args.size, args.batch, args.length), args.warmup, args.steps)


def bench_torch(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from vse_torch import ImageEncoder, TextEncoder, bert_config, hinge

    s = SIZES[args.size]
    vocab, width, layers, heads, ffn = s["bert"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    image = ImageEncoder(s["regions"][1], s["embed_dim"]).to(device).train()
    text = TextEncoder(bert_config(vocab, width, layers, heads, ffn, dropout=0.0, attention="sdpa"),
                       s["embed_dim"]).to(device).train()
    bert = set(map(id, text.bert.parameters()))
    params = [*text.parameters(), *image.parameters()]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in text.parameters() if id(p) not in bert], "lr": LR},
        {"params": list(text.bert.parameters()), "lr": LR * BERT_LR_SCALE},
        {"params": list(image.parameters()), "lr": LR}], lr=LR, weight_decay=WEIGHT_DECAY)
    b = make_batch(args.size, args.batch, args.length)
    longest = int(b["image_lengths"].max())
    regions = torch.from_numpy(b["image"][:, :longest]).to(device)
    region_lengths = torch.from_numpy(b["image_lengths"]).float().to(device)
    tokens = torch.from_numpy(b["text"]).long().to(device)
    caption_lengths = (tokens != 0).sum(1).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = hinge(image(regions, region_lengths).float(), text(tokens, caption_lengths).float(), MARGIN, True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        loss.item()

    return time_torch_step("torch (vse_infty)", device, step, args.warmup, args.steps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, default=None, help="default: the size's (base 128, tiny 32)")
    parser.add_argument("--length", type=int, default=None, help="caption tokens, the batch's longest (default: "
                                                                 "the size's, base 32, tiny 24)")
    add_step_options(parser, steps=5, warmup=2)
    args = parser.parse_args(argv)
    args.batch = args.batch or SIZES[args.size]["batch"]
    args.length = args.length or SIZES[args.size]["length"]
    benches = {"jax": lambda: bench_jax(args), "torch": lambda: bench_torch(args)}
    rows = side_by_side(__file__, argv, args, benches, ("jax", "flax", "torch", "transformers"))
    flops = vse_flops(args.size, args.batch, args.length)
    count, region_dim = SIZES[args.size]["regions"]
    title = f"VSE-infinity train step ({args.size}), batch {args.batch}, {count} x {region_dim} regions, " \
            f"{args.length} tokens, {args.precision}"
    print_step_table(rows, flops, args.batch, title, "step", "samples", args.peak_tflops)
    print(f"analytic {flops / 1e9:.2f} GFLOP/step; achieved GFLOP/s: "
          + ", ".join(f"{r['framework']} {flops / r['step_s'] / 1e9:.1f}" for r in rows))
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
