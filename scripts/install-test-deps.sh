#!/usr/bin/env bash
# Installs what the test suite needs from Debian's packages: coturn's turnutils_* clients and
# turnserver (interop and the side-by-side benchmark), promtool (metrics format check),
# Chromium with its driver and Firefox ESR (browser end-to-end tests; Firefox is driven over
# WebDriver BiDi, so no geckodriver); iproute2, iptables and nginx for the
# network lab (tests/lab: namespaces, NAT routers, a reverse proxy); clang, libbpf-dev and the
# kernel's UAPI headers to build the eBPF program of the kernel offload (--features
# kernel-offload), ethtool for its lab test; redis-server for the cluster-mode tests.
# Idempotent; safe to re-run.
set -euo pipefail

need=()
command -v turnutils_uclient >/dev/null 2>&1 || need+=(coturn)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v firefox-esr >/dev/null 2>&1 || need+=(firefox-esr)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v clang >/dev/null 2>&1 || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -f /usr/include/linux/bpf.h ] || need+=(linux-libc-dev)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# The shared-port lab: certutil (a Chromium NSS db trusting the lab CA), pebble (ACME).
command -v certutil >/dev/null 2>&1 || need+=(libnss3-tools)
command -v pebble >/dev/null 2>&1 || need+=(pebble)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The coturn package must not leave a daemon holding 3478 behind.
if pgrep -x turnserver >/dev/null 2>&1; then pkill -x turnserver || true; fi
# Nor may the redis-server package leave its daemon on 6379 (cluster tests start their own).
if pgrep -x redis-server >/dev/null 2>&1 && [ -f /run/redis/redis-server.pid ]; then
  kill "$(cat /run/redis/redis-server.pid)" 2>/dev/null || true
fi
# Nor may the nginx package leave its default site holding port 80 (the lab runs its own).
if [ -f /run/nginx.pid ]; then nginx -s stop 2>/dev/null || true; fi
# The real `peerjs` client and the reference PeerJS server (`peer`), pinned by the lock file,
# for tests/it/peerjs*.rs and benches/signaling_bench.sh.
(cd "$(dirname "$0")/../tests/peerjs" && npm ci --no-audit --no-fund --silent)
echo "install-test-deps: ok"
