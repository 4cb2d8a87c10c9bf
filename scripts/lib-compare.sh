# shellcheck shell=bash
# The K-FAC vs SGD comparison shared by scripts/demo.sh, scripts/bench.sh and
# scripts/zoo-retrain.sh (sourced from the repository root, not run). Both
# methods start from the same initial weights and, with the same --seed, see
# the same minibatch sequence, so their curves differ by the optimizer alone;
# the table then says when each method first reached each test accuracy.
#
#   compare_setup OUT PARALLEL TIMED [NOTE]
#       builds build/kfac_demo, makes OUT, prints the cores/threads line
#       (NOTE appended). PARALLEL=1: every pair runs side by side, one BLAS
#       thread each (exports OPENBLAS_NUM_THREADS=1 for the rest of the
#       script); 0: one after the other with the environment's BLAS threads.
#       TIMED=1: each run under /usr/bin/time -v, report in OUT/NAME.time.
#   compare_run SGD_CFG KFAC_CFG KFAC_DEMO_ARGS...
#       SGD then K-FAC (or both at once), each with KFAC_DEMO_ARGS (--iters,
#       --eval-every, --seed, --data-dir); writes OUT/results.csv, OUT/sgd.log,
#       OUT/kfac.log, OUT/init.weights (side by side also OUT/{sgd,kfac,init}.csv
#       and OUT/init.log).
#   compare_pair CMD1... -- CMD2...   both at once or in order; fails if either does
#   compare_one NAME CMD...           CMD's stdout to OUT/NAME.log (timed if TIMED)
#   compare_cat DEST CSV...           CSVs into one, the first one's header only
#   compare_table CSV "T1 T2..." ["KEY:MAX..."]
#       per method: iterations and training seconds to each T% test accuracy,
#       final accuracy, seconds per step; then K-FAC/SGD ratios, each checked
#       against its MAX where given (KEY: step = seconds per step, T = seconds
#       to T%).
#   compare_summary CSV DEST
#       DEST: key=value lines (sgd_final_acc, kfac_final_acc, sgd_seconds,
#       kfac_seconds, kfac_seconds_to_sgd_final, kfac_iters_to_sgd_final,
#       ratio_seconds_to_sgd_final), also printed.
#   compare_report ITERS EVAL "T1 T2..." TITLE [YLO]
#       after compare_run: OUT/compare.png (scripts/plot-compare.sh TITLE
#       YLO), the table and OUT/summary.txt; what scripts/demo.sh,
#       scripts/zoo-retrain.sh and scripts/compare.sh end with.

compare_setup() {
    cmp_out=$1 cmp_parallel=$2 cmp_timed=$3
    local note=${4:+ $4} threads
    if [ "$cmp_timed" = 1 ] && [ ! -x /usr/bin/time ]; then
        echo "$(basename "$0"): needs /usr/bin/time (apt-get install time)" >&2; exit 1
    fi
    make --no-print-directory build/kfac_demo >&2
    mkdir -p "$cmp_out"
    # Side by side, one run per core: whatever else loads the machine (a
    # shared VM's speed was seen to swing by 40% within minutes) slows both
    # alike, so ratios are stable; absolute seconds are then one core's.
    if [ "$cmp_parallel" = 1 ]; then
        export OPENBLAS_NUM_THREADS=1
        echo "cores: $(nproc); runs side by side, 1 BLAS thread each$note"
    else
        threads=${OPENBLAS_NUM_THREADS:-${OMP_NUM_THREADS:-}}
        echo "cores: $(nproc); runs one after the other, BLAS threads: ${threads:-OpenBLAS default ($(nproc))}$note"
    fi
}

# kfac_demo's stdout (Darknet's layer table, K-FAC's per-step line) would
# bury the one line per evaluation that stderr shows.
compare_one() {
    local name=$1; shift
    if [ "$cmp_timed" = 1 ]; then
        /usr/bin/time -v -o "$cmp_out/$name.time" "$@" >"$cmp_out/$name.log"
    else
        "$@" >"$cmp_out/$name.log"
    fi
}

compare_pair() {
    local first=() st=0 p1 p2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do first+=("$1"); shift; done
    [ $# -gt 0 ] || { echo "compare_pair: no -- between the two commands" >&2; return 2; }
    shift
    if [ "$cmp_parallel" = 1 ]; then
        "${first[@]}" & p1=$!
        "$@" & p2=$!
        # Both are waited for, so a failed one leaves no orphan training on.
        wait "$p1" || st=$?
        wait "$p2" || st=$?
        return "$st"
    fi
    "${first[@]}" && "$@"
}

compare_cat() {
    local dest=$1; shift
    { cat "$1"; shift; for f in "$@"; do tail -n +2 "$f"; done; } >"$dest"
}

compare_run() {
    local sgd_cfg=$1 kfac_cfg=$2; shift 2
    local o=$cmp_out bin=build/kfac_demo csv_sgd csv_kfac sgd_init
    rm -f "$o/results.csv" "$o/sgd.csv" "$o/kfac.csv" "$o/init.csv" "$o/init.log"
    if [ "$cmp_parallel" = 1 ]; then
        # Neither of two simultaneous runs can save the weights the other
        # loads, so a 1-step run saves them first; kfac_demo appends to its
        # CSV, so each run gets its own until both are done.
        "$bin" train --cfg "$sgd_cfg" --method init "$@" --iters 1 --eval-every 1 \
            --csv "$o/init.csv" --save-init "$o/init.weights" >"$o/init.log" 2>&1
        csv_sgd=$o/sgd.csv csv_kfac=$o/kfac.csv sgd_init=(--init "$o/init.weights")
    else
        csv_sgd=$o/results.csv csv_kfac=$o/results.csv sgd_init=(--save-init "$o/init.weights")
    fi
    compare_pair compare_one sgd "$bin" train --cfg "$sgd_cfg" --method sgd "$@" --csv "$csv_sgd" "${sgd_init[@]}" \
              -- compare_one kfac "$bin" train --cfg "$kfac_cfg" --method kfac "$@" --csv "$csv_kfac" --init "$o/init.weights"
    if [ "$cmp_parallel" = 1 ]; then compare_cat "$o/results.csv" "$csv_sgd" "$csv_kfac"; fi
}

# Accuracy is only measured every --eval-every steps, so "reached" means at
# the first evaluation at or above the threshold (an upper bound on the truth).
compare_table() {
    awk -F, -v thr="$2" -v targets="${3:-}" '
    BEGIN {
        nt = split(thr, T, " ")
        nk = split(targets, K, " ")
        for (i = 1; i <= nk; ++i) { split(K[i], kv, ":"); target[kv[1]] = kv[2] }
    }
    FNR == 1 { next }
    {
        m = $1; if (!(m in seen)) { seen[m] = 1; order[++n] = m }
        for (j = 1; j <= nt; ++j) if (!((m, j) in it) && $5 >= T[j] / 100) { it[m, j] = $2; sec[m, j] = $3 }
        last[m] = $5; lastit[m] = $2; lastsec[m] = $3
    }
    function cell(m, j) { return ((m, j) in it) ? sprintf("%6d it %7.1f s", it[m, j], sec[m, j]) : sprintf("%19s", "not reached") }
    function ratio(lbl, k, s, key,   r, t, verdict) {
        if (s <= 0) { printf "%-44s %8s\n", lbl, "n/a"; return }
        r = k / s; verdict = ""
        if (key in target) { t = target[key]; verdict = "  [target <= " t ": " (r <= t + 0 ? "met" : "NOT met") "]" }
        printf "%-44s %8.3f%s\n", lbl, r, verdict
    }
    function reached(m, j) { return ((m, j) in it) ? "reached" : "not reached" }
    END {
        printf "%-6s", "method"
        for (j = 1; j <= nt; ++j) printf " | %-19s", "to " T[j] "% test acc"
        printf " | %-26s | %s\n", "final acc (steps, train s)", "s/step"
        for (i = 1; i <= n; ++i) {
            m = order[i]; printf "%-6s", m
            for (j = 1; j <= nt; ++j) printf " | %s", cell(m, j)
            printf " | %-26s | %.4f\n", sprintf("%.4f (%5d, %7.1f s)", last[m], lastit[m], lastsec[m]), lastsec[m] / lastit[m]
        }
        if (!("sgd" in last) || !("kfac" in last)) exit
        ratio("K-FAC/SGD step time (amortised)", lastsec["kfac"] / lastit["kfac"], lastsec["sgd"] / lastit["sgd"], "step")
        for (j = 1; j <= nt; ++j) {
            if (!(("sgd", j) in it) || !(("kfac", j) in it)) {
                printf "%-44s not compared: SGD %s, K-FAC %s\n", "K-FAC/SGD to " T[j] "%", reached("sgd", j), reached("kfac", j)
                continue
            }
            ratio("K-FAC/SGD seconds to " T[j] "%", sec["kfac", j], sec["sgd", j], T[j])
            ratio("K-FAC/SGD iterations to " T[j] "%", it["kfac", j], it["sgd", j], "")
        }
    }' "$1"
}

# A run's final accuracy is the mean of its last three evaluations: one
# evaluation of 10000 images moves by a few tenths of a percent from one to
# the next. It is rounded to the CSV's 4 decimals before K-FAC's evaluations
# are compared with it, so that the printed value is the one compared.
compare_summary() {
    awk -F, '
    FNR == 1 { next }
    { m = $1; k = ++n[m]; acc[m, k] = $5; it[m, k] = $2; sec[m, k] = $3 }
    function final(m,   k, s, c) {
        for (k = n[m]; k >= 1 && k > n[m] - 3; --k) { s += acc[m, k]; ++c }
        return sprintf("%.4f", s / c)
    }
    END {
        if (!n["sgd"] || !n["kfac"]) { print "compare_summary: " FILENAME ": needs sgd and kfac rows" > "/dev/stderr"; exit 1 }
        sf = final("sgd"); ss = sec["sgd", n["sgd"]]
        ts = ti = r = "never"
        for (k = 1; k <= n["kfac"]; ++k) if (acc["kfac", k] >= sf + 0) { ts = sec["kfac", k]; ti = it["kfac", k]; break }
        if (ts != "never") r = ss > 0 ? sprintf("%.3f", ts / ss) : "n/a"
        print "sgd_final_acc=" sf
        print "kfac_final_acc=" final("kfac")
        print "sgd_seconds=" ss
        print "kfac_seconds=" sec["kfac", n["kfac"]]
        print "kfac_seconds_to_sgd_final=" ts
        print "kfac_iters_to_sgd_final=" ti
        print "ratio_seconds_to_sgd_final=" r
    }' "$1" >"$2"
    cat "$2"
}

compare_report() {
    local iters=$1 every=$2 thr=$3 title=$4 ylo=${5:-}
    scripts/plot-compare.sh "$cmp_out" "$title" ${ylo:+"$ylo"}
    echo
    echo "results: $cmp_out/results.csv ($iters steps per method, test accuracy on 10000 images every $every steps)"
    compare_table "$cmp_out/results.csv" "$thr"
    echo
    echo "summary: $cmp_out/summary.txt (final = mean of the last 3 evaluations)"
    compare_summary "$cmp_out/results.csv" "$cmp_out/summary.txt"
}
