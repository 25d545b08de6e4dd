"""Exact top-k retrieval by dot product: jaxretrieval against torch, faiss and numpy, same data, same machine.

`python benchmarks/topk.py --queries 10000 --gallery 100000 --dim 512 --k 10,100,1000 [--dtype bfloat16]
[--chunk 1024] [--rounds 3] [--frameworks jax,jax-resident,torch,faiss,numpy]`

- jax: `topk_similarity` over a mesh of all local devices, host arrays in and out: the gallery is placed on the
  devices inside the timing (query chunks of --chunk rows, gallery chunks sized from device memory unless
  --gallery-chunk is given).
- jax-resident: a `GalleryIndex` built once outside the timing, then `index.search(queries, k)`: what a user who
  searches one gallery many times pays.
- torch: per query chunk, `q @ g.T` against the whole gallery on the device, then `torch.topk` (CUDA when
  available), the loop a user would write.
- faiss: `IndexFlatIP` (on the GPU with faiss-gpu where it is installed), where faiss imports.
- numpy: per query chunk, `q @ g.T`, `np.argpartition` and a sort of the k survivors (float32 only).

All start from the same host arrays (L2-normalised random vectors, in --dtype) and end with (Q, k) host arrays.
Each round times every framework once, in turn; the median round is reported. A first call on one query chunk
(compilation, CUDA start-up) comes before the rounds. TFLOP/s counts the matrix product only, 2 * Q * G * dim;
"of ceiling" divides it by the rate of the bare product on this device (one jitted chunk x gallery-chunk matmul
in the same dtype, timed in the same run).
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
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from harness import cpu_name

Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def random_unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def jax_mesh():
    import jax

    from jaxretrieval.config import MeshConfig
    from jaxretrieval.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    return mesh, f"{jax.default_backend()} x{mesh.devices.size} ({jax.devices()[0].device_kind})"


def jax_search(chunk: int, gallery_chunk: int | None) -> tuple[Search, str]:
    from jaxretrieval.retrieval.similarity import topk_similarity

    mesh, device = jax_mesh()
    return (lambda q, g, k: topk_similarity(q, g, k, mesh=mesh, query_chunk=chunk, gallery_chunk=gallery_chunk),
            device)


def jax_resident(chunk: int, gallery_chunk: int | None) -> tuple[Search, str]:
    from jaxretrieval.retrieval.index import GalleryIndex

    mesh, device = jax_mesh()
    built: dict[int, GalleryIndex] = {}

    def search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if id(g) not in built:  # placed once (the first call, outside the rounds)
            built[id(g)] = GalleryIndex(g, mesh=mesh, query_chunk=chunk, gallery_chunk=gallery_chunk)
        return built[id(g)].search(q, k)

    return search, device + ", gallery resident"


def torch_search(chunk: int) -> tuple[Search, str]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        gallery = as_torch(g, device)
        scores, indices = [], []
        with torch.inference_mode():
            for start in range(0, len(q), chunk):
                values, index = torch.topk(as_torch(q[start:start + chunk], device) @ gallery.T, k, dim=1)
                scores.append(values.float().cpu().numpy())
                indices.append(index.cpu().numpy())
        return np.concatenate(scores), np.concatenate(indices).astype(np.int32)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return search, name


def as_torch(x: np.ndarray, device):
    import torch

    if x.dtype.name == "bfloat16":  # torch reads no ml_dtypes array: move its bits
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(x).to(device)


def faiss_search() -> tuple[Search, str]:
    import faiss

    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0

    def search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = faiss.IndexFlatIP(g.shape[1])
        if gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(np.ascontiguousarray(g, np.float32))
        scores, indices = index.search(np.ascontiguousarray(q, np.float32), k)
        return scores, indices.astype(np.int32)

    return search, "faiss " + ("gpu" if gpu else f"cpu, {faiss.omp_get_max_threads()} threads")


def numpy_search(chunk: int) -> tuple[Search, str]:
    def search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def matmul_ceiling(q: np.ndarray, g: np.ndarray, chunk: int, rounds: int = 5) -> float:
    """TFLOP/s of the bare (chunk, dim) x (dim, rows) product on the jax device, in the inputs' dtype (float32
    accumulation; float32 inputs at full precision), median of `rounds`."""
    import jax

    from jaxretrieval.retrieval.index import scores

    rows = min(len(g), 1 << 16)
    a, b = jax.device_put(q[:chunk]), jax.device_put(g[:rows])
    product = jax.jit(scores)  # the product stays on the device: waited for, never transferred
    jax.block_until_ready(product(a, b))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        times.append(time.perf_counter() - start)
    return 2.0 * len(a) * rows * q.shape[1] / statistics.median(times) / 1e12


def exact_scores(q: np.ndarray, g: np.ndarray, indices: np.ndarray, rows: int = 256) -> np.ndarray:
    """float64 dot products of each query with the gallery rows it returned, in the order returned (a few queries at
    a time: the gathered rows of all of them would not fit in memory for large k)."""
    return np.concatenate([np.einsum("qd,qkd->qk", q[i:i + rows].astype(np.float64),
                                     g[indices[i:i + rows]].astype(np.float64)) for i in range(0, len(q), rows)])


def package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", default="10", help="comma-separated k values")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--chunk", type=int, default=1024, help="query rows per chunk (every framework)")
    parser.add_argument("--gallery-chunk", type=int, default=None, help="gallery rows per scan step (jax)")
    parser.add_argument("--frameworks", default="jax,jax-resident,torch,faiss,numpy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.k.split(",")]

    import ml_dtypes

    rng = np.random.default_rng(args.seed)
    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
    q = random_unit(args.queries, args.dim, rng).astype(dtype)
    g = random_unit(args.gallery, args.dim, rng).astype(dtype)
    makers = {"jax": lambda: jax_search(args.chunk, args.gallery_chunk),
              "jax-resident": lambda: jax_resident(args.chunk, args.gallery_chunk),
              "torch": lambda: torch_search(args.chunk), "faiss": faiss_search,
              "numpy": lambda: numpy_search(args.chunk)}
    frameworks = {}
    for name in args.frameworks.split(","):
        if name == "numpy" and args.dtype != "float32":
            continue
        try:
            frameworks[name] = makers[name]()
        except ImportError as e:
            print(f"{name}: not run ({e})")
    ceiling = matmul_ceiling(q, g, args.chunk)
    flop = 2.0 * args.queries * args.gallery * args.dim
    print(f"\nexact top-k: {args.queries} queries x {args.gallery} gallery x {args.dim} dims, {args.dtype}, query "
          f"chunk {args.chunk}, median of {args.rounds} rounds; bare matmul on the jax device: {ceiling:.3f} TFLOP/s")
    print("| k | framework | device | time (s) | queries/s | TFLOP/s | of ceiling | first call (s) | rounds (s) | "
          "same indices as the first |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows, agree = [], True
    for k in ks:
        first, times, results = {}, {name: [] for name in frameworks}, {}
        for name, (search, _) in frameworks.items():
            start = time.perf_counter()
            search(q[:args.chunk], g, k)
            first[name] = time.perf_counter() - start
        for _ in range(args.rounds):
            for name, (search, _) in frameworks.items():
                start = time.perf_counter()
                results[name] = search(q, g, k)
                times[name].append(time.perf_counter() - start)
        reference_name = next(iter(results))
        reference = exact_scores(q, g, results[reference_name][1])
        tolerance = 1e-5 if args.dtype == "float32" else 2e-3  # bf16 products rounded differently by each side
        for name, (_, device) in frameworks.items():
            scores, indices = results[name]
            same = np.allclose(exact_scores(q, g, indices), reference, atol=tolerance)
            agree &= bool(same)
            seconds = statistics.median(times[name])
            rows.append({"k": k, "framework": name, "device": device, "seconds": seconds,
                         "queries_per_s": args.queries / seconds, "tflops": flop / seconds / 1e12,
                         "of_ceiling": flop / seconds / 1e12 / ceiling, "first_call_s": first[name],
                         "rounds_s": times[name],
                         "same_indices": float(np.mean(indices == results[reference_name][1]))})
            r = rows[-1]
            print(f"| {k} | {name} | {device} | {r['seconds']:.3f} | {r['queries_per_s']:,.0f} | {r['tflops']:.3f} | "
                  f"{r['of_ceiling']:.0%} | {r['first_call_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['rounds_s'])} | "
                  f"{100 * r['same_indices']:.3f}% |", flush=True)

    print("agreement: " + ("every framework returns the same top-k scores (float64 re-check)" if agree
                           else "MISMATCH beyond near-ties"))
    versions = {p: package(p) for p in ("jax", "jaxlib", "torch", "numpy", "faiss-cpu", "faiss-gpu")}
    print(f"host: {cpu_name()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          + ", ".join(f"{p} {v}" for p, v in versions.items() if v != "-") + f"; {date.today()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "agree": agree, "versions": versions,
                       "ceiling_tflops": ceiling}, f, indent=2)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
