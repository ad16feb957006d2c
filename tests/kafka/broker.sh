#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft) broker on free 127.0.0.1 ports, for tests and by hand.
#   broker.sh start DIR   fetch the jars once (Maven), format DIR, start the broker, print
#                         `bootstrap=127.0.0.1:PORT` once it accepts connections
#   broker.sh stop DIR    stop the broker started in DIR
#   broker.sh resume DIR  start the broker stopped in DIR again: same ports, same data
# The jars are copied by Maven from tests/kafka/pom.xml into $K2D_TEST_KAFKA_CACHE (default
# .ci/cache/kafka, git-ignored). Broker logs go to DIR/broker.log.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${K2D_TEST_KAFKA_CACHE:-$root/.ci/cache/kafka}"
start_timeout="${K2D_TEST_KAFKA_START_TIMEOUT:-90}"

die() { echo "broker.sh: $*" >&2; exit 1; }

fetch_jars() {
    [[ -f "$cache/jars/.complete" ]] && return 0
    command -v mvn >/dev/null || die "mvn not found: Maven is needed to fetch the Kafka jars"
    mkdir -p "$cache"
    (
        # One fetch at a time: test sessions may start side by side on one machine.
        flock 9
        [[ -f "$cache/jars/.complete" ]] && exit 0
        rm -rf "$cache/jars"
        mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
            -DoutputDirectory="$cache/jars" -DincludeScope=runtime >"$cache/mvn.log" 2>&1 \
            || die "Maven could not fetch the Kafka jars (see $cache/mvn.log)"
        touch "$cache/jars/.complete"
    ) 9>"$cache/.lock"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

accepts() {  # true once something listens on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    local dir="$1"
    command -v java >/dev/null || die "java not found: a Java 17+ runtime is needed"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [[ -f "$dir/broker.pid" ]] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
        die "a broker already runs from $dir (pid $(cat "$dir/broker.pid"))"
    fi
    fetch_jars
    local port cport cluster_id
    port="$(free_port)"
    cport="$(free_port)"
    while [[ "$cport" == "$port" ]]; do cport="$(free_port)"; done
    cluster_id="$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')"
    rm -rf "$dir/logs"
    rm -f "$dir/broker.log"
    cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/logs
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
    java "${jvm[@]}" -cp "$cache/jars/*" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$dir/server.properties" --standalone >"$dir/format.log" 2>&1 \
        || die "formatting $dir failed (see $dir/format.log)"
    echo "127.0.0.1:$port" >"$dir/bootstrap"
    launch "$dir"
}

resume() {
    local dir="$1"
    [[ -f "$dir/server.properties" && -f "$dir/bootstrap" ]] || die "no broker was started in $dir"
    if [[ -f "$dir/broker.pid" ]] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
        die "a broker already runs from $dir (pid $(cat "$dir/broker.pid"))"
    fi
    dir="$(cd "$dir" && pwd)"
    launch "$dir"
}

launch() {  # run the broker formatted in $1 until it accepts connections
    local dir="$1" port cp
    port="$(cut -d: -f2 <"$dir/bootstrap")"
    cp="$cache/jars/*"
    # setsid: the broker outlives this script and is not hit by the caller's Ctrl-C.
    setsid java "${jvm[@]}" -cp "$cp" kafka.Kafka "$dir/server.properties" \
        >"$dir/broker.log" 2>&1 </dev/null &
    echo $! >"$dir/broker.pid"
    local deadline=$((SECONDS + start_timeout)) pid
    pid="$(cat "$dir/broker.pid")"
    if [[ -n "${K2D_TEST_KAFKA_WATCH_PID:-}" ]]; then
        # A test session that dies without stopping its broker does not leave it running.
        setsid bash -c "while kill -0 $K2D_TEST_KAFKA_WATCH_PID && kill -0 $pid; do sleep 2; done
                        kill $pid" >/dev/null 2>&1 </dev/null &
    fi
    until accepts "$port" && grep -q "Kafka Server started" "$dir/broker.log"; do
        kill -0 "$pid" 2>/dev/null || die "the broker exited during start (see $dir/broker.log)"
        if ((SECONDS >= deadline)); then
            kill "$pid" 2>/dev/null || true
            die "the broker did not accept connections within ${start_timeout}s (see $dir/broker.log)"
        fi
        sleep 0.2
    done
    echo "bootstrap=127.0.0.1:$port"
}

stop() {
    local dir="$1" pid
    [[ -f "$dir/broker.pid" ]] || die "no broker.pid in $dir"
    pid="$(cat "$dir/broker.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$dir/broker.pid"
    echo "stopped"
}

# Startup of a short-lived test broker: no JIT beyond C1, a small serial heap.
jvm=(-Xmx512m -Xms256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)

case "${1:-}:${2:-}" in
    start:?*) start "$2" ;;
    stop:?*) stop "$2" ;;
    resume:?*) resume "$2" ;;
    *) echo "usage: $0 start|stop|resume DIR" >&2; exit 2 ;;
esac
