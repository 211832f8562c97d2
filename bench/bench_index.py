"""Training-set index benchmark (issue 4): exact IndexFlatIP vs IVF-PQ on SSCD-sized embeddings.

Builds an index of N random unit vectors of SSCD's dimension (512), queries Q of them, and prints
build and query seconds for both index types and the recall of IVF-PQ against the exact search:

- recall@1 / recall@10 for random queries (worst case for PQ: random high-dimensional vectors
  have almost equidistant neighbours);
- near-duplicate recall@1: queries are database vectors plus noise (cosine ~0.9 to their source),
  which is the case replication detection cares about (SSCD > 0.5).

Run: ``OMP_NUM_THREADS=1 nice -n 19 python bench/bench_index.py [--n 100000] [--queries 1000]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffmem.similarity.index import TrainingIndex
from diffmem.similarity.sscd import SSCD_DIM


class _Precomputed:
    """Embedder stand-in: the benchmark feeds embeddings directly."""

    name = "bench"
    preprocessing = "none"
    dim = SSCD_DIM
    criterion = "sscd_cosine"
    higher_is_better = True

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _unit(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def _build(base: torch.Tensor, threshold: int, args: argparse.Namespace) -> tuple:
    t0 = time.perf_counter()
    index = TrainingIndex(_Precomputed(), ivf_threshold=threshold, pq_m=args.pq_m,
                          nprobe=args.nprobe)
    ids = [str(i) for i in range(base.shape[0])]
    index.add(None, ["c"] * base.shape[0], ids, embeddings=base).optimize()
    return index, time.perf_counter() - t0


def _query(index: TrainingIndex, q: torch.Tensor, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    res = index.search(q, k=k, embedded=True)
    return res.indices.numpy(), time.perf_counter() - t0


def _recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Share of the exact top-k found in the approximate top-k."""
    hits = sum(len(set(a[:k]) & set(e[:k])) for a, e in zip(approx, exact, strict=True))
    return hits / (k * exact.shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="database vectors")
    p.add_argument("--queries", type=int, default=1000, help="query vectors")
    p.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells visited per query")
    p.add_argument("--threads", type=int, default=1, help="faiss / torch threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    base = _unit(rng, args.n, SSCD_DIM)
    queries = _unit(rng, args.queries, SSCD_DIM)
    picks = rng.choice(args.n, args.queries, replace=False)
    near = torch.nn.functional.normalize(base[picks] + 0.5 * queries, dim=-1)  # cos ~0.89

    exact, t_exact = _build(base, args.n + 1, args)
    ivf, t_ivf = _build(base, 0, args)
    ex_i, q_exact = _query(exact, queries, 10)
    iv_i, q_ivf = _query(ivf, queries, 10)
    iv_near, _ = _query(ivf, near, 1)
    ex_near, _ = _query(exact, near, 1)
    print(f"n={args.n} queries={args.queries} dim={SSCD_DIM} threads={args.threads} "
          f"ivf nlist={ivf._faiss.nlist} pq_m={args.pq_m} nprobe={args.nprobe}")
    print(f"exact  (IndexFlatIP): build {t_exact:.2f} s, query {q_exact:.2f} s (k=10)")
    print(f"IVF-PQ (IndexIVFPQ):  build {t_ivf:.2f} s (incl. training), query {q_ivf:.2f} s")
    print(f"IVF-PQ recall vs exact, random queries: @1 {_recall(iv_i, ex_i, 1):.3f}, "
          f"@10 {_recall(iv_i, ex_i, 10):.3f}")
    cos = (near * base[picks]).sum(1).mean()
    print(f"near-duplicate queries (mean cos {cos:.3f} to a database vector): exact finds source "
          f"{(ex_near[:, 0] == picks).mean():.3f}, IVF-PQ recall@1 vs exact "
          f"{(iv_near[:, 0] == ex_near[:, 0]).mean():.3f}")


if __name__ == "__main__":
    main()
