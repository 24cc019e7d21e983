#!/usr/bin/env bash
# The image's HEALTHCHECK: GET /health on this container's tessera; exit 0 on HTTP 200.
# Plain bash (/dev/tcp), so the slim image needs no curl. The port is TESSERA_PORT
# (default 8000), the one the entrypoint serves on; TESSERA_HEALTH_HOST overrides 127.0.0.1.
set -euo pipefail
port="${TESSERA_PORT:-8000}"
case "$port" in *://*) port=8000 ;; esac
host="${TESSERA_HEALTH_HOST:-127.0.0.1}"
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /health HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
status=""
IFS= read -r -t 2 status <&3 || true
exec 3<&-
case "$status" in
  "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "tessera-healthcheck: /health answered: ${status:-nothing}" >&2
exit 1
