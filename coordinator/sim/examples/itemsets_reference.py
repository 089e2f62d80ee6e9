#!/usr/bin/env python3
"""Pooled reference for `fedcart-sim --task rules`: mlxtend's apriori and
association_rules on the baskets of an orders export (a basket is one
customer at one timestamp), written as JSON for the Rust test.

    python3 coordinator/sim/examples/itemsets_reference.py \
        data/grocery/orders.csv 100 0.1 data/grocery/mlxtend-min100.json

Items bought in fewer than MIN baskets are dropped from the one-hot matrix
before apriori (no such item can be in a frequent itemset, supports are still
over all baskets): a dense 22k x 28k matrix would not fit in memory otherwise.
"""
import json
import sys
import time

import pandas as pd
from mlxtend.frequent_patterns import apriori, association_rules

path, min_count, min_conf, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
d = pd.read_csv(path, dtype={"customer": str, "item": str, "timestamp": str})
t_read = time.perf_counter() - t0
t0 = time.perf_counter()
lines = d[["customer", "timestamp", "item"]].drop_duplicates()
n_baskets = lines.groupby(["customer", "timestamp"]).ngroups
counts = lines["item"].value_counts()
keep = counts[counts >= min_count].index
lines = lines[lines["item"].isin(keep)]
onehot = pd.crosstab([lines["customer"], lines["timestamp"]], lines["item"]).astype(bool)
# Baskets with no frequent item still count in the denominator.
missing = n_baskets - len(onehot)
if missing:
    pad = pd.DataFrame(False, index=range(missing), columns=onehot.columns)
    onehot = pd.concat([onehot.reset_index(drop=True), pad], ignore_index=True)
min_support = min_count / n_baskets
t_prep = time.perf_counter() - t0
t0 = time.perf_counter()
freq = apriori(onehot, min_support=min_support, use_colnames=True)
t_apriori = time.perf_counter() - t0
t0 = time.perf_counter()
rules = association_rules(freq, metric="confidence", min_threshold=min_conf)
t_rules = time.perf_counter() - t0
itemsets = sorted(
    ([sorted(s), int(round(sup * n_baskets))] for s, sup in zip(freq["itemsets"], freq["support"])),
    key=lambda x: (len(x[0]), x[0]),
)
rule_rows = sorted(
    [sorted(a), sorted(c), float(s), float(cf), float(l)]
    for a, c, s, cf, l in zip(
        rules["antecedents"], rules["consequents"], rules["support"], rules["confidence"], rules["lift"]
    )
)
json.dump(
    {"baskets": n_baskets, "min_count": min_count, "min_confidence": min_conf,
     "itemsets": itemsets, "rules": rule_rows},
    open(out, "w"), indent=0,
)
print(f"baskets {n_baskets}, frequent itemsets {len(itemsets)}, rules {len(rule_rows)}")
print(f"seconds: read {t_read:.3f}, one-hot {t_prep:.3f}, apriori {t_apriori:.3f}, rules {t_rules:.3f}")
