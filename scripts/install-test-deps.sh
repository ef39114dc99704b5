#!/usr/bin/env bash
# Installs what the test suite needs from Debian's packages: coturn's turnutils_* clients and
# turnserver (interop and the side-by-side benchmark), promtool (metrics format check),
# and Chromium with its driver (browser end-to-end tests). Idempotent; safe to re-run.
set -euo pipefail

need=()
command -v turnutils_uclient >/dev/null 2>&1 || need+=(coturn)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The coturn package must not leave a daemon holding 3478 behind.
if pgrep -x turnserver >/dev/null 2>&1; then pkill -x turnserver || true; fi
echo "install-test-deps: ok"
