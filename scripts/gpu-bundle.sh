#!/bin/sh
# What bench/gpu-check.sh needs on a GPU machine that has no Node.js (the lent H100/H200s have
# CUDA, PyTorch and nvcc, no node and no network): this machine's node binary (xz), the built
# dist/, the addon and the few packages the cuda backend loads, into .gpu/ (git-ignored), which
# a device run carries. Run after `npm install && npm run build`.
set -eu
cd "$(dirname "$0")/.."
rm -rf .gpu
mkdir -p .gpu/app/node_modules/@tensorflow .gpu/app/build/Release .gpu/app/native/cuda
xz -T0 -6 -c "$(command -v node)" > .gpu/node.xz
cp -r dist vendor package.json .gpu/app/
cp build/Release/prefopt_native.node .gpu/app/build/Release/
cp native/cuda/kernels.cu .gpu/app/native/cuda/
for p in @tensorflow/tfjs-core @tensorflow/tfjs-backend-cpu seedrandom long bindings file-uri-to-path @huggingface/tokenizers @huggingface/jinja; do
  mkdir -p ".gpu/app/node_modules/$p"
  cp -r "node_modules/$p/." ".gpu/app/node_modules/$p/"
done
# better-sqlite3: its JavaScript and the built module only (the stages' modules import the store).
mkdir -p .gpu/app/node_modules/better-sqlite3/build/Release
cp -r node_modules/better-sqlite3/lib node_modules/better-sqlite3/package.json .gpu/app/node_modules/better-sqlite3/
cp node_modules/better-sqlite3/build/Release/better_sqlite3.node .gpu/app/node_modules/better-sqlite3/build/Release/
# tfjs ships every build (ES modules, bundles for browsers, source maps): Node needs one.
find .gpu/app/node_modules/@tensorflow -path '*/dist/*' ! -name '*.node.js' ! -name 'package.json' -type f -delete
find .gpu/app -name '*.map' -delete
du -sh .gpu
