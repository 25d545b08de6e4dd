"""BERT forward + backward, jaxretrieval's `models.bert` against transformers' `BertModel`, same sizes, same machine.

`python benchmarks/bert_step.py [--layers 12] [--batch 64] [--length 64] [--steps 5] [--warmup 2] [--rounds 3]
[--precision fp32|bf16] [--peak-tflops P]`

A step is: embeddings and every layer, the sum of squares of the last hidden states as the loss, its gradient with
respect to every parameter (no optimizer). The jax side is jitted (layers stacked and scanned); the torch side is
eager, with `torch.autocast` for bf16, on CUDA when available. Each framework runs in a fresh process; --rounds
alternates them and reports the median round. FLOPs are counted analytically (the matmuls of every layer,
attention included, x3 for forward and backward).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from harness import add_step_options, print_step_table, save_rows, side_by_side, time_steps, time_torch_step

SIZES = {"vocab_size": 30522, "width": 768, "heads": 12, "ffn_dim": 3072, "max_positions": 512}


def analytic_flops(layers: int, batch: int, length: int) -> float:
    d, f = SIZES["width"], SIZES["ffn_dim"]
    per_token = layers * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * length * d)
    return 3.0 * per_token * batch * length


def bench_jax(args: argparse.Namespace, tokens: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxretrieval.models.bert import Bert

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = Bert(**SIZES, layers=args.layers, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, tokens):
        def loss(p):
            hidden = nnx.merge(graphdef, p)(tokens).astype(jnp.float32)
            return jnp.mean(hidden ** 2)

        return jax.value_and_grad(loss)(params)

    batch = jnp.asarray(tokens)
    first, median, _ = time_steps(lambda: jax.block_until_ready(step(params, batch)), args.warmup, args.steps)
    return {"framework": "jaxretrieval", "device": jax.devices()[0].device_kind, "first_step_s": first,
            "step_s": median}


def bench_torch(args: argparse.Namespace, tokens: np.ndarray) -> dict:
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = transformers.BertConfig(vocab_size=SIZES["vocab_size"], hidden_size=SIZES["width"],
                                     num_hidden_layers=args.layers, num_attention_heads=SIZES["heads"],
                                     intermediate_size=SIZES["ffn_dim"], hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, add_pooling_layer=False)
    model = transformers.BertModel(config, add_pooling_layer=False).to(device).train()
    batch = torch.from_numpy(tokens).long().to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(batch).last_hidden_state.float().pow(2).mean()
        loss.backward()
        loss.item()

    return time_torch_step("transformers", device, step, args.warmup, args.steps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    add_step_options(parser, steps=5, warmup=2)
    args = parser.parse_args(argv)
    tokens = np.random.default_rng(0).integers(1000, SIZES["vocab_size"], (args.batch, args.length))
    benches = {"jax": lambda: bench_jax(args, tokens), "torch": lambda: bench_torch(args, tokens)}
    rows = side_by_side(__file__, argv, args, benches, ("jax", "flax", "torch", "transformers"))
    flops = analytic_flops(args.layers, args.batch, args.length)
    title = f"BERT-base forward + backward, {args.layers} layers, batch {args.batch} x {args.length} tokens, " \
            f"{args.precision}"
    print_step_table(rows, flops, args.batch, title, "step", "sequences", args.peak_tflops)
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
