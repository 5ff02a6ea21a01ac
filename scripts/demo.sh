#!/usr/bin/env bash
# Set up, then run one example through the whole stack: a bundled nats-server,
# a veritech with the process backend, cyclone, and Deno.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/veritech run examples/image_reference.js \
  --args '{"registry": "ghcr.io", "repository": "acme/api", "tag": "1.4.2"}' "$@"
