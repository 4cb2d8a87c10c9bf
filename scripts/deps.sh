#!/bin/sh
# Installs the Debian packages the build needs, by name, only when one is
# missing: a fresh Debian machine gets them, a set-up one pays a few dpkg
# queries. Usage: scripts/deps.sh pkg...  (root, or sudo without a password).
set -eu
missing=""
for p in "$@"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    case "$st" in *"install ok installed"*) ;; *) missing="$missing $p" ;; esac
done
[ -z "$missing" ] && exit 0
echo "darknet-kfac: installing Debian packages:$missing" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "darknet-kfac: need root to install:$missing (apt-get install$missing)" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
