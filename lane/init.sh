#!/bin/busybox sh
# /init of the nested lane's L1 (see lane/run.sh). Runs under a static busybox in the initramfs
# that lane/run.sh builds: loads 9p (and on x86_64 KVM, kvm_amd) from the L1 kernel's own modules,
# mounts the host's `/` over 9p, and runs the host's `$RUN/cmd.sh`: on x86_64 chrooted there, on
# aarch64 (where the host's x86 programs cannot run) in L1's own busybox root, with the host's
# non-system directories mounted at their own paths. Reports through the host directory $RUN
# (named on the kernel command line as lane.run=), which it reaches over 9p:
#   $RUN/rc     the command's exit code (written only when the command ran)
#   $RUN/error  why the lane could not start (one line)
# and on the console as `LANE-EXIT <code>` / `LANE-ERROR <why>`. Then powers off; if this script
# ever exits, the kernel panics and `panic=-1` + QEMU's -no-reboot end the run anyway.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The initramfs has no /dev/console node: take the console from devtmpfs. No CR before LF on
# it, so the command's output reaches the host's logs as the command wrote it.
exec </dev/console >/dev/console 2>&1
stty -onlcr

RUN=
for word in $(cat /proc/cmdline); do
  case "$word" in lane.run=*) RUN="${word#lane.run=}" ;; esac
done

fail() {
  echo "LANE-ERROR $*"
  if [ -n "$RUN" ] && [ -d "/host$RUN" ]; then echo "$*" >"/host$RUN/error"; fi
  poweroff -f
}

# KVM for AMD (x86_64; arm64 KVM is built in), virtio-pci and 9p from the L1 kernel's package, in
# the order lane/run.sh derived from their dependencies (kvm-amd needs kvm and ccp; 9p needs
# 9pnet, netfs and fscache). 9p first, so that a missing svm can be reported through $RUN/error.
load() { # load kvm|other
  for m in $(cat /lib/modules/order); do
    case "$m" in irqbypass | kvm | ccp | kvm-amd) [ "$1" = kvm ] || continue ;; *) [ "$1" = kvm ] && continue ;; esac
    args=
    # insmod does not read module options from the kernel command line (modprobe does).
    [ "$m" = kvm-amd ] && args="npt=1"
    insmod "/lib/modules/$m.ko" $args || fail "insmod $m failed (see the kernel messages above)"
  done
}
load other
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 host /host \
  || fail "cannot mount the host's / over 9p (is QEMU's -virtfs missing?)"
[ -n "$RUN" ] && [ -f "/host$RUN/cmd.sh" ] || fail "no lane.run= directory with cmd.sh on the host"
# Loopback, as any booted system has: tests connect to published ports on 127.0.0.1. Runs in
# L1's network namespace, which the chroot shares.
ip link set lo up || fail "cannot bring up L1's loopback"

# What udev would add (under $1, the root the command sees): bash's process substitution and many
# scripts need /dev/fd; ptys and POSIX shared memory need devpts and /dev/shm.
dev_extras() {
  ln -sf /proc/self/fd "$1/dev/fd"
  ln -sf /proc/self/fd/0 "$1/dev/stdin"
  ln -sf /proc/self/fd/1 "$1/dev/stdout"
  ln -sf /proc/self/fd/2 "$1/dev/stderr"
  mkdir -p "$1/dev/pts" "$1/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts"
  mount -t tmpfs -o mode=1777 shm "$1/dev/shm"
}

case "$(uname -m)" in
x86_64)
  grep -qw svm /proc/cpuinfo || fail "L1's CPU has no svm flag: QEMU needs -cpu ...,+svm"
  grep -qw npt /proc/cpuinfo || fail "L1's CPU has no npt flag: QEMU needs -cpu ...,+npt"
  load kvm
  # The host's /proc, /sys and /dev are the host's, not L1's: mount L1's over them in the chroot.
  mount -t proc proc /host/proc
  mount -t sysfs sys /host/sys
  mount -t devtmpfs dev /host/dev
  dev_extras /host
  [ -c /host/dev/kvm ] || fail "no /dev/kvm in L1: kvm_amd did not initialise (dmesg: $(dmesg | grep -i -m1 -e kvm -e svm))"
  kvm="kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt)"
  root=/host
  run() { chroot /host /usr/bin/env -i /bin/bash --noprofile --norc "$RUN/cmd.sh" </dev/null; }
  ;;
aarch64)
  # arm64 KVM is built into Debian's kernel; it registers /dev/kvm only when the kernel started
  # at EL2 (QEMU's -M virt,virtualization=on).
  [ -c /dev/kvm ] || fail "no /dev/kvm in L1: arm64 KVM did not initialise; L1 must start at EL2 (QEMU -M virt,virtualization=on) (dmesg: $(dmesg | grep -i -m1 -e kvm -e 'EL2' -e hyp))"
  kvm="arm64 KVM: $(dmesg | sed -n 's/.*kvm \[[0-9]*\]: \(.*mode initialized successfully\).*/\1/p' | head -n1)"
  dev_extras ""
  # The host's directories at their own paths, except the host's system (x86 programs and their
  # configuration) and what L1 has itself. Only directories: a host /bin -> usr/bin link is skipped.
  for dir in /host/*; do
    name="${dir#/host/}"
    case "$name" in bin | sbin | lib | lib32 | lib64 | libx32 | usr | etc | boot | dev | proc | sys | run | host | lost+found) continue ;; esac
    [ -d "$dir" ] && [ ! -L "$dir" ] || continue
    mkdir -p "/$name" && mount --bind "$dir" "/$name" || fail "cannot mount the host's /$name in L1"
  done
  # Applets at their usual places too (/usr/bin/env, /sbin/ip, ...): programs and tests name them
  # by absolute path.
  mkdir -p /sbin /usr/bin /usr/sbin && /bin/busybox --install -s
  # What the host's /etc would have given: names for root and localhost.
  mkdir -p /etc
  echo 'root:x:0:0:root:/root:/bin/sh' >/etc/passwd
  echo 'root:x:0:' >/etc/group
  printf '127.0.0.1 localhost\n::1 localhost\n' >/etc/hosts
  root=
  run() { env -i /bin/sh "$RUN/cmd.sh" </dev/null; }
  ;;
*) fail "no lane for $(uname -m)" ;;
esac

# Snapshot cache, temp files and runtime dirs on an L1 tmpfs, not on 9p (lane/run.sh points
# SUPERMACHINE_CACHE_DIR, TMPDIR and XDG_RUNTIME_DIR into it).
mount -t tmpfs -o mode=0700 lane "$root$RUN/l1" || fail "cannot mount L1's tmpfs"

echo "lane: L1 up after $(cut -d' ' -f1 /proc/uptime) s of L1 time, $(grep -c ^processor /proc/cpuinfo) vCPUs, $kvm"
run
rc=$?
echo "$rc" >"/host$RUN/rc"
echo "LANE-EXIT $rc"
sync
poweroff -f
