#!/bin/bash
# Writes a reduced copy of a cfg for quick runs (tests, benchmarks): sets the
# [net] keys given as KEY=VALUE arguments (width, height, batch, subdivisions,
# max_batches, ...; a [crop] follows width/height), sets random=0 in every
# layer unless RANDOM=1 is given, and
# sets/adds [kfac] keys given as kfac.KEY=VALUE; NOKFAC=1 drops the [kfac]
# section (the SGD baseline of the same network). Layer shapes (channels,
# filters) are untouched, so the K-FAC factor sizes are those of the full cfg.
#
#   scripts/zoo-reduce.sh IN OUT [KEY=VALUE | kfac.KEY=VALUE | RANDOM=1 | NOKFAC=1]...
set -euo pipefail
in=$1 out=$2; shift 2
net="" kf="" random=0 nokfac=0
for a in "$@"; do
    case $a in
        RANDOM=1) random=1 ;;
        NOKFAC=1) nokfac=1 ;;
        kfac.*) kf="$kf ${a#kfac.}" ;;
        *) net="$net $a" ;;
    esac
done
awk -v net="$net" -v kf="$kf" -v random="$random" -v nokfac="$nokfac" '
function flush(   k) {
    # keys not present in the section are added at its end
    if (sec == "[net]" || sec == "[network]") for (k in N) if (!(k in seen)) print k "=" N[k]
    if (sec == "[kfac]" && !nokfac) for (k in K) if (!(k in seen)) print k "=" K[k]
    delete seen
}
BEGIN {
    n = split(net, a, " "); for (i = 1; i <= n; i++) { split(a[i], p, "="); N[p[1]] = p[2] }
    n = split(kf, a, " "); for (i = 1; i <= n; i++) { split(a[i], p, "="); K[p[1]] = p[2] }
}
{ line = $0; gsub(/[ \t\r]/, "", line) }
line ~ /^\[/ { flush(); sec = line; if (sec == "[kfac]" && nokfac) { skip = 1; next } skip = 0; print; next }
skip { next }
line ~ /^[a-z_]+=/ {
    split(line, p, "="); k = p[1]
    if ((sec == "[net]" || sec == "[network]") && (k in N)) { print k "=" N[k]; seen[k] = 1; next }
    if (sec == "[kfac]" && (k in K)) { print k "=" K[k]; seen[k] = 1; next }
    if (k == "random" && !random) { print "random=0"; next }
    # a [crop] larger than the reduced input would read past the image
    if (sec == "[crop]" && k == "crop_height" && ("height" in N)) { print k "=" N["height"]; next }
    if (sec == "[crop]" && k == "crop_width" && ("width" in N)) { print k "=" N["width"]; next }
}
{ print }
END { flush() }
' "$in" > "$out"
