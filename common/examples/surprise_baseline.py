"""Surprise SVD and BaselineOnly on the exact split exported by fedcart.

    cargo run --release -p fedcart-common --example mf_movielens -- explicit --export /tmp/mlsplit
    python3 common/examples/surprise_baseline.py /tmp/mlsplit

Trains on train.csv, reports test RMSE on test.csv, and times one SVD epoch
(`SVD(n_epochs=1, n_factors=32)` and 100 factors) on the full ratings file for
the benchmark comparison in BENCHMARKS.md.
"""

import sys
import time

import csv

from surprise import SVD, BaselineOnly, Dataset, Reader, accuracy


def load(path):
    """(user, item, rating) triples with string ids, as fedcart wrote them."""
    with open(path, newline="") as f:
        return [(r["user"], r["item"], float(r["rating"])) for r in csv.DictReader(f)]


def build(rows):
    """A Surprise trainset from triples (no pandas needed)."""
    reader = Reader(line_format="user item rating", sep=",", rating_scale=(0.5, 5.0))
    ds = Dataset(reader)
    ds.raw_ratings = [(u, i, r, None) for u, i, r in rows]
    return ds.construct_trainset(ds.raw_ratings)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/mlsplit"
    train = build(load(f"{d}/train.csv"))
    test = load(f"{d}/test.csv")
    for name, algo in [
        ("SVD()", SVD(random_state=0)),
        ("SVD(n_factors=32)", SVD(n_factors=32, random_state=0)),
        ("BaselineOnly()", BaselineOnly(verbose=False)),
    ]:
        algo.fit(train)
        rmse = accuracy.rmse(algo.test(test), verbose=False)
        print(f"{name:20} test RMSE {rmse:.4f}")

    all_set = build(load(f"{d}/train.csv") + load(f"{d}/test.csv"))
    for k in (32, 100):
        times = []
        for _ in range(5):
            algo = SVD(n_epochs=1, n_factors=k, random_state=0)
            t = time.perf_counter()
            algo.fit(all_set)
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"SVD(n_epochs=1, n_factors={k}) fit on {all_set.n_ratings} ratings: "
              f"median {1000 * times[2]:.1f} ms (min {1000 * times[0]:.1f})")


if __name__ == "__main__":
    main()
