#!/usr/bin/env bash
# Host set-up for capture and the real-kernel tests (root only; a no-op for other users):
# Debian packages, tracefs, and kernel headers for bcc when the running kernel has none.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: not root: skipping Debian packages, tracefs and headers (tests needing them will skip)"
    exit 0
fi
pkgs=(python3-bpfcc bpfcc-tools linux-headers-amd64 linux-perf trace-cmd nasm
      qemu-system-x86 busybox-static linux-image-amd64 chromium systemtap-sdt-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! mountpoint -q /sys/kernel/tracing; then
    mount -t tracefs nodev /sys/kernel/tracing || echo "setup-host: could not mount tracefs"
fi
# bcc compiles against the running kernel's headers. This kernel ships none; Debian's
# linux-headers-amd64 (6.1) compiles tracepoint programs for it (docs/sources.md), so link it in.
mod=/lib/modules/$(uname -r)
if [ ! -e "$mod/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$hdr" ]; then
        mkdir -p "$mod"
        ln -sfn "$hdr" "$mod/build"
        [ -n "$common" ] && ln -sfn "$common" "$mod/source"
        echo "setup-host: linked $hdr into $mod/build (tracepoint programs only)"
    fi
fi
