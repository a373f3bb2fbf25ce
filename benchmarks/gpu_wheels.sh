#!/usr/bin/env bash
# The wheels the GPU machine lacks (it has no network: docs/scale.md, "GPU dress rehearsal"),
# into .whl/ (git-ignored), for its Python 3.12 on x86_64. One command, here, before a rehearsal:
#   bash benchmarks/gpu_wheels.sh
# openai-clip ships as a source archive only, so it is built into a wheel here; ftfy and wcwidth
# (clip's tokenizer), POT (the tests' transport reference) and setuptools 80 (clip imports
# pkg_resources, gone from setuptools 82) are downloaded as they are. gpu_check.sh unpacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w .whl openai-clip==1.0.1
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  ftfy==6.3.1 wcwidth==0.2.13 POT==0.9.5 setuptools==80.9.0
ls -l .whl && du -sh .whl
