#!/usr/bin/env bash
# Installs the data planes weft-load compares weft against: HAProxy and
# nginx (nginx-light), from Debian's packages. Run as root.
set -euo pipefail
apt-get update
apt-get install -y haproxy nginx-light
# The packages start system services on :80; weft-load runs its own
# instances, so stop those if systemd started them.
if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
  systemctl disable --now haproxy nginx || true
fi
haproxy -v | head -1
nginx -v
