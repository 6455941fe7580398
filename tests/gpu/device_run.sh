#!/usr/bin/env bash
# The whole command for a GPU lease (device tool: `bash tests/gpu/device_run.sh`, carry
# [".whl", ".gpudata"], made by tests/gpu/prepare_carry.sh). It finds the interpreter that has
# torch, installs the carried wheels into a fresh folder, checks in seconds that torch sees the GPU
# and radtrain imports, and only then runs tests/gpu/bench_gpu.sh.
#
# Written after a lease was lost (2026-11-27): a wrapper script was written to /tmp/bin/python,
# which an earlier call of the same warm machine had made a SYMLINK to the image's python3; the
# write went through the link and replaced the interpreter with a script that exec'd itself, and
# every step then hung until its timeout. Hence: nothing here writes outside a fresh mktemp folder,
# the interpreter is called by its own path ($PY), and a 60 s preflight stops the run at once.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/bench-gpu}
BUDGET=${BUDGET:-440}
export BUDGET RADTRAIN_GPU_DEADLINE=$(($(date +%s) + BUDGET))  # bench_gpu.sh's steps end by then
mkdir -p "$OUT"
SITE=$(mktemp -d /tmp/radtrain-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT  # a warm machine keeps /tmp between calls

PY=""
for candidate in "${PY_CANDIDATE:-}" /opt/torch/.venv/bin/python3 $(which -a python3 python 2>/dev/null); do
  [ -n "$candidate" ] && [ -x "$candidate" ] || continue
  if timeout 60 "$candidate" -c "import torch" >/dev/null 2>&1; then PY=$candidate; break; fi
done
[ -n "$PY" ] || { echo "device_run: no python with torch found" | tee "$OUT/preflight.txt"; exit 3; }
echo "python: $PY"

if compgen -G ".whl/*.whl" >/dev/null; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    2>&1 | grep -v "WARNING: Running pip as" || true
fi
export PY PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

need_cuda=${REQUIRE_CUDA:-1}
if ! timeout 60 "$PY" - "$need_cuda" <<'PY' 2>&1 | tee "$OUT/preflight.txt"; then
import sys
import torch, yaml, transformers, accelerate  # noqa: F401  (what radtrain needs at import)
sys.path.insert(0, ".")
import contextlib, io
from radtrain.cli import UNAVAILABLE_EXTRAS, main
# `bench --help` registers the extras (a missing dependency shows here) and ends in argparse's
# SystemExit(0): caught, or this script would end there, green, with nothing below checked.
try:
    with contextlib.redirect_stdout(io.StringIO()):  # the help text itself is noise here
        main(["bench", "--help"])
except SystemExit as exc:
    assert exc.code in (0, None), f"radtrain bench --help exited {exc.code}"
print("radtrain CLI ok; unavailable extras:", UNAVAILABLE_EXTRAS or "none")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as exc:  # the ZeRO step reports it; the rest can run
    print("deepspeed unavailable:", type(exc).__name__, exc)
if sys.argv[1] == "1" and not torch.cuda.is_available():
    sys.exit("preflight: torch sees no CUDA device")
PY
  echo "device_run: preflight failed (see above); nothing else was run"
  exit 3
fi

DATA=${DATA:-.gpudata/roco_v1_radiology.jsonl} bash tests/gpu/bench_gpu.sh
