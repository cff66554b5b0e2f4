#!/bin/bash
# Does a sockmap ingress redirect give a sender backpressure? Runs
# no_reader once over plain TCP and once with redirect.bpf.c attached to a
# cgroup of its own, then removes everything it made. Root; needs clang,
# libbpf-dev, gcc, bpftool and a cgroup v2 mount.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$cg2" ] || { echo "no cgroup v2 mount (ebpf/install-deps.sh mounts one)" >&2; exit 1; }
cg="$cg2/sockmap-backpressure.$$"
pins=/sys/fs/bpf/sockmap-backpressure-$$  # bpffs refuses dots in names
mounted_bpffs=
cleanup() {
	set +e
	[ -d "$cg" ] && bpftool cgroup detach "$cg" sock_ops pinned "$pins/prog/bp_sockops" 2>/dev/null
	rm -rf "$pins" 2>/dev/null
	[ -z "$mounted_bpffs" ] || umount /sys/fs/bpf
	[ -d "$cg" ] && rmdir "$cg"
	rm -rf "$work"
}
trap cleanup EXIT

multiarch=$(gcc -print-multiarch)
clang -O2 -g -target bpf -I"/usr/include/$multiarch" -c "$here/redirect.bpf.c" -o "$work/redirect.o"
gcc -O2 -o "$work/no_reader" "$here/no_reader.c"

echo "== plain TCP"
"$work/no_reader" "${1:-4096}"

echo "== sockmap redirect (BPF_F_INGRESS)"
if ! mount | grep -q ' /sys/fs/bpf type bpf '; then
	mount -t bpf bpf /sys/fs/bpf
	mounted_bpffs=1
fi
mkdir -p "$cg" "$pins"
bpftool prog loadall "$work/redirect.o" "$pins/prog" pinmaps "$pins/maps"
bpftool prog attach pinned "$pins/prog/bp_redirect" msg_verdict pinned "$pins/maps/bp_socks"
bpftool cgroup attach "$cg" sock_ops pinned "$pins/prog/bp_sockops"
# Only processes in $cg (this shell's child) get their sockets paired.
(echo $BASHPID > "$cg/cgroup.procs" && exec "$work/no_reader" "${1:-4096}")
