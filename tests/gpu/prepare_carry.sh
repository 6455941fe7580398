#!/usr/bin/env bash
# Here, before a GPU lease: put what the GPU machine lacks into two git-ignored folders that the
# device tool carries (`carry: [".whl", ".gpudata"]`). The lent machines have torch, transformers,
# accelerate and pytest but no deepspeed (nor its needs hjson and pydantic) and no internet, and
# ../shared (the captions) does not travel with the checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED_DATA=${SHARED_DATA:-../shared/data/roco_v1_radiology.jsonl}
PYVER=${PYVER:-3.12}  # the GPU image's Python
for dir in .whl .gpudata; do
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
done
mkdir -p .whl .gpudata
cp "$SHARED_DATA" .gpudata/
# The versions tested here (deepspeed builds a pure-Python wheel; submitit, for `radtrain submit`,
# is not on the image either and is pure Python).
python -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" -w .whl
python -m pip download -q --no-deps -d .whl "submitit==$(python -c 'import importlib.metadata as m; print(m.version("submitit"))')"
installed() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(installed pydantic)" "pydantic-core==$(installed pydantic-core)" \
  "annotated-types==$(installed annotated-types)" "typing-inspection==$(installed typing-inspection)" \
  "hjson==$(installed hjson)"
ls -la .whl .gpudata
du -sh .whl .gpudata
