#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the packages benchmarks/gpu.sh needs that the GPU image lacks, for its Python 3.12
# on x86-64. Run here, where pip reaches the package index; the device call then carries .whl.
set -euo pipefail
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl grain array-record portpicker more-itertools ftfy wcwidth open_clip_torch torchscale==0.3.0
python3 -m pip wheel -q --no-deps -w .whl fairscale==0.4.13  # a source release only: built here, pure Python
du -sh .whl
