#!/usr/bin/env bash
# Wheels that benchmarks/gpu_checks.py needs beyond torch, Lightning, torchvision, timm, torchmetrics,
# scikit-learn and scipy, for an offline CUDA machine with CPython 3.12 on manylinux x86_64.
#
#   bash benchmarks/gpu_wheels.sh [DIR]      # on a machine with PyPI access; DIR defaults to .whl
#
# pytest and its needs (the CUDA tests), rich and jsonargparse[signatures] (imported by
# lightning_tricks) and airbench 0.1.8 (cifar_speed's airbench row; PyPI has only its sdist, so it is
# built into a wheel here). The versions are the ones the project is tested with; all are pure Python.
# Their own needs (PyYAML, packaging, typing-extensions) come with torch's and Lightning's. Install on
# the CUDA machine, from the repository root, without network:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/gpu_checks.py gpu_results
set -euo pipefail

dir=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dir"

"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 \
    rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 \
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
"$python" -m pip wheel --quiet --no-deps -w "$dir" airbench==0.1.8

ls -1 "$dir"
du -sh "$dir"
