#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what a run on the lent GPU machine needs and cannot fetch: the CIFAR-10 rebuild's
# inputs (../shared does not travel), pyautoattack without its 42 MB example checkpoint, and git.json: the commit and
# changed files of the tree as it is now (the copy on the GPU machine has no .git; adaad.repro.git_info reads this
# file through $ADAAD_GIT_INFO). Run it again right before each device call so git.json matches the tree that travels.
# Then, with the device tool, carry [".gpu"] and start the command with
#   source .gpu/env.sh &&
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
"$VENV/bin/python" -c "import json; from adaad.repro import git_info; print(json.dumps(git_info()))" > .gpu/git.json.tmp
mv .gpu/git.json.tmp .gpu/git.json
cat > .gpu/env.sh <<'ENV'
# sourced at the start of every device command: the package and pyautoattack on the path, the data rebuilt in /tmp
export PYTHONPATH=$PWD:$PWD/.gpu/site ADAAD_DATA=/tmp/data ADAAD_GIT_INFO=$PWD/.gpu/git.json PYTHONUNBUFFERED=1
[ -d /tmp/data/cifar-10-batches-py ] || python3 .gpu/build_cifar10.py /tmp/data >/dev/null
ENV
echo "git: $(cat .gpu/git.json)"
du -sh .gpu
