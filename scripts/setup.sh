#!/bin/sh
# Installs the Debian packages jetmoe.c needs, only those missing (idempotent).
# Run as root on Debian 12; `make test` calls it, `make demo` calls it with
# "demo" to add the packages the bundled corpus is read from (data/README.md).
#
# Used by: build-essential (the build), libopenblas-dev + libopenblas0-openmp
# (cblas.h and the OpenMP libopenblas the Makefile links), libcjson-dev
# (-lcjson), sentencepiece (spm_train/spm_encode, the tokenizer tests'
# reference), python3 + python3-numpy + python3-torch (the test runner, the
# PyTorch reference, the benches). libopenmpi-dev and openmpi-bin are for the
# multi-process work that comes next: nothing builds against them yet.
set -e
PKGS="build-essential libopenblas-dev libopenblas0-openmp libcjson-dev \
libopenmpi-dev openmpi-bin sentencepiece python3 python3-numpy python3-torch"
if [ "$1" = demo ]; then
    # prose: Jane Austen's novels (public domain; the R package's data file is
    # read directly, R itself is never run) and the Jargon File; chat word lists
    PKGS="$PKGS r-cran-janeaustenr jargon-text wamerican"
fi
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
