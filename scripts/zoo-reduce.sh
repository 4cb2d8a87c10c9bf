#!/bin/bash
# Writes a reduced copy of a cfg for quick runs (tests, benchmarks, the
# scripts/compare.sh comparisons): sets the [net] keys given as KEY=VALUE
# arguments (width, height, batch, subdivisions, max_batches, ...; a [crop]
# follows width/height), sets random=0 in every layer unless RANDOM=1 is
# given, and sets/adds [kfac] keys given as kfac.KEY=VALUE and [crop] keys
# given as crop.KEY=VALUE (every [crop]). NOKFAC=1 drops the [kfac] section
# (the SGD baseline of the same network); KFAC=1 appends a [kfac] (the header
# and the kfac.KEY=VALUE given) to a cfg that has none. CLASSES=N sets the
# filters=/output= of the last [convolutional]/[connected] before the first
# [softmax]/[cost] (a classifier's class count; fails where there is none).
# Other layer shapes are untouched, so the K-FAC factor sizes are those of
# the full cfg. VERBOSE=1 says every change on stderr ("IN:LINE: ..."), the
# line numbers being IN's.
#
#   scripts/zoo-reduce.sh IN OUT [KEY=VALUE | kfac.KEY=VALUE | crop.KEY=VALUE |
#                                 CLASSES=N | RANDOM=1 | NOKFAC=1 | KFAC=1 | VERBOSE=1]...
set -euo pipefail
in=$1 out=$2; shift 2
net="" kf="" crop="" classes="" random=0 nokfac=0 addkfac=0 verbose=0
for a in "$@"; do
    case $a in
        RANDOM=1) random=1 ;;
        NOKFAC=1) nokfac=1 ;;
        KFAC=1) addkfac=1 ;;
        VERBOSE=1) verbose=1 ;;
        CLASSES=*) classes=${a#CLASSES=} ;;
        kfac.*) kf="$kf ${a#kfac.}" ;;
        crop.*) crop="$crop ${a#crop.}" ;;
        *) net="$net $a" ;;
    esac
done
if [ "$nokfac" = 1 ] && [ "$addkfac" = 1 ]; then echo "zoo-reduce: NOKFAC=1 and KFAC=1 contradict" >&2; exit 2; fi
# Two passes over IN: the first finds the class-count line and whether there
# is a [kfac], the second writes.
awk -v net="$net" -v kf="$kf" -v crop="$crop" -v classes="$classes" -v random="$random" \
    -v nokfac="$nokfac" -v addkfac="$addkfac" -v verbose="$verbose" -v file="$in" '
function note(msg) { if (verbose) print file ":" msg > "/dev/stderr" }
# prints k=v in place of the current line
function set(k, v) {
    if (line != k "=" v) note(FNR ": " sec " " line " -> " k "=" v)
    print k "=" v; seen[k] = 1
}
function add(k, v) { print k "=" v; note(" " sec " " k "=" v " (added)") }
function isnet(s) { return s == "[net]" || s == "[network]" }
function flush(end,   k) {
    # keys not present in the section are added at its end
    if (isnet(sec)) for (k in N) if (!(k in seen)) add(k, N[k])
    if (sec == "[kfac]" && !nokfac) for (k in K) if (!(k in seen)) add(k, K[k])
    if (sec == "[crop]") for (k in C) if (!(k in seen)) add(k, C[k])
    delete seen
    if (skip) note(dropped (end > dropped ? "-" end : "") ": [kfac] dropped")
}
BEGIN {
    n = split(net, a, " "); for (i = 1; i <= n; i++) { split(a[i], p, "="); N[p[1]] = p[2] }
    n = split(kf, a, " "); for (i = 1; i <= n; i++) { split(a[i], p, "="); K[p[1]] = p[2] }
    n = split(crop, a, " "); for (i = 1; i <= n; i++) { split(a[i], p, "="); C[p[1]] = p[2] }
}
{ line = $0; gsub(/[ \t\r]/, "", line) }
NR == FNR {
    last = FNR
    if (line ~ /^\[/) { sec = line; if (sec == "[kfac]") hask = 1 }
    if (sec ~ /^\[(conv|convolutional|conn|connected)\]$/ && line ~ /^(filters|output)=/) cand = FNR
    if (line ~ /^\[(softmax|cost)\]$/ && !target) target = cand
    next
}
FNR == 1 {
    sec = ""
    if (classes != "" && !target) {
        print file ": no [convolutional]/[connected] with filters=/output= before a [softmax] or [cost]: not a classifier cfg" > "/dev/stderr"
        bad = 1; exit 1
    }
}
line ~ /^\[/ {
    flush(FNR - 1); sec = line; skip = 0
    if (sec == "[kfac]" && nokfac) { skip = 1; dropped = FNR; next }
    if (sec == "[kfac]" && addkfac) note(FNR ": [kfac] kept (the cfg'"'"'s own)")
    print; next
}
skip { next }
classes != "" && FNR == target { split(line, p, "="); set(p[1], classes); next }
line ~ /^[a-z_]+=/ {
    split(line, p, "="); k = p[1]
    if (isnet(sec) && (k in N)) { set(k, N[k]); next }
    if (sec == "[kfac]" && (k in K)) { set(k, K[k]); next }
    if (sec == "[crop]" && (k in C)) { set(k, C[k]); next }
    if (k == "random" && !random) { set(k, 0); next }
    # a [crop] larger than the reduced input would read past the image
    if (sec == "[crop]" && k == "crop_height" && ("height" in N)) { set(k, N["height"]); next }
    if (sec == "[crop]" && k == "crop_width" && ("width" in N)) { set(k, N["width"]); next }
}
{ print }
END {
    if (bad) exit 1
    flush(last)
    if (addkfac && !hask) {
        if (line != "") print ""
        print "[kfac]"; sec = "[kfac]"
        note(" [kfac] appended (the cfg has none)")
        for (k in K) add(k, K[k])
    }
}
' "$in" "$in" > "$out" || { rm -f "$out"; exit 1; }
