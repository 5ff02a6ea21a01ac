#!/usr/bin/env bash
# Set up a fresh machine for veritech: a virtualenv in .venv with the project
# installed (extras in $1, e.g. "dev"), and bubblewrap when we may install it.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"

# bubblewrap sandboxes the process backend; without it veritech still runs,
# unsandboxed, and says so at startup.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing bubblewrap" >&2
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap) >/dev/null \
    || echo "setup: could not install bubblewrap; the process backend will run unsandboxed" >&2
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "setup: installing veritech ($spec)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
