#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what a run on the lent GPU machine needs and cannot fetch: the CIFAR-10 rebuild's
# inputs (../shared does not travel) and pyautoattack without its 42 MB example checkpoint. Then, with the device
# tool, carry [".gpu"] and start the command with
#   export PYTHONPATH=$PWD:$PWD/.gpu/site ADAAD_DATA=/tmp/data PYTHONUNBUFFERED=1; python3 .gpu/build_cifar10.py /tmp/data >/dev/null &&
# (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
mkdir -p .gpu/site
cp ../shared/data/cifar10/cifar10_exact.npz ../shared/data/cifar10/cifar10_jpeg.npz ../shared/data/cifar10/build_cifar10.py .gpu/
src=$("$VENV/bin/python" -c "import os, pyautoattack; print(os.path.dirname(pyautoattack.__file__))")
rm -rf .gpu/site/pyautoattack
cp -r "$src" .gpu/site/pyautoattack
rm -rf .gpu/site/pyautoattack/examples .gpu/site/pyautoattack/__pycache__
du -sh .gpu
