#!/usr/bin/env bash
# The walk-through with Docker Compose: deploy v1, switch to v2 under traffic, pause, stop with a
# message, resume, remove. Without Docker, run: python3 example/walkthrough.py
set -euo pipefail
cd "$(dirname "$0")"
kp() { docker compose exec -T proxy kamal-proxy "$@"; }
traffic=$(mktemp); trap 'rm -f "$traffic"' EXIT
get() { curl -s -o - -w "  [%{http_code}]\n" http://localhost:8080/; }

docker compose up -d --build
until kp list >/dev/null 2>&1; do sleep 0.5; done

echo "== deploy v1";            kp deploy web --target app-v1:8000; get
echo "== switch to v2 under traffic"
( for _ in $(seq 1 200); do curl -s -o /dev/null -w "%{http_code}\n" http://localhost:8080/; done ) > "$traffic" &
kp deploy web --target app-v2:8000; wait
echo "   non-200 answers during the switch: $(grep -vc '^200$' "$traffic" || true)"; get
echo "== pause (requests wait)"; kp pause web; ( sleep 1; kp resume web ) & get; wait
echo "== stop with a message";  kp stop web --message "Back in 5 minutes"; get
echo "== resume";               kp resume web; get
echo "== remove";               kp remove web; get
kp list
