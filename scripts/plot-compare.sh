#!/bin/bash
# Plots a K-FAC vs SGD comparison for scripts/demo.sh and scripts/zoo-retrain.sh:
# reads DIR/results.csv (method,iteration,seconds,train_loss,test_accuracy;
# methods sgd and kfac) and writes DIR/compare.png, four panels: train loss
# and test accuracy against iterations and against training seconds. Without
# gnuplot it says how to get it and succeeds (the CSV and table still stand).
#
#   scripts/plot-compare.sh DIR TITLE [YLO]    (YLO: accuracy axis floor, 0.8)
#
# YLO=auto: 0.8, or lower if a point of the last three quarters of a run is
# lower (short runs: batch-norm rolling statistics still settling, or a cfg
# that is far from 80% in the steps given), rounded down to a multiple of 0.05.
set -euo pipefail
out=$1 title=$2 ylo=${3:-0.8}
if [ "$ylo" = auto ]; then
    ylo=$(awk -F, 'NR > 1 { it[NR] = $2; acc[NR] = $5; if ($2 > n) n = $2 }
          END { lo = 0.8; for (i in it) if (it[i] >= n / 4 && acc[i] < lo) lo = acc[i]
                printf "%.2f", lo < 0.8 ? int(lo * 20) / 20 : 0.8 }' "$out/results.csv")
fi
# One data file per method: gnuplot then needs no CSV filtering of its own.
for m in sgd kfac; do
    awk -F, -v m="$m" '$1 == m' "$out/results.csv" > "$out/$m.dat"
done
if ! command -v gnuplot >/dev/null 2>&1; then
    echo "gnuplot not installed: no plot (apt-get install gnuplot-nox)" >&2
    exit 0
fi
term=png
gnuplot -e 'set terminal' 2>&1 | grep -q pngcairo && term="pngcairo"
gnuplot <<EOF
set terminal $term size 1200,900
set output '$out/compare.png'
set datafile separator ','
set grid
set multiplot layout 2,2 title "$title"
set ylabel 'train loss (mean since last point)'
set logscale y
set key top right
set xlabel 'iterations'
plot '$out/sgd.dat' u 2:4 w lp pt 7 ps .4 t 'SGD', '$out/kfac.dat' u 2:4 w lp pt 7 ps .4 t 'K-FAC'
set xlabel 'training seconds'
plot '$out/sgd.dat' u 3:4 w lp pt 7 ps .4 t 'SGD', '$out/kfac.dat' u 3:4 w lp pt 7 ps .4 t 'K-FAC'
unset logscale y
set key bottom right
set ylabel 'test accuracy'
set yrange [$ylo:*]
set xlabel 'iterations'
plot '$out/sgd.dat' u 2:5 w lp pt 7 ps .4 t 'SGD', '$out/kfac.dat' u 2:5 w lp pt 7 ps .4 t 'K-FAC', 0.9 w l dt 2 lc rgb 'gray' t '90%'
set xlabel 'training seconds'
plot '$out/sgd.dat' u 3:5 w lp pt 7 ps .4 t 'SGD', '$out/kfac.dat' u 3:5 w lp pt 7 ps .4 t 'K-FAC', 0.9 w l dt 2 lc rgb 'gray' t '90%'
unset multiplot
EOF
echo "plot: $out/compare.png"
