#!/bin/sh
# Bounded demo traffic through the nginx in front of both gateways: REQUESTS requests
# (default 20000) spread over the three chains, some streamed, CONCURRENCY at a time.
set -eu
URL=${URL:-http://nginx:8080}
REQUESTS=${REQUESTS:-20000}
CONCURRENCY=${CONCURRENCY:-4}
one() {
  case $(( $1 % 4 )) in
    0) task=complex_reasoning ;;
    1) task=simple_generation ;;
    *) task=default ;;
  esac
  stream=false
  [ $(( $1 % 5 )) -eq 0 ] && stream=true
  curl -s -o /dev/null -m 30 -H 'content-type: application/json' -H "x-cascade-task: $task" \
    -d "{\"model\":\"$task\",\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"demo request $1\"}]}" \
    "$URL/v1/chat/completions" || true
}
i=0
while [ "$i" -lt "$REQUESTS" ]; do
  j=0
  while [ "$j" -lt "$CONCURRENCY" ] && [ "$i" -lt "$REQUESTS" ]; do
    one "$i" &
    i=$((i + 1)); j=$((j + 1))
  done
  wait
done
echo "demo-load: sent $REQUESTS requests"
