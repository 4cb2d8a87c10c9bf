#!/bin/bash
# K-FAC vs SGD on Fashion-MNIST (`make demo`). Both runs use the same model
# (cfg/fashion_sgd.cfg and cfg/fashion_kfac.cfg differ only in [kfac]), the
# same initial weights and the same minibatch sequence (scripts/lib-compare.sh).
# Writes build/demo/results.csv, compare.png and summary.txt and prints, per
# method, the iterations and training seconds to reach 88% and 90% test
# accuracy, the final accuracy and the K-FAC/SGD ratios, then the summary
# (scripts/lib-compare.sh's compare_report, as scripts/compare.sh does). The
# cfgs run as they are: their own input, classes and schedule.
#
# Knobs (environment): DEMO_ITERS (default 2000 optimizer steps per method),
# DEMO_EVAL (test-set evaluation every N steps, default 50), DEMO_SEED (1),
# DEMO_BN=1 (the batch-normalised cfgs), DEMO_DATA (IDX directory).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-compare.sh

iters=${DEMO_ITERS:-2000}
every=${DEMO_EVAL:-50}
seed=${DEMO_SEED:-1}
data=${DEMO_DATA:-/usr/share/datasets/fashion-mnist}
if [ "${DEMO_BN:-0}" = 1 ]; then sgd_cfg=cfg/fashion_bn_sgd.cfg; kfac_cfg=cfg/fashion_bn_kfac.cfg
else sgd_cfg=cfg/fashion_sgd.cfg; kfac_cfg=cfg/fashion_kfac.cfg; fi
out=build/demo

compare_setup "$out" 0 0
compare_run "$sgd_cfg" "$kfac_cfg" --iters "$iters" --eval-every "$every" --seed "$seed" --data-dir "$data"
compare_report "$iters" "$every" "88 90" "Fashion-MNIST: K-FAC vs SGD (same initial weights and minibatches)"
