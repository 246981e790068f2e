#!/usr/bin/env bash
# A throwaway RabbitMQ node on 127.0.0.1:5673 for the external-broker tests, without
# systemd: `.ci/rabbitmq.sh start` prints the URL to export as MQIC_TEST_RABBITMQ_URL,
# `.ci/rabbitmq.sh stop` stops the node (and its epmd) again. Needs rabbitmq-server (apt).
set -euo pipefail
base=${MQIC_RABBITMQ_BASE:-/tmp/mqic-ci-rabbitmq}
bin=/usr/lib/rabbitmq/bin
env_file=$base/env

case "${1:-}" in
start)
  mkdir -p "$base"
  chown rabbitmq:rabbitmq "$base"
  cat > "$env_file" <<EOF
export HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=mqicci@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5673 RABBITMQ_DIST_PORT=25673
export RABBITMQ_MNESIA_BASE=$base/mnesia RABBITMQ_LOG_BASE=$base/log RABBITMQ_PID_FILE=$base/rabbit.pid
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  runuser -u rabbitmq -- bash -c ". $env_file; $bin/rabbitmq-server -detached; $bin/rabbitmqctl wait --timeout 120 \$RABBITMQ_PID_FILE" >&2
  echo "amqp://guest:guest@127.0.0.1:5673/%2F"
  ;;
stop)
  if [ -f "$env_file" ]; then
    # With a pid file named, rabbitmqctl waits for that file to appear: name it only when
    # the node wrote one, and bound the wait either way.
    runuser -u rabbitmq -- bash -c ". $env_file; if [ -f \$RABBITMQ_PID_FILE ]; then timeout 120 $bin/rabbitmqctl stop \$RABBITMQ_PID_FILE; else timeout 30 $bin/rabbitmqctl stop; fi" >&2 || true
    runuser -u rabbitmq -- bash -c ". $env_file; epmd -kill" >/dev/null 2>&1 || true
  fi
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
