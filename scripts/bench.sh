#!/bin/bash
# Side-by-side benchmark (`make bench`): SGD and K-FAC on the demo model, same
# data, seed and initial weights, in one invocation on the same machine, and
# SGD once more on a BLAS=0 (upstream gemm loops) build. Prints K-FAC/SGD
# ratios of amortised seconds per step, of seconds and iterations to 88/90/91%
# test accuracy, of peak RSS, and the upstream-gemm/BLAS SGD step-time ratio,
# each against its target. Timings are only comparable within one run: they
# share the machine's load at that moment.
#
# Knobs (environment): BENCH_ITERS (steps per method, default 2000),
# BENCH_EVAL (evaluation interval, default 50), BENCH_GEMM_ITERS (steps for
# the BLAS vs upstream comparison, default 60), BENCH_SEED (1), BENCH_BN=1,
# BENCH_PARALLEL (1: runs side by side, see below; 0: one after the other).
set -euo pipefail
cd "$(dirname "$0")/.."

iters=${BENCH_ITERS:-2000}
every=${BENCH_EVAL:-50}
giters=${BENCH_GEMM_ITERS:-60}
seed=${BENCH_SEED:-1}
data=${BENCH_DATA:-/usr/share/datasets/fashion-mnist}
if [ "${BENCH_BN:-0}" = 1 ]; then sgd_cfg=cfg/fashion_bn_sgd.cfg; kfac_cfg=cfg/fashion_bn_kfac.cfg
else sgd_cfg=cfg/fashion_sgd.cfg; kfac_cfg=cfg/fashion_kfac.cfg; fi
out=build/bench
[ -x /usr/bin/time ] || { echo "bench: needs /usr/bin/time (apt-get install time)" >&2; exit 1; }

make --no-print-directory build/kfac_demo >&2
mkdir -p "$out"

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

# BENCH_PARALLEL=1 (default): the two runs of each comparison go side by
# side, one BLAS thread each, one per core, so that whatever else loads the
# machine (a shared VM's speed was seen to swing by 40% within minutes)
# slows both alike; the ratios are then stable, the absolute seconds are
# those of one core. BENCH_PARALLEL=0: one after the other, with the BLAS
# threads of the environment (OpenBLAS default: all cores).
parallel=${BENCH_PARALLEL:-1}
if [ "$parallel" = 1 ]; then
    export OPENBLAS_NUM_THREADS=1
    echo "cores: $(nproc); runs side by side, 1 BLAS thread each (BENCH_PARALLEL=1); $iters steps per method, eval every $every"
else
    threads=${OPENBLAS_NUM_THREADS:-${OMP_NUM_THREADS:-}}
    echo "cores: $(nproc); runs one after the other, BLAS threads: ${threads:-OpenBLAS default ($(nproc))}; $iters steps per method, eval every $every"
fi

rm -f "$out"/*.csv
run() {  # run NAME RSSFILE kfac_demo-args...
    local name=$1 rss=$2; shift 2
    /usr/bin/time -v -o "$rss" "$@" >"$out/$name.log"
}
pair() {  # pair CMD1 CMD2: both at once (parallel) or in order; fails if either does
    if [ "$parallel" = 1 ]; then
        eval "$1" & local p1=$!
        eval "$2" & local p2=$!
        wait $p1 && wait $p2
    else
        eval "$1" && eval "$2"
    fi
}
# The initial weights both methods start from.
build/kfac_demo train --cfg "$sgd_cfg" --method init --iters 1 --eval-every 1 --seed "$seed" \
    --data-dir "$data" --csv "$out/init.csv" --save-init "$out/init.weights" >"$out/init.log" 2>&1
pair 'run sgd "$out/sgd.time" build/kfac_demo train --cfg "$sgd_cfg" --method sgd --iters "$iters" --eval-every "$every" \
        --seed "$seed" --data-dir "$data" --csv "$out/sgd.csv" --init "$out/init.weights"' \
     'run kfac "$out/kfac.time" build/kfac_demo train --cfg "$kfac_cfg" --method kfac --iters "$iters" --eval-every "$every" \
        --seed "$seed" --data-dir "$data" --csv "$out/kfac.csv" --init "$out/init.weights"'
# gemm comparison: identical SGD runs, evaluation only at the end.
pair 'run blas "$out/blas.time" build/kfac_demo train --cfg "$sgd_cfg" --method sgd_blas --iters "$giters" --eval-every "$giters" \
        --seed "$seed" --data-dir "$data" --csv "$out/gemm_blas.csv" --init "$out/init.weights"' \
     'run noblas "$out/noblas.time" "$out/kfac_demo_noblas" train --cfg "$sgd_cfg" --method sgd_upstream --iters "$giters" \
        --eval-every "$giters" --seed "$seed" --data-dir "$data" --csv "$out/gemm_noblas.csv" --init "$out/init.weights"'
cat "$out/sgd.csv" > "$out/results.csv"; tail -n +2 "$out/kfac.csv" >> "$out/results.csv"
cat "$out/gemm_blas.csv" > "$out/gemm.csv"; tail -n +2 "$out/gemm_noblas.csv" >> "$out/gemm.csv"

rss() { awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$1"; }
echo
awk -F, -v rs="$(rss "$out/sgd.time")" -v rk="$(rss "$out/kfac.time")" '
FNR == 1 { next }
FILENAME ~ /gemm/ { gsec[$1] = $3; git[$1] = $2; next }
{
    m = $1; last_it[m] = $2; last_s[m] = $3; acc[m] = $5
    for (t = 88; t <= 91; ++t) if (!((m, t) in it) && $5 >= t / 100) { it[m, t] = $2; sec[m, t] = $3 }
}
function ratio(k, s, target, lbl,   r, verdict) {
    r = k / s
    verdict = target == "" ? "" : (r <= target ? "  [target <= " target ": met]" : "  [target <= " target ": NOT met]")
    printf "%-44s %8.3f%s\n", lbl, r, verdict
}
END {
    sps = last_s["sgd"] / last_it["sgd"]; kps = last_s["kfac"] / last_it["kfac"]
    printf "%-44s %8.4f s  (SGD %.4f s)\n", "mean seconds per step, K-FAC", kps, sps
    ratio(kps, sps, 1.3, "step time K-FAC/SGD (amortised)")
    for (t = 88; t <= 91; t += (t == 88 ? 2 : 1)) {
        if (!(("sgd", t) in it) || !(("kfac", t) in it)) {
            printf "%-44s %s\n", t "% test accuracy", sprintf("not compared: SGD %s, K-FAC %s", \
                (("sgd", t) in it) ? "reached" : "not reached", (("kfac", t) in it) ? "reached" : "not reached")
            continue
        }
        printf "%-44s SGD %d it %.1f s, K-FAC %d it %.1f s\n", "to " t "% test accuracy:", it["sgd", t], sec["sgd", t], it["kfac", t], sec["kfac", t]
        ratio(sec["kfac", t], sec["sgd", t], t == 90 ? 0.5 : "", "  seconds to " t "% K-FAC/SGD")
        ratio(it["kfac", t], it["sgd", t], "", "  iterations to " t "% K-FAC/SGD")
    }
    printf "%-44s SGD %.4f, K-FAC %.4f\n", "final test accuracy", acc["sgd"], acc["kfac"]
    printf "%-44s SGD %d MiB, K-FAC %d MiB\n", "peak RSS", rs / 1024, rk / 1024
    ratio(rk, rs, "", "peak RSS K-FAC/SGD")
    ub = gsec["sgd_upstream"] / git["sgd_upstream"]; bb = gsec["sgd_blas"] / git["sgd_blas"]
    printf "%-44s upstream %.4f s, BLAS %.4f s\n", "SGD step time (" git["sgd_blas"] " steps)", ub, bb
    r = ub / bb
    printf "%-44s %8.3f  [target >= 2: %s]\n", "SGD step upstream-gemm/BLAS", r, (r >= 2 ? "met" : "NOT met")
}' "$out/results.csv" "$out/gemm.csv"

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

# The cost of each inverse path on the demo's layers (library only).
${CC:-cc} -std=gnu99 -O2 -Idarknet_kfac darknet_kfac/demo/kfac_bench_inv.c build/rel/libkfac.a \
    -llapacke -lopenblas -lm -o "$out/kfac_bench_inv"
echo
"$out/kfac_bench_inv"
