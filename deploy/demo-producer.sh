#!/bin/bash
# Demo producer for docker-compose.yml: publishes sample records of both default formats,
# forever, through two long-running kafka-console-producer.sh processes (one JVM per topic,
# not one per record). Runs in the apache/kafka image.
set -euo pipefail

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
INTERVAL="${INTERVAL:-1}"
PRODUCER="${PRODUCER:-/opt/kafka/bin/kafka-console-producer.sh}"

entity_updates() {
  local n=0 actions=(created updated deleted) priorities=(normal normal low high)
  while :; do
    printf '{"feature":"users","entity":"user","action":"%s","data":{"id":"u%d"},"meta":{"priority":"%s"}}\n' \
      "${actions[n % 3]}" $((n % 5)) "${priorities[n % 4]}"
    n=$((n + 1))
    sleep "$INTERVAL"
  done
}

task_updates() {
  local n=0
  while :; do
    printf '{"type":"progress","taskId":"t%d","userId":"42","progress":%d}\n' $((n % 3)) $(((n * 10) % 101))
    n=$((n + 1))
    sleep "$INTERVAL"
  done
}

entity_updates | "$PRODUCER" --bootstrap-server "$BOOTSTRAP" --topic entity-updates &
task_updates | "$PRODUCER" --bootstrap-server "$BOOTSTRAP" --topic task-updates &
echo "demo producer: publishing to entity-updates and task-updates every ${INTERVAL}s" >&2
# Either pipeline ending (broker gone) ends the container; compose restarts it.
wait -n
exit 1
