#!/usr/bin/env python3
"""Pooled reference for `fedcart-sim --task segments`: scikit-learn's KMeans
(k-means++, n_init=10) on the customers' RFM features, standardised (population
standard deviation, like the federated statistics step).

The pooled rows are the ones the simulator derived: `segments.csv` written by
`--out DIR` holds every merchant's customers with their raw features, each column under
its feature's name after `merchant,row,customer,segment`.

    target/release/fedcart-sim --task segments:4 --data orders --merchants 10 \
        --rounds 30 --seed 7 --out /tmp/seg
    python3 coordinator/sim/examples/kmeans_reference.py /tmp/seg/segments.csv 4
"""
import sys
import time

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

path, k = sys.argv[1], int(sys.argv[2])
d = pd.read_csv(path)
x = d[d.columns[list(d.columns).index("segment") + 1 :]].to_numpy(dtype=np.float64)
x = StandardScaler().fit_transform(x)
t0 = time.perf_counter()
km = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=0).fit(x)
seconds = time.perf_counter() - t0
print(f"rows {len(x)}, k {k}, inertia {km.inertia_:.4f}, iterations {km.n_iter_}, seconds {seconds:.3f}")
if len(sys.argv) > 3:
    for kk in range(2, 9):
        print(kk, KMeans(n_clusters=kk, init="k-means++", n_init=10, random_state=0).fit(x).inertia_)
