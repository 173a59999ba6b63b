"""Build and search times of the retrieval index's three searchers on synthetic embeddings.

    python bench/bench_retrieval.py [--n 200000] [--dim 512] [--queries 1000] [--k 16] [--searchers flat numpy]

The vectors are unit-length and clustered (2,000 centres, each point its centre plus Gaussian
noise), closer to trunk embeddings than uniform noise, which no index can compress. Prints,
for faiss's exact flat index, the IVF-PQ index geocell switches to past the memory budget
(forced here with a budget of 0) and the blocked numpy fallback: build seconds, search
seconds for the queries, memory per vector, and the IVF-PQ's recall of the exact top-k.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from geocell.infer.retrieval import Searcher, ivfpq_shape, normalise


def clustered(n: int, dim: int, centres: int, rng: np.random.Generator) -> np.ndarray:
    c = normalise(rng.normal(size=(centres, dim)))
    which = rng.integers(0, centres, n)
    return normalise(c[which] + rng.normal(scale=0.6 / np.sqrt(dim), size=(n, dim)).astype(np.float32) * 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--searchers", nargs="+", default=["flat", "ivfpq", "numpy"],
                    choices=["flat", "ivfpq", "numpy"], help="which to run (IVF-PQ's build dominates past 1M)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vectors = clustered(args.n, args.dim, args.centres, rng)
    queries = clustered(args.queries, args.dim, args.centres, np.random.default_rng(0))[::-1].copy()
    queries = normalise(queries + rng.normal(scale=0.3 / np.sqrt(args.dim), size=queries.shape))
    lists, m = ivfpq_shape(args.n, args.dim)
    print(f"{args.n} x {args.dim} unit vectors ({args.n * args.dim * 4 / 2 ** 30:.2f} GiB as float32), "
          f"{args.queries} queries, k = {args.k}; IVF-PQ: {lists} lists, {m} bytes per vector")
    exact = None
    searchers = (("flat", "faiss flat", {}), ("ivfpq", "faiss IVF-PQ", {"memory_budget": 0}),
                 ("numpy", "numpy", {"backend": "numpy"}))
    for key, name, kwargs in searchers:
        if key not in args.searchers:
            continue
        t0 = time.perf_counter()
        searcher = Searcher(vectors, **kwargs)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, idx = searcher.search(queries, args.k)
        searched = time.perf_counter() - t0
        per_vector = {"flat": args.dim * 4, "ivfpq": m + 8, "numpy": args.dim * vectors.itemsize}[searcher.kind]
        line = (f"{name:13s} build {built:7.2f} s   search {searched:7.2f} s "
                f"({1000 * searched / args.queries:.2f} ms/query)   {per_vector} bytes/vector")
        if exact is None:
            exact = idx
        else:
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(idx, exact)])
            line += f"   recall@{args.k} {recall:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
