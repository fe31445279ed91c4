#!/usr/bin/env bash
# Creates (or refreshes) .venv at the repository root and installs fp4jax editable with
# its test and experiment extras. Prefers Python >= 3.12 (newest JAX); if only 3.11 is
# available it falls back to it with jax 0.10.2, the newest JAX that supports 3.11.
# Set FP4JAX_PYTHON to force an interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

version_ok() {  # $1: interpreter, $2: minimum minor version of Python 3
  [ -n "$1" ] && [ -x "$(command -v "$1" 2>/dev/null || echo "$1")" ] &&
    "$1" -c "import sys, venv; sys.exit(0 if sys.version_info[:2] >= (3, $2) else 1)" 2>/dev/null
}

candidates=("${FP4JAX_PYTHON:-}" python3.14 python3.13 python3.12)
if command -v pyenv >/dev/null 2>&1; then
  for p in "$(pyenv root)"/versions/3.1[2-9]*/bin/python; do candidates+=("$p"); done
fi
candidates+=(python3)

PY="" CONSTRAINT=""
for c in "${candidates[@]}"; do
  if version_ok "$c" 12; then PY="$c"; break; fi
done
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if version_ok "$c" 11; then PY="$c"; CONSTRAINT="jax==0.10.2 jaxlib==0.10.2"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "fp4jax setup: no Python >= 3.11 found; install one or set FP4JAX_PYTHON" >&2
  exit 1
fi

stamp=".venv/.fp4jax-setup"
want="$("$PY" -c 'import sys; print(sys.version.split()[0])') $(cksum pyproject.toml | cut -d' ' -f1) $CONSTRAINT"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
echo "fp4jax setup: creating .venv with $PY ($("$PY" --version 2>&1))${CONSTRAINT:+, fallback: $CONSTRAINT}"
rm -rf .venv
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q -e ".[test,experiments]" $CONSTRAINT
echo "$want" > "$stamp"
.venv/bin/python -c "import jax, fp4jax; print('fp4jax setup: jax', jax.__version__, 'on', jax.devices()[0].platform)"
