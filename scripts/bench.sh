#!/bin/bash
# Side-by-side benchmark (`make bench`): SGD and K-FAC on the demo model, same
# data, seed and initial weights, in one invocation on the same machine (K-FAC
# at its defaults, then the hand-tuned settings of *_tuned.cfg), and
# SGD once more on a BLAS=0 (upstream gemm loops) build. Prints K-FAC/SGD
# ratios of amortised seconds per step, of seconds and iterations to 88/90/91%
# test accuracy, of peak RSS, and the upstream-gemm/BLAS SGD step-time ratio,
# each against its target. Timings are only comparable within one run: they
# share the machine's load at that moment. The SGD/K-FAC pair and the table
# are scripts/lib-compare.sh's.
#
# Knobs (environment): BENCH_ITERS (steps per method, default 2000),
# BENCH_EVAL (evaluation interval, default 50), BENCH_GEMM_ITERS (steps for
# the BLAS vs upstream comparison, default 60), BENCH_SEED (1), BENCH_BN=1,
# BENCH_DATA (IDX directory), BENCH_PARALLEL (1, default: each pair side by
# side, one BLAS thread each, so that machine-speed swings hit both alike;
# 0: one after the other, with the BLAS threads of the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-compare.sh

iters=${BENCH_ITERS:-2000}
every=${BENCH_EVAL:-50}
giters=${BENCH_GEMM_ITERS:-60}
seed=${BENCH_SEED:-1}
data=${BENCH_DATA:-/usr/share/datasets/fashion-mnist}
# K-FAC at its defaults (the SGD cfg plus a bare [kfac]), and the hand-tuned
# settings the demo used before (step_size=policy), each side by side with SGD
if [ "${BENCH_BN:-0}" = 1 ]; then sgd_cfg=cfg/fashion_bn_sgd.cfg; kfac_cfg=cfg/fashion_bn_kfac.cfg
else sgd_cfg=cfg/fashion_sgd.cfg; kfac_cfg=cfg/fashion_kfac.cfg; fi
tuned_cfg=${kfac_cfg%.cfg}_tuned.cfg
out=build/bench
parallel=${BENCH_PARALLEL:-1}
compare_setup "$out" "$parallel" 1 "(BENCH_PARALLEL=$parallel); $iters steps per method, eval every $every"

# The BLAS=0 twin: the same patched tree built with upstream gemm loops, with
# its own kfac_demo, rebuilt only when build/darknet was re-patched.
nb=$out/darknet-noblas
if [ ! -f "$nb/libdarknet.a" ] || [ build/darknet/.patched -nt "$nb/libdarknet.a" ]; then
    rm -rf "$nb" && cp -a build/darknet "$nb"
    make --no-print-directory -C "$nb" clean >/dev/null
    make --no-print-directory -C "$nb" KFAC_DIR="$PWD/darknet_kfac" BLAS=0 GPU=0 SANITIZE=0 -j"$(nproc)" >"$out/noblas-build.log" 2>&1 \
        || { echo "bench: BLAS=0 build failed, see $out/noblas-build.log" >&2; exit 1; }
fi
${CC:-cc} -std=gnu99 -O2 darknet_kfac/demo/kfac_demo.c -o "$out/kfac_demo_noblas" \
    -I"$nb/include" -I"$nb/src" -Idarknet_kfac "$nb/libdarknet.a" -llapacke -lopenblas -lm -lpthread -lz

rm -f "$out"/*.csv
compare_run "$sgd_cfg" "$kfac_cfg" --iters "$iters" --eval-every "$every" --seed "$seed" --data-dir "$data"
# gemm comparison: identical SGD runs, evaluation only at the end.
gemm=(--cfg "$sgd_cfg" --iters "$giters" --eval-every "$giters" --seed "$seed" --data-dir "$data" --init "$out/init.weights")
compare_pair compare_one blas build/kfac_demo train "${gemm[@]}" --method sgd_blas --csv "$out/gemm_blas.csv" \
          -- compare_one noblas "$out/kfac_demo_noblas" train "${gemm[@]}" --method sgd_upstream --csv "$out/gemm_noblas.csv"
compare_cat "$out/gemm.csv" "$out/gemm_blas.csv" "$out/gemm_noblas.csv"

echo
compare_table "$out/results.csv" "88 90 91" "step:1.3 90:0.5"
rss() { awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$1"; }
awk -F, -v rs="$(rss "$out/sgd.time")" -v rk="$(rss "$out/kfac.time")" '
FNR == 1 { next }
{ gsec[$1] = $3; git[$1] = $2 }
END {
    printf "%-44s SGD %d MiB, K-FAC %d MiB\n", "peak RSS", rs / 1024, rk / 1024
    printf "%-44s %8.3f\n", "peak RSS K-FAC/SGD", rk / rs
    ub = gsec["sgd_upstream"] / git["sgd_upstream"]; bb = gsec["sgd_blas"] / git["sgd_blas"]
    printf "%-44s upstream %.4f s, BLAS %.4f s\n", "SGD step time (" git["sgd_blas"] " steps)", ub, bb
    r = ub / bb
    printf "%-44s %8.3f  [target >= 2: %s]\n", "SGD step upstream-gemm/BLAS", r, (r >= 2 ? "met" : "NOT met")
}' "$out/gemm.csv"

# Where each method's time goes: kfac_demo's clock around the phases of
# train_network_datum (forward; backward, K-FAC's input captures included;
# the sampled-Fisher pass; update, K-FAC's factors, inverses and
# preconditioning included), then K-FAC's own split from the glue's per-step
# line (statistics = captures + sampled pass + factor update).
echo
grep -h '^phases ' "$out/sgd.log" "$out/kfac.log"
grep '^kfac ' "$out/kfac.log" | awk -F'[ ,;]+' '{
    for (i = 1; i <= NF; ++i) { if ($i == "stats") s += $(i+1); if ($i == "inverses") v += $(i+1); if ($i == "precond") p += $(i+1) }
    n++ } END { if (n) printf "K-FAC seconds per step, amortised: statistics %.4f, inverses %.4f, preconditioning %.4f (%d steps)\n", s/n, v/n, p/n, n }'

# The hand-tuned settings, side by side with SGD once more (their own
# directory, so the pair shares the machine as the first one did).
echo
echo "== the hand-tuned settings ($tuned_cfg, step_size=policy) against SGD"
main_out=$out
compare_setup "$out/tuned" "$parallel" 1 "(BENCH_PARALLEL=$parallel); $iters steps per method"
compare_run "$sgd_cfg" "$tuned_cfg" --iters "$iters" --eval-every "$every" --seed "$seed" --data-dir "$data"
compare_table "$out/tuned/results.csv" "88 90 91" "step:1.3 90:0.5"
grep -h '^phases ' "$out/tuned/kfac.log"
out=$main_out

# The cost of each inverse path on the demo's layers (library only).
${CC:-cc} -std=gnu99 -O2 -Idarknet_kfac darknet_kfac/demo/kfac_bench_inv.c build/rel/libkfac.a \
    -llapacke -lopenblas -lm -o "$out/kfac_bench_inv"
echo
"$out/kfac_bench_inv"
