#!/usr/bin/env bash
# Aggregate tokens/s at 16 concurrent streams with every row on the base model, on one
# adapter, and on 8 distinct adapters, side by side in one run (one server, the fixture
# adapters registered under 8 names, so each is its own slot).
#   benches/lora_load.sh [REQUESTS] [MAX_TOKENS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
requests="${1:-32}"
max_tokens="${2:-64}"
model="$("$root/scripts/fetch-model")"
ad="$root/../shared/fixtures/adapters"
(cd "$root" && cargo build --release -p tessera-server --bin tessera >&2)
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$root/target/release/tessera" serve --model "$model" --port "$port" --threads 2 --max-loras 8 \
  --lora a1="$ad/pirate" --lora a2="$ad/shout" --lora a3="$ad/pirate-r16-qv" --lora a4="$ad/pirate" \
  --lora a5="$ad/shout" --lora a6="$ad/pirate-r16-qv" --lora a7="$ad/pirate" --lora a8="$ad/shout" \
  >"$root/target/lora-load-server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=1)" 2>/dev/null && break
  sleep 0.2
done
base="$(python3 -c "import json,urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:$port/v1/models'))['data'][0]['id'])")"
run() {
  python3 "$root/benches/serve_load.py" --url "http://127.0.0.1:$port" --concurrency 16 \
    --requests-per-level "$requests" --max-tokens "$max_tokens" --models "$1" 2>/dev/null |
    python3 -c "import json,sys; l=json.load(sys.stdin)['levels'][0]; print(l['tokens_per_s'], l['errors'])"
}
read -r b be <<<"$(run "$base")"
read -r one oe <<<"$(run a1)"
read -r eight ee <<<"$(run a1,a2,a3,a4,a5,a6,a7,a8)"
python3 - "$b" "$one" "$eight" "$be" "$oe" "$ee" <<'PY'
import sys
b, one, eight = map(float, sys.argv[1:4])
errs = sys.argv[4:7]
print(f"{'rows':<12}{'tokens/s':>10}{'vs base':>9}{'errors':>8}")
for name, v, e in [("base", b, errs[0]), ("1 adapter", one, errs[1]), ("8 adapters", eight, errs[2])]:
    print(f"{name:<12}{v:>10.1f}{v / b:>9.2f}{e:>8}")
PY
