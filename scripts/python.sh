#!/usr/bin/env sh
# Prints the interpreter `make install` builds .venv from (the sidecar, the control plane,
# the demo, the tests and the benchmarks all run on it).
#
# The distribution's /usr/bin/python3 when it is 3.11 or newer and can make a venv: the
# interpreter the images ship (scripts/base-image.sh, deploy/docker/Dockerfile), so what is
# tested and measured here is what runs in a pod. Debian builds it with profile-guided and
# link-time optimisation and links it statically; a default source build (pyenv's, for
# one) is neither, and costs the sidecar ~14% more CPU per request in `make bench`
# (docs/performance.md, round 6). Otherwise: whatever `python3` is on the PATH.
# `make PYTHON=/path/to/python3 install` overrides the choice.
set -eu
sys=/usr/bin/python3
if [ -x "$sys" ] && "$sys" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "$sys"
else
  echo python3
fi
