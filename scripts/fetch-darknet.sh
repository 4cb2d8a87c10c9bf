#!/bin/sh
# Obtains pristine upstream Darknet (pjreddie/darknet 61c9d02e) into $1.
# Either a user's checkout (DARKNET_SRC=path) or Debian's source package
# `darknet`, extracted WITHOUT Debian's patches so that patches/ applies to the
# same tree `git clone` + checkout gives. Never commits anything fetched.
set -eu
dest=$1
want_version="0.0.0+git20180914.61c9d02e"
rm -rf "$dest" "$dest.tmp"
if [ -n "${DARKNET_SRC:-}" ]; then
    [ -f "$DARKNET_SRC/src/network.c" ] || { echo "DARKNET_SRC=$DARKNET_SRC is not a Darknet tree (no src/network.c)" >&2; exit 1; }
    mkdir -p "$dest.tmp"
    (cd "$DARKNET_SRC" && tar --exclude=.git --exclude=obj --exclude='*.o' --exclude=darknet \
        --exclude=libdarknet.so --exclude=libdarknet.a -cf - .) | (cd "$dest.tmp" && tar -xf -)
    mv "$dest.tmp" "$dest"
    exit 0
fi
# apt-get source needs a deb-src entry for the archive this machine already uses.
if ! apt-get indextargets --format '$(CREATED_BY)' 2>/dev/null | grep -q '^Sources$'; then
    src=/etc/apt/sources.list.d/darknet-kfac-deb-src.sources
    if [ "$(id -u)" -ne 0 ]; then
        echo "apt has no deb-src entry; as root, add one (see README) or set DARKNET_SRC=path" >&2; exit 1
    fi
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src"
    else
        grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | sed 's/^deb /deb-src /' > /etc/apt/sources.list.d/darknet-kfac-deb-src.list
    fi
    apt-get update -qq
fi
mkdir -p "$dest.tmp/dl"
cd "$dest.tmp/dl"
apt-get source --download-only "darknet=0.0.0+git20180914.61c9d02e-2" >/dev/null 2>&1 || apt-get source --download-only darknet >/dev/null
dsc=$(ls darknet_*.dsc | head -n 1)
case "$dsc" in *"$want_version"*) ;; *) echo "unexpected Debian darknet version: $dsc (want $want_version)" >&2; exit 1 ;; esac
dpkg-source -x --skip-patches "$dsc" tree >/dev/null
rm -rf tree/debian   # Debian's packaging, not part of the upstream tree
cd - >/dev/null
mv "$dest.tmp/dl/tree" "$dest"
rm -rf "$dest.tmp"
