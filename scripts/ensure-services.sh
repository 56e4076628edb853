#!/usr/bin/env bash
# Make sure Redis and RabbitMQ answer where `make run` expects them: start local ones when
# nothing answers and the binaries exist; otherwise say exactly what to install.
set -euo pipefail
REDIS_HOST=${REDIS_HOST:-127.0.0.1} REDIS_PORT=${REDIS_PORT:-6379}
AMQP_HOST=${AMQP_HOST:-127.0.0.1} AMQP_PORT=${AMQP_PORT:-5672}
RUN_DIR=${RUN_DIR:-$(pwd)/.run}

answers() {  # host port: does anything accept TCP connections there?
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

if answers "$REDIS_HOST" "$REDIS_PORT"; then
  echo "Redis answers at $REDIS_HOST:$REDIS_PORT"
elif command -v redis-server >/dev/null; then
  mkdir -p "$RUN_DIR/redis"
  echo "starting a local redis-server on $REDIS_HOST:$REDIS_PORT (data and log in $RUN_DIR/redis)"
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" \
    --appendonly no --dir "$RUN_DIR/redis" --logfile "$RUN_DIR/redis/redis.log"
  for _ in $(seq 50); do answers "$REDIS_HOST" "$REDIS_PORT" && break; sleep 0.1; done
else
  echo "No Redis answers at $REDIS_HOST:$REDIS_PORT and redis-server is not installed." >&2
  echo "Install it (Debian/Ubuntu: sudo apt-get install redis-server) or set REDIS_HOST/REDIS_PORT." >&2
  exit 1
fi

if answers "$AMQP_HOST" "$AMQP_PORT"; then
  echo "RabbitMQ answers at $AMQP_HOST:$AMQP_PORT"
elif command -v rabbitmq-server >/dev/null; then
  echo "starting a local rabbitmq-server (rabbitmq-server -detached); this takes a few seconds"
  rabbitmq-server -detached
  for _ in $(seq 120); do answers "$AMQP_HOST" "$AMQP_PORT" && break; sleep 0.5; done
  answers "$AMQP_HOST" "$AMQP_PORT" || { echo "RabbitMQ did not come up on $AMQP_HOST:$AMQP_PORT" >&2; exit 1; }
else
  echo "No RabbitMQ answers at $AMQP_HOST:$AMQP_PORT and rabbitmq-server is not installed." >&2
  echo "Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server) or set AMQP_HOST/AMQP_PORT." >&2
  echo "(The proxy also runs without a broker: events then wait in the fallback list in Redis.)" >&2
  exit 1
fi
