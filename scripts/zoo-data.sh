#!/bin/bash
# Makes the small synthetic data set the model-zoo tests and benchmarks train
# on (no download): N images of SIZExSIZE pixels, four classes, as binary PPM
# files named *.jpg (stb_image, which Darknet uses, reads images by content;
# the .jpg name is what Darknet's label-path rules expect), plus
#   DIR/classifier.list  DIR/labels.txt (21842 names: enough for any zoo head)
#   DIR/images/*.jpg     DIR/labels/*.txt (YOLO boxes: class cx cy w h)
#   DIR/detector.list    DIR/backup/
# Each image's class is a bright square in one quadrant over noise, so the
# tasks are learnable; its name carries its label (Darknet's classifier finds
# the label as a substring of the path) and its box file holds that square.
#
#   scripts/zoo-data.sh DIR [N=24] [SIZE=64]
set -euo pipefail
dir=$1 n=${2:-24} size=${3:-64}
mkdir -p "$dir/images" "$dir/labels" "$dir/backup"
seq -f "zc%05g" 0 21841 > "$dir/labels.txt"
: > "$dir/classifier.list"; : > "$dir/detector.list"
half=$((size / 2)) q=$((size / 4))
for ((i = 0; i < n; i++)); do
    c=$((i % 4)) name=$(printf "img%03d_zc%05d" "$i" "$c")
    f="$dir/images/$name.jpg"
    # noise, then a bright square of side size/2 in quadrant c
    {
        printf "P6\n%d %d\n255\n" "$size" "$size"
        head -c $((size * size * 3)) /dev/urandom | tr '\200-\377' '\000-\177'
    } > "$f.tmp"
    x0=$(( (c % 2) * half )) y0=$(( (c / 2) * half ))
    hdr=$(( $(printf "P6\n%d %d\n255\n" "$size" "$size" | wc -c) ))
    for ((y = y0; y < y0 + half; y++)); do
        printf '\377%.0s' $(seq $((half * 3))) |
            dd of="$f.tmp" bs=1 seek=$((hdr + (y * size + x0) * 3)) conv=notrunc status=none
    done
    mv "$f.tmp" "$f"
    echo "$f" >> "$dir/classifier.list"
    echo "$f" >> "$dir/detector.list"
    awk -v c="$c" 'BEGIN { printf "%d %.3f %.3f 0.500 0.500\n", c, 0.25 + 0.5 * (c % 2), 0.25 + 0.5 * int(c / 2) }' \
        > "$dir/labels/$name.txt"
done
echo "zoo-data: $n images ${size}x${size} in $dir"
