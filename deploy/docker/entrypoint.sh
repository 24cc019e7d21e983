#!/usr/bin/env bash
# tessera's container entrypoint: the TESSERA_* environment -> `tessera serve` flags.
#
#   TESSERA_MODEL=/models/m.gguf TESSERA_PORT=8000 entrypoint.sh [extra tessera serve args]
#
# Each variable of `tessera serve --help` ([env: TESSERA_*]) becomes its flag
# (TESSERA_MAX_NUM_SEQS=8 -> --max-num-seqs 8; TESSERA_LORA=a=/p,b=/q -> --lora a=/p --lora b=/q),
# so the effective command line is printed once at start and every value is checked by
# tessera's own parser. What this adds over tessera's built-in env fallback:
#   - empty variables count as unset (manifests often template optional values as "");
#   - Kubernetes service links (TESSERA_PORT=tcp://10.0.0.7:8000 and TESSERA_SERVICE_*, which
#     a Service named `tessera` injects into every pod of its namespace) are dropped with a
#     warning instead of failing the port parser;
#   - an unknown TESSERA_* name (a typo such as TESSERA_MAX_LORA) is reported;
#   - a missing model file gets a message about the volume / the fetch step.
# TESSERA_API_KEY stays in the environment (tessera reads it there): secrets never go on a
# command line, where `ps` and /proc would show them.
#
# Outside a container it runs the same way: the binary is TESSERA_BIN, else `tessera` on
# PATH, else target/release/tessera of the checkout this script lives in.
set -euo pipefail

log() { printf 'tessera-entrypoint: %s\n' "$*" >&2; }

# NAME (after TESSERA_) -> flag. Keep in step with crates/server/src/config.rs;
# tests/deploy checks this list against `tessera serve --help`.
known=(
  MODEL HOST PORT SERVED_MODEL_NAME MAX_QUEUED_REQUESTS MAX_NUM_SEQS MAX_NUM_BATCHED_TOKENS
  MAX_MODEL_LEN BLOCK_SIZE KV_CACHE_BYTES KV_CACHE_DTYPE THREADS QUANTIZE ACT8_PROMPTS DEVICE KERNEL_CACHE_DIR SHUTDOWN_TIMEOUT MAX_BODY_BYTES MAX_LORAS
  LORA MAX_LORA_RANK MAX_CPU_LORAS LORA_ROOT LOG_FORMAT
)
# Read by tessera itself from the environment, never passed as a flag.
env_only=(API_KEY)
# This script's own settings.
own=(BIN HEALTH_HOST)

bin="${TESSERA_BIN:-}"
if [ -z "$bin" ]; then
  if command -v tessera >/dev/null 2>&1; then
    bin="$(command -v tessera)"
  else
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    bin="$here/../../target/release/tessera"
  fi
fi
if [ ! -x "$bin" ]; then
  log "no tessera binary at $bin (set TESSERA_BIN, or build: cargo build --release -p tessera-server --bin tessera)"
  exit 127
fi
unset TESSERA_BIN

# Kubernetes service links for a Service named `tessera`: not configuration.
if [[ "${TESSERA_PORT:-}" == *://* ]]; then
  log "ignoring TESSERA_PORT=$TESSERA_PORT (a Kubernetes service link; set enableServiceLinks: false in the pod spec)"
  unset TESSERA_PORT
fi
for v in $(compgen -e); do
  case "$v" in
    TESSERA_SERVICE_HOST | TESSERA_SERVICE_PORT | TESSERA_SERVICE_PORT_* | TESSERA_PORT_*_TCP*)
      unset "$v"
      ;;
  esac
done

is_in() {
  local x="$1"
  shift
  local y
  for y in "$@"; do [ "$x" = "$y" ] && return 0; done
  return 1
}

args=()
for name in "${known[@]}"; do
  var="TESSERA_$name"
  value="${!var-}"
  unset "$var"
  [ -n "$value" ] || continue
  flag="--$(printf '%s' "$name" | tr 'A-Z_' 'a-z-')"
  if [ "$name" = LORA ]; then
    IFS=',' read -r -a adapters <<<"$value"
    for a in "${adapters[@]}"; do
      [ -n "$a" ] && args+=("$flag" "$a")
    done
  else
    args+=("$flag" "$value")
  fi
  if [ "$name" = MODEL ] && [ "$value" != default ] && [ ! -e "$value" ]; then
    log "no model at $value: mount the models volume there (read-only is fine), or run the fetch step first"
    log "  (docker: --target fetch-model of Dockerfile.cpu; Kubernetes: deploy/k8s/fetch-model-job.yaml; here: scripts/fetch-model)"
    exit 2
  fi
done
for name in "${env_only[@]}"; do
  var="TESSERA_$name"
  [ -n "${!var-}" ] || unset "$var"
done

unknown=()
for v in $(compgen -e); do
  case "$v" in
    TESSERA_*)
      name="${v#TESSERA_}"
      is_in "$name" "${env_only[@]}" "${own[@]}" || unknown+=("$v")
      ;;
  esac
done
if [ "${#unknown[@]}" -gt 0 ]; then
  log "warning: unknown variables ignored: ${unknown[*]} (known: ${known[*]} ${env_only[*]})"
fi

log "exec $bin serve ${args[*]} $*"
exec "$bin" serve "${args[@]}" "$@"
