#!/bin/bash
# Seconds per training step of each cfg/zoo network with K-FAC (its [kfac]
# section, default max_factor_dim policy) and with Darknet's SGD (the same cfg
# without [kfac]), through the real `darknet classifier|detector train`, on
# the synthetic data of scripts/zoo-data.sh. Prints a markdown table for
# docs/zoo.md. Step 1 includes the first inverse of every block (K-FAC then
# inverts every invert_every=20 steps); "steady" is the mean of the later
# steps, which have no inverse.
#
#   scripts/zoo-bench.sh [SIZE_CLS=64] [SIZE_DET=96] [BATCH=2] [STEPS=3] [NAMES...]
set -euo pipefail
cls=${1:-64} det=${2:-96} batch=${3:-2} steps=${4:-3}; shift $(( $# < 4 ? $# : 4 ))
bin=${DARKNET_BIN:-build/darknet/darknet}
tmp=$(mktemp -d /tmp/zoobench_XXXXXX); trap 'rm -rf "$tmp"' EXIT
scripts/zoo-data.sh "$tmp" 16 $cls >/dev/null
names=${*:-$(ls cfg/zoo/*.cfg | xargs -n1 basename | sed 's/\.cfg$//')}
echo "| cfg | input, batch | K-FAC layers (SGD) | K-FAC memory | SGD s/step | K-FAC step 1 s | K-FAC steady s/step | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for n in $names; do
    if grep -q '^\[\(yolo\|region\|detection\)\]' cfg/zoo/$n.cfg; then
        kind=detector size=$det
        printf "classes=80\ntrain=%s/detector.list\nbackup=%s/backup\n" "$tmp" "$tmp" > "$tmp/d"
    else
        kind=classifier size=$cls
        c=$(awk '/^\[/{l=/^\[(conv|connected)/} l&&/^(filters|output)=/{split($0,a,"=");v=a[2]} END{print v}' cfg/zoo/$n.cfg)
        printf "classes=%s\ntrain=%s/classifier.list\nlabels=%s/labels.txt\nbackup=%s/backup\n" "$c" "$tmp" "$tmp" "$tmp" > "$tmp/d"
    fi
    common="width=$size height=$size batch=$batch subdivisions=1 max_batches=$steps burn_in=0 learning_rate=0.001"
    scripts/zoo-reduce.sh cfg/zoo/$n.cfg "$tmp/k.cfg" $common
    scripts/zoo-reduce.sh cfg/zoo/$n.cfg "$tmp/s.cfg" $common NOKFAC=1
    secs() { grep -E "^[0-9]+(, [0-9.]+)?: .* avg, .* rate, .* seconds" | sed -E 's/.* rate, ([0-9.]+) seconds.*/\1/'; }
    "$bin" $kind train "$tmp/d" "$tmp/k.cfg" > "$tmp/k.out" 2>&1 || true
    "$bin" $kind train "$tmp/d" "$tmp/s.cfg" > "$tmp/s.out" 2>&1 || true
    k=($(secs < "$tmp/k.out")) s=($(secs < "$tmp/s.out"))
    layers=$(grep -oE "K-FAC: [0-9]+ layer" "$tmp/k.out" | grep -oE "[0-9]+")
    sgd=$(grep -c "SGD (factor" "$tmp/k.out" || true)
    mem=$(grep -oE "layer\(s\), [0-9.]+ [KMG]B" "$tmp/k.out" | sed 's/layer(s), //')
    [ ${#k[@]} -eq "$steps" ] && [ ${#s[@]} -eq "$steps" ] || { echo "| $n | failed: see $kind train output | | | | | | |"; continue; }
    ss=$(printf "%s\n" "${s[@]:1}" | awk '{t+=$1} END{printf "%.2f", t/NR}')
    ks=$(printf "%s\n" "${k[@]:1}" | awk '{t+=$1} END{printf "%.2f", t/NR}')
    echo "| $n | ${size}x${size}, $batch | $layers ($sgd) | $mem | $ss | $(printf %.1f ${k[0]}) | $ks | $(awk -v a=$ks -v b=$ss 'BEGIN{printf "%.1f", a/b}') |"
    rm -f "$tmp"/backup/*
done
