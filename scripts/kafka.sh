#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, broker+controller in one JVM)
# on 127.0.0.1 for the tests. Needs only java (17+), mvn and python3: the
# broker's jars come from Maven Central, nothing else is downloaded.
#
#   scripts/kafka.sh fetch          resolve the Kafka jars into the cache
#   scripts/kafka.sh start [DIR]    start a broker; last stdout line = bootstrap
#   scripts/kafka.sh stop [DIR]     stop it
#   scripts/kafka.sh status [DIR]   exit 0 and print the bootstrap if running
#   scripts/kafka.sh run CLASS ...  run a Kafka tool class with the cached jars,
#                                   e.g. org.apache.kafka.tools.TopicCommand
#
# DIR defaults to target/kafka under the repo root. Each start wipes DIR's
# data, so every broker begins empty. Several DIRs can run at once: ports are
# picked free by the OS each time.
#
# Environment:
#   ROOMCAST_CACHE        cache root (default $HOME/.cache/roomcast)
#   KAFKA_VERSION         Kafka version(s) to try, in order
#   KAFKA_HEAP_OPTS       broker heap (default -Xms128m -Xmx512m)
#   KAFKA_GC_OPTS         broker garbage collector (default G1, 20 ms pause goal)
#   KAFKA_JVM_OPTS        more JVM options for the broker (default none)
#   KAFKA_BROKER_CONFIG   more server.properties lines, space separated key=value
#                         (e.g. "num.io.threads=2"; default none)
#   KAFKA_START_TIMEOUT   seconds to wait for the broker (default 90)
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ROOMCAST_CACHE:-$HOME/.cache/roomcast}"
# Preferred first; later ones are fallbacks if Maven Central lacks one.
VERSIONS="${KAFKA_VERSION:-4.1.1 4.1.0 4.0.1 4.0.0}"
# Kafka 4 logs through slf4j 2 -> log4j2; its poms do not bring the binding.
LOG4J_VERSION="${LOG4J_VERSION:-2.24.3}"
SLF4J_VERSION="${SLF4J_VERSION:-2.0.17}"
DEP_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"

log() { echo "kafka.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- fetch

# Echo the libs dir of the first already complete cached version, if any.
cached_libs() {
  local v
  for v in $VERSIONS; do
    if [[ -f "$CACHE/kafka-$v/libs/.complete" ]]; then
      echo "$CACHE/kafka-$v/libs"
      return 0
    fi
  done
  return 1
}

# Resolve one Kafka version with its runtime dependencies into the cache.
fetch_version() {
  local v="$1" dest="$CACHE/kafka-$v/libs" tmp
  tmp="$(mktemp -d)"
  # A throwaway pom: the broker (kafka_2.13 holds kafka.Kafka and
  # kafka.tools.StorageTool), the admin/console tools, and the log4j2 binding.
  # kafka-tools' Connect dependencies (Jetty, Jersey) are not needed by the
  # topic/console tools, so they are left out to keep the cache small.
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.roomcast</groupId>
  <artifactId>kafka-libs</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$v</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$v</version>
      <exclusions>
        <exclusion><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId></exclusion>
        <exclusion><groupId>com.fasterxml.jackson.jakarta.rs</groupId><artifactId>*</artifactId></exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  log "resolving Kafka $v from Maven Central"
  # Copy into a staging dir and move it in place only when complete, so an
  # interrupted fetch never looks like a usable cache.
  rm -rf "$dest.partial"
  if ! (cd "$tmp" && mvn -q -B "$DEP_PLUGIN:copy-dependencies" \
          -DincludeScope=runtime -DoutputDirectory="$dest.partial") >"$tmp/mvn.log" 2>&1; then
    tail -n 20 "$tmp/mvn.log" >&2
    rm -rf "$tmp" "$dest.partial"
    return 1
  fi
  rm -rf "$tmp"
  # Sanity check: the classes we run must be there.
  if ! unzip_has "$dest.partial" kafka/Kafka.class \
     || ! unzip_has "$dest.partial" kafka/tools/StorageTool.class; then
    rm -rf "$dest.partial"
    log "Kafka $v jars lack kafka.Kafka or kafka.tools.StorageTool"
    return 1
  fi
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  date -u +%FT%TZ >"$dest/.complete"   # marker written last
}

# Does any jar in $1 contain the entry $2? (python: unzip may be absent)
unzip_has() {
  python3 - "$1" "$2" <<'EOF'
import glob, sys, zipfile
d, entry = sys.argv[1], sys.argv[2]
for j in glob.glob(d + "/*.jar"):
    with zipfile.ZipFile(j) as z:
        try:
            z.getinfo(entry)
            sys.exit(0)
        except KeyError:
            pass
sys.exit(1)
EOF
}

# Echo the libs dir, fetching if needed.
ensure_libs() {
  local libs v
  if libs="$(cached_libs)"; then echo "$libs"; return 0; fi
  command -v mvn >/dev/null || die "mvn not found"
  mkdir -p "$CACHE"
  # Serialize concurrent fetches (e.g. two brokers started at once).
  exec 9>"$CACHE/.kafka-fetch.lock"
  if command -v flock >/dev/null; then flock 9; fi
  if libs="$(cached_libs)"; then exec 9>&-; echo "$libs"; return 0; fi
  for v in $VERSIONS; do
    if fetch_version "$v"; then
      exec 9>&-
      echo "$CACHE/kafka-$v/libs"
      return 0
    fi
    log "Kafka $v could not be resolved, trying the next version"
  done
  exec 9>&-
  die "no Kafka version out of ($VERSIONS) could be resolved"
}

# ---------------------------------------------------------------- helpers

# Absolute instance dir from the optional argument.
instance_dir() {
  local d="${1:-$ROOT/target/kafka}"
  mkdir -p "$d"
  (cd "$d" && pwd)
}

# Quiet log4j2 config for the short-lived tools: warnings to stderr only.
tools_log_config() {
  local f="$1/log4j2-tools.properties"
  cat >"$f" <<'EOF'
status = error
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
  echo "$f"
}

# Run a Kafka class with the cached jars; tools start faster with C1 only.
run_tool() {
  local libs="$1" logcfg="$2"; shift 2
  java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$logcfg" -cp "$libs/*" "$@"
}

# Two distinct free ports on 127.0.0.1, chosen by the OS.
free_ports() {
  python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# A random KRaft cluster id (base64url of 16 random bytes, no leading '-'
# since Kafka's tools would read that as an option).
cluster_id() {
  python3 - <<'EOF'
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break
EOF
}

# Pid of our broker in $1 if it is alive (checks the command line too, so a
# stale pid file reused by another process is not taken for the broker).
running_pid() {
  local dir="$1" pid
  [[ -f "$dir/kafka.pid" ]] || return 1
  pid="$(cat "$dir/kafka.pid")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/server.properties" || return 1
  echo "$pid"
}

write_config() {
  local dir="$1" bport="$2" cport="$3"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$bport
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
  local kv
  for kv in ${KAFKA_BROKER_CONFIG:-}; do
    [[ "$kv" == *=* ]] || die "KAFKA_BROKER_CONFIG: '$kv' is not key=value"
    echo "$kv" >>"$dir/server.properties"
  done
  # The readiness probe gives up after 15 s instead of the admin default 60.
  printf 'default.api.timeout.ms=15000\nrequest.timeout.ms=10000\n' >"$dir/admin.properties"
  # The broker logs INFO to stdout, which start redirects to kafka.log.
  cat >"$dir/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
EOF
}

# Launch the broker once; returns 0 when ready, 2 when the ports were taken
# in the meantime (the caller retries), 3 on timeout (log already shown),
# 1 on any other failure.
launch() {
  local dir="$1" libs="$2" toolcfg="$3" bport cport pid deadline
  read -r bport cport < <(free_ports)
  rm -rf "$dir/data" "$dir/bootstrap" "$dir/kafka.pid"
  : >"$dir/kafka.log"   # exists before the first grep below
  : >"$dir/tools.log"
  write_config "$dir" "$bport" "$cport"

  if ! run_tool "$libs" "$toolcfg" kafka.tools.StorageTool format \
        -t "$(cluster_id)" -c "$dir/server.properties" >"$dir/format.log" 2>&1; then
    cat "$dir/format.log" >&2
    return 1
  fi

  # setsid: the broker outlives the calling shell and its Ctrl-C.
  # No log4j shutdown hook: it raced Kafka's own and cut the shutdown log.
  local detach=()
  command -v setsid >/dev/null && detach=(setsid)
  "${detach[@]}" java ${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m} \
    ${KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent} \
    ${KAFKA_JVM_OPTS:-} \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -Dlog4j2.shutdownHookEnabled=false \
    -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >"$dir/kafka.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/kafka.pid"

  # Wait for the startup line, then for a real metadata round trip.
  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$dir/kafka.pid"
      grep -q "Address already in use" "$dir/kafka.log" && return 2
      return 1
    fi
    if grep -q "Kafka Server started" "$dir/kafka.log" \
       && run_tool "$libs" "$toolcfg" org.apache.kafka.tools.TopicCommand \
            --command-config "$dir/admin.properties" \
            --bootstrap-server "127.0.0.1:$bport" --list >/dev/null 2>>"$dir/tools.log"; then
      break
    fi
    if ((SECONDS >= deadline)); then
      # Show the log before stopping, while it still says why.
      log "broker not ready after ${START_TIMEOUT}s; tail of $dir/kafka.log:"
      tail -n 40 "$dir/kafka.log" >&2
      stop_broker "$dir" >/dev/null 2>&1 || true
      return 3
    fi
    sleep 0.5
  done
  echo "127.0.0.1:$bport" >"$dir/bootstrap"
}

# ---------------------------------------------------------------- commands

start_broker() {
  local dir libs toolcfg attempt rc
  dir="$(instance_dir "${1:-}")"
  if running_pid "$dir" >/dev/null && [[ -f "$dir/bootstrap" ]]; then
    log "already running in $dir"
    cat "$dir/bootstrap"
    return 0
  fi
  libs="$(ensure_libs)"
  toolcfg="$(tools_log_config "$dir")"
  for attempt in 1 2 3; do
    rc=0
    launch "$dir" "$libs" "$toolcfg" || rc=$?
    case "$rc" in
      0) cat "$dir/bootstrap"; return 0 ;;
      2) log "port taken before the broker bound it, retrying ($attempt)" ;;
      3) exit 1 ;;
      *) break ;;
    esac
  done
  log "broker failed to start; tail of $dir/kafka.log:"
  tail -n 40 "$dir/kafka.log" >&2 2>/dev/null || true
  exit 1
}

stop_broker() {
  local dir pid i
  dir="$(instance_dir "${1:-}")"
  if ! pid="$(running_pid "$dir")"; then
    rm -f "$dir/kafka.pid" "$dir/bootstrap"
    log "not running ($dir)"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  # A clean shutdown takes a few seconds; give it 20 before SIGKILL.
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "broker $pid ignored SIGTERM, killing"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  # The bootstrap goes too, so nobody connects to a dead address.
  rm -f "$dir/kafka.pid" "$dir/bootstrap"
  log "stopped ($dir)"
}

status_broker() {
  local dir
  dir="$(instance_dir "${1:-}")"
  if running_pid "$dir" >/dev/null && [[ -f "$dir/bootstrap" ]]; then
    cat "$dir/bootstrap"
    return 0
  fi
  log "not running ($dir)"
  return 1
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  fetch)  ensure_libs >/dev/null; log "cache ready: $(cached_libs)" ;;
  start)  start_broker "${1:-}" ;;
  stop)   stop_broker "${1:-}" ;;
  status) status_broker "${1:-}" ;;
  run)
    [[ $# -gt 0 ]] || die "usage: $0 run CLASS [ARGS...]"
    libs="$(ensure_libs)"
    tmpcfg="$(mktemp -d)"
    trap 'rm -rf "$tmpcfg"' EXIT
    run_tool "$libs" "$(tools_log_config "$tmpcfg")" "$@"
    ;;
  *)
    echo "usage: $0 {fetch|start [DIR]|stop [DIR]|status [DIR]|run CLASS [ARGS...]}" >&2
    exit 2
    ;;
esac
