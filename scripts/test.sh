#!/usr/bin/env bash
# Set up everything the tests need, then run: ruff, mypy --strict, pytest.
# Docker tests need an engine and the cyclone image; this script provides both
# where it can. Under CI=true a missing Docker engine is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev

if [ "${VERITECH_SKIP_DOCKER:-}" != 1 ]; then
  if ./scripts/ensure-docker.sh; then
    .venv/bin/veritech image build
    export VERITECH_DOCKER=1
  elif [ "${CI:-}" = true ]; then
    echo "test: no Docker engine could be had, and CI=true requires one" >&2
    exit 1
  else
    echo "test: no Docker engine; docker tests will be skipped" >&2
  fi
fi

echo "test: ruff" >&2
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/ruff check src tests benchmarks
echo "test: mypy --strict src" >&2
.venv/bin/mypy --strict src
echo "test: pytest" >&2
.venv/bin/python -m pytest "$@"
