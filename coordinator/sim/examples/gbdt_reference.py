#!/usr/bin/env python3
"""scikit-learn's HistGradientBoostingClassifier on the Telco split the GBDT
benchmarks use, and the split itself as two CSV files for the simulator.

The split is `train_test_split(test_size=0.2, stratify=y, random_state=42)`
of data/telco-churn; `OUT/train.csv` and `OUT/test.csv` hold the original
rows, which `fedcart-sim --data telco --train OUT/train.csv --test
OUT/test.csv` deals to merchants (and `gbdt_bench` reads). Features are
encoded like the simulator's Telco schema: the four numeric columns (blank
TotalCharges as 0) and one-hot categoricals. Prints the test AUC with
defaults (max_iter=100, learning_rate=0.1, max_leaf_nodes=31, 255 bins,
early_stopping='auto', which is off below 10,000 rows) and the fit time
(best of 3).

    python3 coordinator/sim/examples/gbdt_reference.py data/telco-churn/Telco-Customer-Churn.csv /tmp/gbdt
"""
import os
import sys
import time

import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

path, out = sys.argv[1], sys.argv[2]
raw = pd.read_csv(path, dtype=str, keep_default_na=False)
y = (raw["Churn"] == "Yes").astype(int).to_numpy()
train_idx, test_idx = train_test_split(
    list(range(len(raw))), test_size=0.2, stratify=y, random_state=42
)
os.makedirs(out, exist_ok=True)
raw.iloc[sorted(train_idx)].to_csv(os.path.join(out, "train.csv"), index=False)
raw.iloc[sorted(test_idx)].to_csv(os.path.join(out, "test.csv"), index=False)

numeric = ["SeniorCitizen", "tenure", "MonthlyCharges", "TotalCharges"]
categorical = [c for c in raw.columns if c not in numeric + ["customerID", "Churn"]]
x = pd.DataFrame(
    {c: pd.to_numeric(raw[c].str.strip().replace("", "0")) for c in numeric}
)
x = pd.concat([x, pd.get_dummies(raw[categorical], dtype=float)], axis=1).to_numpy()
xtr, xte, ytr, yte = x[train_idx], x[test_idx], y[train_idx], y[test_idx]
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    clf = HistGradientBoostingClassifier(random_state=0).fit(xtr, ytr)
    best = min(best, time.perf_counter() - t0)
auc = roc_auc_score(yte, clf.predict_proba(xte)[:, 1])
print(
    f"train {len(ytr)} rows, test {len(yte)} rows, {x.shape[1]} features; "
    f"HistGradientBoostingClassifier defaults: AUC {auc:.4f}, "
    f"{clf.n_iter_} trees in {best:.3f} s (best of 3)"
)
