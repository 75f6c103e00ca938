#!/usr/bin/env bash
# Starts qwen_flash_jax.main on every worker of a TPU VM slice. Usage: TPU=... ZONE=... bash tpu/run_on_pod.sh ARGS
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")}
if [ -z "$REPO" ]; then echo "error: set REPO to a git URL the workers can clone" >&2; exit 2; fi
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d qwen_flash_jax ] || git clone -q $REPO qwen_flash_jax
  cd qwen_flash_jax && git pull -q
  python3 -m pip install -q -e . 'jax[tpu]'
  python3 -m qwen_flash_jax.main --distributed $args"
