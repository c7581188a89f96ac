#!/bin/sh
# Installs the Debian packages jetmoe.c needs, only those missing (idempotent).
# Run as root on Debian 12; `make demo` and `make test` call it.
set -e
PKGS="build-essential libopenblas-dev libopenblas0-openmp libcjson-dev libdnnl-dev \
libopenmpi-dev openmpi-bin sentencepiece python3 python3-numpy python3-torch"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages:$missing (run 'make setup' as root)" >&2
    exit 1
fi
echo "setup: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q || true
apt-get install -y -q --no-install-recommends $missing
