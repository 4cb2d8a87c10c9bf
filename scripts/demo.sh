#!/bin/bash
# K-FAC vs SGD on Fashion-MNIST (`make demo`). Both runs use the same model
# (cfg/fashion_sgd.cfg and cfg/fashion_kfac.cfg differ only in [kfac]), the
# same initial weights (saved by the SGD run, loaded by the K-FAC run), the
# same seed and therefore the same minibatch sequence. Writes
# build/demo/results.csv and build/demo/compare.png and prints, per method,
# the iterations and training seconds to reach 88% and 90% test accuracy.
#
# Knobs (environment): DEMO_ITERS (default 2000 optimizer steps per method),
# DEMO_EVAL (test-set evaluation every N steps, default 50), DEMO_SEED (1),
# DEMO_BN=1 (the batch-normalised cfgs), DEMO_DATA (IDX directory).
set -euo pipefail
cd "$(dirname "$0")/.."

iters=${DEMO_ITERS:-2000}
every=${DEMO_EVAL:-50}
seed=${DEMO_SEED:-1}
data=${DEMO_DATA:-/usr/share/datasets/fashion-mnist}
if [ "${DEMO_BN:-0}" = 1 ]; then sgd_cfg=cfg/fashion_bn_sgd.cfg; kfac_cfg=cfg/fashion_bn_kfac.cfg
else sgd_cfg=cfg/fashion_sgd.cfg; kfac_cfg=cfg/fashion_kfac.cfg; fi
out=build/demo

make --no-print-directory build/kfac_demo >&2
# stdout (Darknet's layer table, K-FAC's per-step line) goes to build/demo/*.log;
# stderr shows one line per evaluation.
mkdir -p "$out"
rm -f "$out/results.csv"

echo "cores: $(nproc), OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-unset (OpenBLAS default: all cores)}"
build/kfac_demo train --cfg "$sgd_cfg" --method sgd --iters "$iters" --eval-every "$every" --seed "$seed" \
    --data-dir "$data" --csv "$out/results.csv" --save-init "$out/init.weights" >"$out/sgd.log"
build/kfac_demo train --cfg "$kfac_cfg" --method kfac --iters "$iters" --eval-every "$every" --seed "$seed" \
    --data-dir "$data" --csv "$out/results.csv" --init "$out/init.weights" >"$out/kfac.log"

scripts/plot-compare.sh "$out" "Fashion-MNIST: K-FAC vs SGD (same initial weights and minibatches)"

# Accuracy is only measured every DEMO_EVAL steps, so "reached" means at the
# first evaluation at or above the threshold (an upper bound on the truth).
echo
echo "results: $out/results.csv ($iters steps per method, test accuracy on 10000 images every $every steps)"
awk -F, '
NR == 1 { next }
{
    m = $1; if (!(m in seen)) { seen[m] = 1; order[++n] = m }
    if (!((m, 88) in it) && $5 >= 0.88) { it[m, 88] = $2; sec[m, 88] = $3 }
    if (!((m, 90) in it) && $5 >= 0.90) { it[m, 90] = $2; sec[m, 90] = $3 }
    last[m] = $5; lastit[m] = $2; lastsec[m] = $3
}
function cell(m, t) { return ((m, t) in it) ? sprintf("%6d it %7.1f s", it[m, t], sec[m, t]) : sprintf("%18s", "not reached") }
END {
    printf "%-6s | %-18s | %-18s | %s\n", "method", "to 88% test acc", "to 90% test acc", "final acc (steps, train s)"
    for (i = 1; i <= n; ++i) {
        m = order[i]
        printf "%-6s | %s | %s | %.4f (%d, %.1f s)\n", m, cell(m, 88), cell(m, 90), last[m], lastit[m], lastsec[m]
    }
}' "$out/results.csv"
