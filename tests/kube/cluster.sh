#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for tests: etcd, kube-apiserver and, with
# --kcm, kube-controller-manager, built by tests/kube/build.sh.
#
# Usage:
#   cluster.sh up DIR [--kcm] [--stdin]   start; prints "ready DIR/kubeconfig" when /readyz
#                                         answers ok, then stays in the foreground until
#                                         SIGTERM/SIGINT (or, with --stdin, until its standard
#                                         input closes: a test process that dies takes its
#                                         control plane with it) and stops what it started
#   cluster.sh down DIR                   stop the cluster that `up DIR` runs
#   cluster.sh restart-apiserver DIR      stop kube-apiserver and start it again, same flags
#   cluster.sh token DIR NS SA [FILE]     mint a ServiceAccount token (TokenRequest) and write a
#                                         kubeconfig that authenticates with it (default
#                                         DIR/kubeconfig-NS-SA); prints the file's path
#
# DIR gets: pki/ (a CA, the API server's serving certificate, an admin client certificate in
# system:masters, the ServiceAccount signing key), kubeconfig (admin), ports.env (ETCD_PORT,
# APISERVER_PORT, APISERVER_URL), audit.log (every request at Metadata level: user, verb, URI,
# response code) and one log per component. The API server runs with
# --authorization-mode=Node,RBAC and ServiceAccount token signing, so a test can run a binary
# as a ServiceAccount with exactly the RBAC it was given. Ports are free loopback ports picked at
# start; nothing listens on any other address.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n 5,15p "$0" >&2; exit 2; }
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)

log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }

free_port() { python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

pki() {
  local p=$dir/pki
  mkdir -p "$p"
  [ -s "$p/admin.crt" ] && return 0
  (
    cd "$p" || exit 1
    set -e
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 \
      -subj "/CN=ktgt-test-ca" 2>/dev/null
    cat >serving.ext <<'EOF'
subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, IP:10.0.0.1
extendedKeyUsage = serverAuth
EOF
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile serving.ext -out apiserver.crt 2>/dev/null
    printf 'extendedKeyUsage = clientAuth\n' >client.ext
    client() { # name CN O
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2${3:+/O=$3}" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
        -extfile client.ext -out "$1.crt" 2>/dev/null
    }
    client kcm system:kube-controller-manager ""
    client admin kube-admin system:masters
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  ) || die "generating the PKI failed (openssl)"
}

kubeconfig() { # file user-name credential-lines (indented for the user: map)
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: $APISERVER_URL
    certificate-authority: $dir/pki/ca.crt
users:
- name: $2
  user:
$3
contexts:
- name: test
  context: {cluster: test, user: $2}
current-context: test
EOF
}

cert_kubeconfig() { # file cert key
  kubeconfig "$1" user "    client-certificate: $2
    client-key: $3"
}

pid_of() { [ -s "$dir/$1.pid" ] && cat "$dir/$1.pid"; }
alive() { local p; p=$(pid_of "$1") && kill -0 "$p" 2>/dev/null; }

stop_one() { # name
  local p; p=$(pid_of "$1") || return 0
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  fi
  rm -f "$dir/$1.pid"
}

tail_logs() {
  for c in etcd kube-apiserver kube-controller-manager; do
    [ -s "$dir/$c.log" ] || continue
    echo "----- last lines of $dir/$c.log" >&2
    tail -n 25 "$dir/$c.log" >&2
  done
}

start_etcd() {
  "$BIN/etcd" --name default --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "http://127.0.0.1:$ETCD_METRICS_PORT" \
    --unsafe-no-fsync --quota-backend-bytes=4294967296 >>"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
}

start_apiserver() {
  local p=$dir/pki
  cat >"$dir/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
EOF
  "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --client-ca-file "$p/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --api-audiences https://kubernetes.default.svc \
    --authorization-mode Node,RBAC \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true \
    --etcd-compaction-interval "${KUBE_ETCD_COMPACTION_INTERVAL:-5m}" \
    --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/audit.log" \
    --audit-log-format json --audit-log-mode blocking \
    --enable-priority-and-fairness=false \
    --profiling=false \
    ${KUBE_APISERVER_ARGS:-} >>"$dir/kube-apiserver.log" 2>&1 &
  echo $! >"$dir/kube-apiserver.pid"
}

wait_ready() { # seconds
  local deadline=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    alive kube-apiserver || { log "kube-apiserver exited"; return 1; }
    if curl -fsS --max-time 2 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
      "$APISERVER_URL/readyz" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  log "kube-apiserver not ready after $1 s"
  return 1
}

start_kcm() {
  "$BIN/kube-controller-manager" \
    --kubeconfig "$dir/kubeconfig-kcm" \
    --authentication-kubeconfig "$dir/kubeconfig-kcm" --authorization-kubeconfig "$dir/kubeconfig-kcm" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file "$dir/pki/ca.crt" --cluster-signing-key-file "$dir/pki/ca.key" \
    --leader-elect=false --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller' \
    ${KUBE_KCM_ARGS:-} >>"$dir/kube-controller-manager.log" 2>&1 &
  echo $! >"$dir/kube-controller-manager.pid"
}

load_env() {
  [ -s "$dir/ports.env" ] || die "$dir has no running cluster (no ports.env)"
  # shellcheck disable=SC1091
  . "$dir/ports.env"
}

down() {
  stop_one kube-controller-manager
  stop_one kube-apiserver
  stop_one etcd
}

case $cmd in
up)
  shift 2
  with_kcm=0 watch_stdin=0
  for a in "$@"; do
    case $a in --kcm) with_kcm=1;; --stdin) watch_stdin=1;; *) die "unknown option $a";; esac
  done
  BIN=${KUBE_BIN:-$(bash "$here/build.sh" | tail -1)} || die "tests/kube/build.sh failed"
  for b in etcd kube-apiserver kube-controller-manager kubectl; do
    [ -x "$BIN/$b" ] || die "no $BIN/$b (run tests/kube/build.sh)"
  done
  alive kube-apiserver && die "a cluster already runs in $dir"
  pki
  ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); ETCD_METRICS_PORT=$(free_port)
  APISERVER_PORT=$(free_port); KCM_PORT=$(free_port)
  APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
  cat >"$dir/ports.env" <<EOF
BIN=$BIN
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
ETCD_METRICS_PORT=$ETCD_METRICS_PORT
APISERVER_PORT=$APISERVER_PORT
APISERVER_URL=$APISERVER_URL
KCM_PORT=$KCM_PORT
WITH_KCM=$with_kcm
EOF
  cert_kubeconfig "$dir/kubeconfig" "$dir/pki/admin.crt" "$dir/pki/admin.key"
  cert_kubeconfig "$dir/kubeconfig-kcm" "$dir/pki/kcm.crt" "$dir/pki/kcm.key"
  trap 'down; rm -f "$dir/up.pid"; exit 0' TERM INT HUP
  echo $$ >"$dir/up.pid"
  t0=$(date +%s.%N)
  start_etcd
  start_apiserver
  if ! wait_ready 120; then tail_logs; down; exit 1; fi
  if ((with_kcm)); then start_kcm; fi
  log "ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s: $APISERVER_URL (etcd 127.0.0.1:$ETCD_PORT)"
  echo "ready $dir/kubeconfig"
  if ((watch_stdin)); then
    # Until the parent closes our standard input (or dies), checking the components.
    while read -r -t 1 _ || [ $? -gt 128 ]; do :; done
    down; rm -f "$dir/up.pid"
    exit 0
  fi
  while :; do sleep 1 & wait $!; done
  ;;
down)
  load_env
  if p=$(pid_of up) && kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p"
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
  down
  ;;
restart-apiserver)
  load_env
  stop_one kube-apiserver
  start_apiserver
  wait_ready 120 || { tail_logs; exit 1; }
  echo "restarted"
  ;;
token)
  load_env
  ns=${3:?namespace}; sa=${4:?service account}; out=${5:-$dir/kubeconfig-$ns-$sa}
  tok=$("$BIN/kubectl" --kubeconfig "$dir/kubeconfig" -n "$ns" create token "$sa" --duration 24h) ||
    die "TokenRequest for $ns/$sa failed"
  kubeconfig "$out" "$sa" "    token: $tok"
  echo "$out"
  ;;
*)
  sed -n 5,15p "$0" >&2; exit 2
  ;;
esac
