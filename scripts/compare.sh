#!/bin/bash
# Any classifier cfg trained on Fashion-MNIST with SGD and with K-FAC, from
# the same initial weights and minibatch sequence (`make compare CFG=path`).
# The cfg is reduced to what kfac_demo feeds (scripts/zoo-reduce.sh; every
# change is printed with its line): 28x28x3 input (min_crop=max_crop=28, a
# [crop] clamped to 28x28 and its flip off), no augmentation, 10 classes (the
# last filters=/output= before the [softmax]/[cost]), the cfg's batch if it
# is 2 to 128, else 128 (subdivisions kept), and its own [net] schedule
# scaled to ITERS steps. K-FAC trains it with its own [kfac] section, or a
# bare [kfac] (all defaults) when it has none; SGD trains the same cfg
# without [kfac]. Writes build/compare/NAME/ (NAME: the cfg's file name
# without .cfg): NAME_kfac.cfg, NAME_sgd.cfg, results.csv, compare.png,
# summary.txt (scripts/lib-compare.sh's compare_report).
#
#   scripts/compare.sh CFG [ITERS [EVAL [SEED]]]
#       ITERS: optimizer steps per method (2000); EVAL: test-set evaluation
#       every EVAL steps (ITERS/20, at least 1); SEED: initial weights and
#       minibatch order (1). Empty arguments take the defaults.
# Knob (environment): COMPARE_DATA (IDX directory).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-compare.sh

cfg=${1:?usage: scripts/compare.sh CFG [ITERS [EVAL [SEED]]]}
iters=${2:-2000} every=${3:-} seed=${4:-1}
data=${COMPARE_DATA:-/usr/share/datasets/fashion-mnist}
[ -f "$cfg" ] || { echo "compare: $cfg: no such file" >&2; exit 1; }
for v in "$iters" "${every:-1}" "$seed"; do
    case $v in ''|*[!0-9]*) echo "compare: ITERS, EVAL and SEED must be whole numbers (got '$v')" >&2; exit 1 ;; esac
done
# (10#: a leading zero is not read as octal)
iters=$((10#$iters)) seed=$((10#$seed))
every=$((10#${every:-$(( iters / 20 > 0 ? iters / 20 : 1 ))}))
if [ "$iters" -lt 1 ] || [ "$every" -lt 1 ]; then echo "compare: ITERS and EVAL must be at least 1" >&2; exit 1; fi
name=$(basename "$cfg" .cfg)
out=build/compare/$name
kfac_cfg=$out/${name}_kfac.cfg sgd_cfg=$out/${name}_sgd.cfg

# The first value of a [net] key, as Darknet reads it (blanks ignored).
net_key() {
    awk -v k="$1" '{ l = $0; gsub(/[ \t\r]/, "", l) }
        l ~ /^\[/ { s = l }
        (s == "[net]" || s == "[network]") && index(l, k "=") == 1 && !found { v = substr(l, length(k) + 2); found = 1 }
        END { print v }' "$cfg"
}
# Each comma-separated step count times ITERS/MAX, rounded, at least 1: the
# schedule keeps its shape relative to the run's length.
scale() {
    awk -v s="$1" -v n="$iters" -v m="$2" 'BEGIN {
        c = split(s, a, ","); r = ""
        for (i = 1; i <= c; ++i) { v = int(a[i] * n / m + 0.5); r = r (i > 1 ? "," : "") (v < 1 ? 1 : v) }
        print r }'
}

compare_setup "$out" 0 0
policy=$(net_key policy) max=$(net_key max_batches) steps=$(net_key steps) scales=$(net_key scales) burn=$(net_key burn_in)
batch=$(net_key batch) subdiv=$(net_key subdivisions)
policy=${policy:-constant} batch=${batch:-1} subdiv=${subdiv:-1}
sched=(max_batches="$iters")
# Darknet's own defaults where a key is absent: max_batches 0, burn_in 0.
was="policy=$policy max_batches=${max:-0}${steps:+ steps=$steps}${scales:+ scales=$scales}${burn:+ burn_in=$burn}"
if [ "${max:-0}" -gt 0 ] 2>/dev/null; then
    if [ "$policy" = steps ] && [ -n "$steps" ]; then sched+=(steps="$(scale "$steps" "$max")"); fi
    if [ "${burn:-0}" -gt 0 ]; then sched+=(burn_in="$(scale "$burn" "$max")"); fi
    why="x$iters/$max"
else
    why="no max_batches in the cfg to scale from${steps:+; steps kept}${burn:+; burn_in kept}"
fi
# A cfg's batch is kept (its learning rate goes with it) up to 128, which
# bounds a step's time and memory on big networks. batch=1 is Darknet's
# testing setting (upstream's classifier cfgs have it active and their
# training batch, 128, commented out); batch norm cannot train on it:
# Darknet's variance divides by batch*height*width - 1, 0 on a 1x1 map.
shape=() b=$batch bnote="batch=$batch subdivisions=$subdiv (the cfg's)"
if [ "$batch" -gt 128 ]; then shape=(batch=128) b=128; bnote="batch=$batch > 128: batch=128, subdivisions=$subdiv kept"; fi
if [ "$batch" -lt 2 ]; then shape=(batch=128) b=128; bnote="batch=$batch (Darknet's testing setting) -> batch=128, subdivisions=$subdiv kept"; fi

echo "compare: $cfg on Fashion-MNIST, $iters steps per method, test accuracy every $every steps, seed $seed"
echo "K-FAC cfg $kfac_cfg: $cfg with these changes:"
{ scripts/zoo-reduce.sh "$cfg" "$out/reduced.tmp" height=28 width=28 channels=3 min_crop=28 max_crop=28 \
      angle=0 hue=0 saturation=1 exposure=1 aspect=1 ${shape[@]+"${shape[@]}"} "${sched[@]}" crop.flip=0 CLASSES=10 KFAC=1 VERBOSE=1 2>&1; } | sed 's/^/  /'
# Whoever opens the file learns where it came from (its comments are the cfg's).
{ echo "# Written by scripts/compare.sh from $cfg for Fashion-MNIST (28x28x3, 10 classes, $iters steps); the SGD cfg is this without [kfac]."
  cat "$out/reduced.tmp"; } >"$kfac_cfg"
rm -f "$out/reduced.tmp"
echo "SGD cfg $sgd_cfg: the K-FAC cfg without [kfac]:"
{ scripts/zoo-reduce.sh "$kfac_cfg" "$sgd_cfg" NOKFAC=1 VERBOSE=1 2>&1; } | sed 's/^/  /'
echo "schedule: $was -> ${sched[*]} ($why)"
echo "batch: $bnote"
# Before any training: a cfg whose downsampling leaves no map at 28x28
# (alexnet's) or a [kfac] the plugin refuses would otherwise fail only after
# the SGD run.
if ! build/darknet/darknet kfac check "$kfac_cfg" >"$out/check.log" 2>&1; then
    grep -v '^ *[0-9]\|^layer ' "$out/check.log" | tail -3 >&2
    echo "compare: $kfac_cfg does not pass \`darknet kfac check\` (its layer table: $out/check.log)" >&2
    exit 1
fi
echo


compare_run "$sgd_cfg" "$kfac_cfg" --iters "$iters" --eval-every "$every" --seed "$seed" --data-dir "$data"
compare_report "$iters" "$every" "85 88 90" \
    "$name ($cfg: 28x28x3 input, 10 classes) on Fashion-MNIST: K-FAC vs SGD\\n$iters steps each, batch $b, same initial weights and minibatches" auto
