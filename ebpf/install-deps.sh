#!/usr/bin/env bash
# Installs what building and testing the `ambient-ebpf` crate needs on a
# Debian machine (run as root; CI does). Idempotent: installs only what is
# missing. Build: clang + llvm (BPF backend), libbpf-dev (bpf/bpf_helpers.h),
# linux-libc-dev (linux/bpf.h, asm/types.h). Tests: iproute2 (ip, tc),
# bpftool (inspecting programs and cgroup attachments).
set -euo pipefail

packages=(clang llvm libbpf-dev linux-libc-dev iproute2 bpftool)

need=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    need+=("$p")
  fi
done

# The cgroup programs need a cgroup v2 hierarchy; hybrid hosts may lack one.
if ! grep -q ' - cgroup2 ' /proc/self/mountinfo; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ebpf/install-deps.sh: no cgroup v2 hierarchy mounted; run as root" >&2
    exit 1
  fi
  mkdir -p /run/ambient-cgroup2
  mount -t cgroup2 none /run/ambient-cgroup2
  echo "ebpf/install-deps.sh: mounted cgroup v2 on /run/ambient-cgroup2"
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ebpf/install-deps.sh: missing ${need[*]}; run as root (or install them) first" >&2
  exit 1
fi
echo "ebpf/install-deps.sh: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
