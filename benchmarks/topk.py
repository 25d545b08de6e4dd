"""Exact top-k retrieval by dot product: jaxretrieval against PyTorch and numpy, same data, same machine.

`python benchmarks/topk.py --queries 10000 --gallery 100000 --dim 512 --k 10 --chunk 1024 [--rounds 3]`

- jax: `jaxretrieval.retrieval.similarity.topk_similarity` over a mesh of all local devices (query chunks
  of --chunk rows, gallery scanned in chunks of --gallery-chunk rows, running top-k, ties to the lower index).
- torch: per query chunk, `q @ g.T` against the whole gallery then `torch.topk`; on CUDA when available.
- numpy: per query chunk, `q @ g.T` then `np.argpartition` and a sort of the k survivors.

All three start from the same float32 host arrays (L2-normalised random vectors) and end with (Q, k) host
arrays, so host-to-device copies are inside the timing. Each round times every framework once, in turn;
the median round is reported. A first call on one query chunk (jax compilation, CUDA start-up) comes
before the rounds and is reported separately. TFLOP/s counts only the matrix product: 2 * Q * G * dim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from importlib.metadata import version

import numpy as np
from harness import cpu_name

Search = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def random_unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def jax_search(k: int, chunk: int, gallery_chunk: int) -> tuple[Search, str]:
    import jax

    from jaxretrieval.config import MeshConfig
    from jaxretrieval.retrieval.similarity import topk_similarity
    from jaxretrieval.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    device = f"{jax.default_backend()} x{mesh.devices.size} ({jax.devices()[0].device_kind})"
    return (lambda q, g: topk_similarity(q, g, k, mesh=mesh, query_chunk=chunk, gallery_chunk=gallery_chunk),
            device)


def torch_search(k: int, chunk: int) -> tuple[Search, str]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def search(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gallery = torch.from_numpy(g).to(device)
        scores, indices = [], []
        with torch.inference_mode():
            for start in range(0, len(q), chunk):
                values, index = torch.topk(torch.from_numpy(q[start:start + chunk]).to(device) @ gallery.T, k, dim=1)
                scores.append(values.cpu().numpy())
                indices.append(index.cpu().numpy())
        return np.concatenate(scores), np.concatenate(indices).astype(np.int32)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return search, name


def numpy_search(k: int, chunk: int) -> tuple[Search, str]:
    def search(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = [], []
        for start in range(0, len(q), chunk):
            s = q[start:start + chunk] @ g.T
            index = np.sort(np.argpartition(-s, k - 1, axis=1)[:, :k], axis=1)
            values = np.take_along_axis(s, index, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            scores.append(np.take_along_axis(values, order, axis=1))
            indices.append(np.take_along_axis(index, order, axis=1))
        return np.concatenate(scores), np.concatenate(indices).astype(np.int32)

    return search, "cpu"


def exact_scores(q: np.ndarray, g: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 dot products of each query with the gallery rows it returned, in the order returned."""
    return np.einsum("qd,qkd->qk", q.astype(np.float64), g[indices].astype(np.float64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=1024, help="query rows per chunk (all three frameworks)")
    parser.add_argument("--gallery-chunk", type=int, default=65536, help="gallery rows per scan step (jax)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    q, g = random_unit(args.queries, args.dim, rng), random_unit(args.gallery, args.dim, rng)
    frameworks = {"jaxretrieval": jax_search(args.k, args.chunk, args.gallery_chunk),
                  "torch": torch_search(args.k, args.chunk), "numpy": numpy_search(args.k, args.chunk)}

    first, times, results = {}, {name: [] for name in frameworks}, {}
    for name, (search, _) in frameworks.items():
        start = time.perf_counter()
        search(q[:args.chunk], g)
        first[name] = time.perf_counter() - start
    for _ in range(args.rounds):
        for name, (search, _) in frameworks.items():
            start = time.perf_counter()
            results[name] = search(q, g)
            times[name].append(time.perf_counter() - start)

    reference = exact_scores(q, g, results["jaxretrieval"][1])
    flop = 2.0 * args.queries * args.gallery * args.dim
    rows, agree = [], True
    for name, (_, device) in frameworks.items():
        scores, indices = results[name]
        same_scores = np.allclose(exact_scores(q, g, indices), reference, atol=1e-5)
        agree &= bool(same_scores) and bool(np.allclose(scores, results["jaxretrieval"][0], atol=1e-5))
        seconds = statistics.median(times[name])
        rows.append({"framework": name, "device": device, "seconds": seconds, "queries_per_s": args.queries / seconds,
                     "tflops": flop / seconds / 1e12, "first_call_s": first[name],
                     "rounds_s": times[name], "same_indices": float(np.mean(indices == results["jaxretrieval"][1]))})

    print(f"exact top-{args.k}: {args.queries} queries x {args.gallery} gallery x {args.dim} dims, float32, "
          f"query chunk {args.chunk}, median of {args.rounds} rounds")
    print("| framework | device | time (s) | queries/s | TFLOP/s | first call (s) | rounds (s) | same indices as jax |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['framework']} | {r['device']} | {r['seconds']:.2f} | {r['queries_per_s']:,.0f} | "
              f"{r['tflops']:.3f} | {r['first_call_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['rounds_s'])} | "
              f"{100 * r['same_indices']:.3f}% |")
    print("agreement: " + ("all three return the same top-k scores (float64 re-check, atol 1e-5)" if agree
                           else "MISMATCH beyond near-ties"))
    versions = {p: version(p) for p in ("jax", "jaxlib", "torch", "numpy")}
    print(f"host: {cpu_name()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          + ", ".join(f"{p} {v}" for p, v in versions.items()) + f"; {date.today()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "agree": agree, "versions": versions}, f, indent=2)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
