#!/usr/bin/env bash
# One command from a fresh clone: make .venv, install the project, run a job.
#
#   ./run.sh setup                   install (with the test tools) and nothing else: then source .venv/bin/activate
#   ./run.sh test [pytest args]      install with the test tools and run the test suite
#   ./run.sh train [train.py args]   install and train (default: the embedded demo dataset, CPU)
#   ./run.sh eval [eval.py args]     install and evaluate
#   ./run.sh gpu-check [DIR]         install the GPU build into a throwaway venv and check with ldd that every
#                                    library it needs resolves but the driver's libcuda.so.1 (a few GB)
#
# VAA_MXNET=cu112 ./run.sh train --gpus 0   installs the CUDA 11.2 build of mxnet (and the CUDA 11 / cuDNN 8
#   libraries as pip wheels: only the NVIDIA driver is needed) instead of the CPU one; later calls keep it
#   (.venv/.flavour) until VAA_MXNET=cpu switches back.
# VAA_PYTHON=python3.11 picks the interpreter used to create .venv (default: python3).
set -euo pipefail
cd "$(dirname "$0")"

job="${1:-}"
case "$job" in
  setup|test|train|eval|gpu-check) shift ;;
  *) echo "usage: ./run.sh setup|test|train|eval|gpu-check [args...]" >&2; exit 2 ;;
esac

pick_python() {
  # mxnet 1.9.1 needs NumPy < 1.24, which has wheels up to Python 3.11: pick such an interpreter.
  python="${VAA_PYTHON:-}"
  if [ -z "$python" ]; then
    for candidate in python3 python3.11 python3.10 python3.9 python3.8; do
      if command -v "$candidate" >/dev/null 2>&1 &&
         "$candidate" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))'; then
        python="$candidate"; break
      fi
    done
  fi
  if [ -z "$python" ]; then
    echo "run.sh: error: need Python 3.8-3.11 (mxnet 1.9.1 requires NumPy < 1.24); install one and" \
         "set VAA_PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
}

if [ "$job" = gpu-check ]; then        # its own venv: the project's .venv is left as it is
  pick_python
  exec "$python" -m engine.gpu --check-install "$@"
fi

venv=.venv
# The mxnet build: VAA_MXNET, else the one this .venv was installed with, else the CPU build.
flavour="${VAA_MXNET:-$(cat "$venv/.flavour" 2>/dev/null || echo cpu)}"
case "$flavour" in
  cpu|cu112) ;;
  *) echo "run.sh: error: VAA_MXNET=$flavour: choose cpu or cu112" >&2; exit 2 ;;
esac
# Before the GPU build's few GB are downloaded: can a GPU here run it? (nvidia-smi; one line if not)
if [ "$flavour" = cu112 ] && [ ! -f "$venv/.flavour" -o "$(cat "$venv/.flavour" 2>/dev/null)" != cu112 ]; then
  pick_python
  "$python" -m engine.gpu --before-install || exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  pick_python
  echo "run.sh: creating $venv with $("$python" --version 2>&1)"
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "run.sh: error: '$python -m venv' failed; on Debian/Ubuntu install python3-venv" >&2
    exit 2
  fi
fi
# Reinstall only when setup.py or the mxnet flavour changed since the last install.
stamp="$venv/.installed-$(cat setup.py constraints.txt engine/gpu.py | "$venv/bin/python" -c 'import hashlib,sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:12])')-$flavour"
if [ ! -f "$stamp" ]; then
  echo "run.sh: installing the project and its dependencies (mxnet flavour: $flavour)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # One mxnet build at a time: both write the same mxnet/ folder.
  other=$([ "$flavour" = cpu ] && echo mxnet-cu112 || echo mxnet)
  if "$venv/bin/python" -m pip show --quiet "$other" >/dev/null 2>&1; then
    echo "run.sh: removing $other (switching to the $flavour build)"
    "$venv/bin/python" -m pip uninstall --quiet --yes "$other"
  fi
  "$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[$flavour,test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
  echo "$flavour" > "$venv/.flavour"
fi
# Any later `.venv/bin/pip install X` keeps the pins (NumPy < 1.24 for mxnet 1.9.1): pip reads this file.
printf '[install]\nconstraint = %s\n' "$PWD/constraints.txt" > "$venv/pip.conf"

# The GPU build finds its CUDA libraries in the pip wheels' folders (the scripts also set this themselves).
if [ "$flavour" != cpu ]; then
  cuda_dirs=$("$venv/bin/python" -m engine.gpu --library-path)
  export LD_LIBRARY_PATH="$cuda_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# Thread settings (OpenMP threads = the cores, ...): each script sets them, where you have not, before
# mxnet is imported (common/machine.py), and its log names them and whose they are.
case "$job" in
  setup) echo "run.sh: ready in $venv: source $venv/bin/activate (or run $venv/bin/python SCRIPT ...)" ;;
  test)  "$venv/bin/python" -m common.machine           # which CPU (and SIMD level) a failure report came from
         exec "$venv/bin/python" -m pytest tests "$@" ;;
  train) VAA_LAUNCHER="$0 train" exec "$venv/bin/python" train.py "$@" ;;   # (the resume hint uses it)
  eval)  exec "$venv/bin/python" eval.py "$@" ;;
esac
