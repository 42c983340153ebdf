#!/usr/bin/env bash
# One-shot GPU check (issue 30): scripts/gpu_check.py does the work; see its docstring.
#   bash scripts/gpu_check.sh [--smoke] OUTDIR      (or GPU_CHECK_OUT=OUTDIR bash scripts/gpu_check.sh)
# At most 10 minutes on one GPU; --smoke runs the same parts on the CPU in about a minute (CI).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
smoke=()
if [[ "${1:-}" == "--smoke" ]]; then smoke=(--smoke); shift; fi
out="${1:-${GPU_CHECK_OUT:-}}"
if [[ -z "$out" ]]; then
  echo "usage: bash scripts/gpu_check.sh [--smoke] OUTDIR (or set GPU_CHECK_OUT)" >&2
  exit 2
fi
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "${PYTHON:-python}" "$here/gpu_check.py" "${smoke[@]}" "$out"
