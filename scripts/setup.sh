#!/bin/sh
# Installs the Debian packages jetmoe.c needs, only those missing (idempotent).
# Run as root on Debian 12; `make test` calls it, `make demo` calls it with
# "demo" to add what the bundled corpus is read from (data/README.md).
#
# Used by: build-essential (the build), libopenblas-dev + libopenblas0-openmp
# (cblas.h and the OpenMP libopenblas the Makefile links), libcjson-dev
# (-lcjson), libedit-dev (line editing in `jetmoe chat`), sentencepiece
# (spm_train/spm_encode, the tokenizer tests' reference), python3 + python3-numpy + python3-torch (the test runner, the
# PyTorch reference, the benches), zlib1g-dev + libzstd-dev (-lz -lzstd: `jetmoe prepare`
# reads .jsonl.gz and .jsonl.zst as streams), zstd (the prepare tests compress fixtures
# with it), libopenmpi-dev (mpi.h and -lmpi: multi-process training, src/train/comm.c;
# `make MPI=0` builds without it), openmpi-bin (mpirun: the scale-out tests and bench/scale) and
# libmicrohttpd-dev (microhttpd.h and -lmicrohttpd: the HTTP side of `jetmoe serve`, src/serve/server.c);
# chromium + chromium-driver + python3-selenium (tests/browser_tests.py drives the web page in headless
# Chromium) and node + npm (tests/serve_clients_tests.py runs the official openai npm client; a Node
# already on the PATH, e.g. from nodesource, is used as it is, else Debian's nodejs and npm);
# python3-jinja2 (tests/jinja_diff_tests.py judges the chat-template renderer's deliberate differences
# from @huggingface/jinja by Python's Jinja2, what transformers renders chat templates with).
set -e
PKGS="build-essential libopenblas-dev libopenblas0-openmp libcjson-dev libedit-dev \
zlib1g-dev libzstd-dev zstd libopenmpi-dev openmpi-bin libmicrohttpd-dev sentencepiece python3 python3-numpy python3-torch \
chromium chromium-driver python3-selenium python3-jinja2"
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || PKGS="$PKGS nodejs npm"
if [ "$1" = demo ]; then
    # prose: the Jargon File; chat: the word list. Jane Austen's novels are
    # fetched below as a .deb, not installed.
    PKGS="$PKGS jargon-text wamerican"
fi
how="make setup"
[ "$1" = demo ] && how="sh scripts/setup.sh demo"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages:$missing (run '$how' as root)" >&2
        exit 1
    fi
    echo "setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || true
    apt-get install -y -q --no-install-recommends $missing
fi
[ "$1" = demo ] || exit 0

# Jane Austen's novels: data/build_corpus.py reads one data file out of the
# r-cran-janeaustenr .deb. Installing the package would pull in R (r-base-core
# and 11 more packages: 49 MB installed on top of the packages above) that
# nothing here runs, so the .deb (1.6 MB) is only downloaded, into build/debs,
# where build_corpus.py looks (--debs). apt-get download checks it against the
# signed package index, as an install would. Where the package is installed
# anyway, build_corpus.py reads the installed file.
pkg=r-cran-janeaustenr
dpkg-query -W -f='${Status}' $pkg 2>/dev/null | grep -q "install ok installed" && exit 0
debs="$(cd "$(dirname "$0")/.." && pwd)/build/debs"
ls "$debs/${pkg}_"*.deb >/dev/null 2>&1 && exit 0
mkdir -p "$debs"
echo "setup: downloading $pkg's .deb into build/debs (read, not installed)"
# as root, apt would download as the _apt user, who may not write to build/
sandbox=""
[ "$(id -u)" = 0 ] && sandbox="-o APT::Sandbox::User=root"
if ! (cd "$debs" && apt-get download -q $sandbox $pkg); then
    # an index from before the last 'apt-get update' may name a version the mirror no longer has
    if [ "$(id -u)" != 0 ]; then
        echo "setup: could not download $pkg (run '$how' as root to refresh the package index)" >&2
        exit 1
    fi
    apt-get update -q
    (cd "$debs" && apt-get download -q $sandbox $pkg)
fi
