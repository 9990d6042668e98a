#!/usr/bin/env bash
# Wheels for what benchmarks/gpu_check.py imports and a bare GPU machine may lack (fvcore, which counts the
# GFLOPs per video, and its pure-Python needs beyond numpy/Pillow/PyYAML/tabulate/tqdm/portalocker), built into
# ./.whl (git-ignored) at the versions CI installs. On the GPU machine, with .whl carried along:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0
ls -l .whl
