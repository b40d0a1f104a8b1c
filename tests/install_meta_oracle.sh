#!/usr/bin/env bash
# Installs Meta's SAM3 package (the test oracle of tests/test_meta_oracle.py) outside site-packages.
#
# Why not the `dev` extra: sam3==0.1.4 requires numpy<2.4 and tqdm<4.68, which conflict with jalias's pins, and
# the torchvision it imports is, on PyPI, built against CUDA torch: installed next to the CPU torch its C ops fail
# to load and an importable-but-broken torchvision breaks `transformers.Sam3Model`'s import. So the packages go,
# without their dependencies, into .meta-oracle/ (or $JALIAS_META_ORACLE), which only tests/meta_reference.py puts
# on sys.path (after declaring the two torchvision op schemas its Python side needs).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${JALIAS_META_ORACLE:-.meta-oracle}"
python3 -m pip install --no-deps --target "$dest" --upgrade \
    sam3==0.1.4 torchvision==0.28.0 timm==1.0.31 iopath==0.1.10 portalocker==4.4.2 einops==0.8.2
