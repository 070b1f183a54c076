#!/usr/bin/env bash
# Set up osvmm on a fresh Debian 12 machine (as root, or with sudo available),
# then run the main job: boot the bundled hello guest.
#
#   ./setup.sh            install everything, then boot guests:hello
#   ./setup.sh --no-run   install everything only (CI uses this)
#
# Installs: the compiler and headers the bundled guests and the KVM floor
# program build with, QEMU (the reference for differential tests and
# benchmarks), acpica-tools (iasl validates our ACPI tables), busybox-static
# and cpio tools (initramfs), spin, tmux (drives `osvmm top` in its test),
# chromium (renders `osvmm plan --svg` headless in its test);
# Python test tools; osvmm itself (editable, with prometheus_client); where
# systemd runs, the unit osvmm@.service (tools/systemd, not enabled);
# and Debian's stock kernel for the Linux boot test, with its modules for the
# hardware-virtualization rig (scripts/fetch-debian-kernel --modules; the rig is
# scripts/hwvirt-rig, docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")"

run_main=1
[ "${1:-}" = "--no-run" ] && run_main=0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

APT_PACKAGES=(
  gcc binutils make libc6-dev linux-libc-dev
  qemu-system-x86
  acpica-tools
  busybox-static cpio libarchive-tools
  spin
  xz-utils
  tmux
  chromium
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
echo "setup: installing osvmm and its test tools with $($PYTHON --version)"
$PYTHON -m pip install -q --disable-pip-version-check -e '.[test]'

if [ -d /run/systemd/system ]; then
  # The service (docs/operations.md): osvmm@NAME runs /etc/osvmm/NAME.toml. Its
  # ExecStart names this Python, wherever it is (systemd searches a fixed PATH).
  exe="$($PYTHON -c 'import sys; print(sys.executable)')"
  echo "setup: installing the systemd unit osvmm@.service (not enabled)"
  sed "s|^ExecStart=osvmm |ExecStart=$exe -m osvmm.cli |" tools/systemd/osvmm@.service \
    | $SUDO tee /etc/systemd/system/osvmm@.service >/dev/null
  $SUDO systemctl daemon-reload
fi

echo "setup: building the bundled guests"
$PYTHON -m osvmm.guests.build >/dev/null

echo "setup: fetching Debian's stock kernel and its modules (Linux boot test, rig)"
if ! scripts/fetch-debian-kernel --modules >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  scripts/fetch-debian-kernel --modules >/dev/null
fi

if [ "$run_main" = 1 ]; then
  echo "setup: done; booting the bundled hello guest: osvmm run guests:hello"
  set +e
  $PYTHON -m osvmm.cli run guests:hello
  status=$?
  set -e
  # The hello guest ends through isa-debug-exit with value 0: status (0 << 1) | 1 = 1.
  if [ "$status" -eq 1 ]; then echo "setup: the guest ran and exited cleanly"; exit 0; fi
  echo "setup: the guest ended with status $status" >&2
  exit "$status"
fi
