#!/usr/bin/env bash
# Boot-test the supermachine guest kernel with QEMU: x86_64 under KVM on the microvm machine,
# aarch64 on the virt machine (TCG on an x86 host, KVM on an arm64 host with /dev/kvm).
#
#   supermachine-vmm/guest/boot-test.sh [--arch x86_64|aarch64] [path/to/vmlinux|Image]
#
# Without a path the kernel comes from build-kernel.sh (cache hit, or a build). The architecture:
# --arch, else SUPERMACHINE_GUEST_ARCH, else the host's. Builds a busybox-static initramfs (the
# host's busybox for x86_64, Debian's busybox-static:arm64 for aarch64) and a small ext4 image in
# a temp dir, boots
#   x86_64:  qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 ... -kernel vmlinux
#            with a virtio-blk-device and an i8042 (reset port only)
#   aarch64: qemu-system-aarch64 -M virt,gic-version=3 -cpu max ... -kernel Image
#            with a virtio-blk-device (virtio-mmio, found through the device tree) and QEMU's PL011
# and checks that /init ran: /proc + devtmpfs mounted, a fork+exec loop, read-only ext4 on
# virtio-blk with an overlayfs (tmpfs upper) on top, the static guest agent for the architecture
# runs (when one is built), marker printed, and the VM went away by itself. x86_64: `reboot -f` ->
# reboot=k -> i8042 reset -> QEMU -no-reboot exits (`poweroff -f` cannot end a VM that has no
# ACPI, the kernel just halts); aarch64: `poweroff -f` -> PSCI SYSTEM_OFF -> QEMU exits.
# Appends pvm-cmdline.txt when the host's /dev/kvm is kvm_pvm (x86_64 only).
# Exits non-zero on any failure; removes its temp dir and never leaves QEMU running.
#
# Environment: BOOT_TEST_AGENT (the static agent to run in the guest; default
#              target/<arch>-unknown-linux-musl/release/supermachine-agent of this workspace, and
#              the check is skipped, with a line saying so, when that is not built),
#              BOOT_TEST_TIMEOUT (seconds, default 300), BOOT_TEST_KEEP=1 keeps the temp dir,
#              BOOT_TEST_APPEND (extra kernel cmdline), BOOT_TEST_FORKS (fork+exec loop count, 10),
#              BOOT_TEST_GZIP=1 gzips the initramfs (exercises RD_GZIP; costs ~95 s per MB under
#              kvm_pvm, see README.md), default is an uncompressed newc cpio.
set -euo pipefail
shopt -s extglob

log() { printf 'boot-test: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
timeout_s=${BOOT_TEST_TIMEOUT:-300}
forks=${BOOT_TEST_FORKS:-10}
marker="SUPERMACHINE-BOOT-TEST-OK"
glibc_tunables="glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX_Fast_Unaligned_Load"

arch=${SUPERMACHINE_GUEST_ARCH:-$(uname -m)}
if [[ ${1:-} == --arch ]]; then
    arch=${2:?--arch needs x86_64 or aarch64}
    shift 2
fi
case "$arch" in
    x86_64 | amd64) arch=x86_64 qemu=qemu-system-x86_64 qemu_pkg=qemu-system-x86 ;;
    aarch64 | arm64) arch=aarch64 qemu=qemu-system-aarch64 qemu_pkg=qemu-system-arm ;;
    *) die "unsupported architecture '$arch' (x86_64 or aarch64)" ;;
esac

if (($# > 0)); then
    kernel=$1
else
    kernel=$("$here/build-kernel.sh" --arch "$arch")
fi
[[ -f $kernel ]] || die "no kernel at $kernel"
agent=${BOOT_TEST_AGENT:-$here/../../target/$arch-unknown-linux-musl/release/supermachine-agent}

need=()
command -v "$qemu" >/dev/null || need+=("$qemu_pkg")
[[ -x /bin/busybox ]] && /bin/busybox --list 2>/dev/null | grep -qx reboot || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v bc >/dev/null || need+=(bc)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi
# KVM where the guest's architecture is the host's; an arm64 guest on another host runs under TCG.
kvm=no
if [[ $arch == "$(uname -m)" ]]; then
    [[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm not accessible"
    kvm=yes
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/supermachine-boot-test.XXXXXX")
qemu_pid=
cleanup() {
    local p
    for p in "$qemu_pid" "$(cat "$tmp/qemu.pid" 2>/dev/null || true)"; do
        if [[ -z $p ]] || ! kill -0 "$p" 2>/dev/null; then continue; fi
        # only our timeout wrapper or our QEMU (pidfile), never a recycled pid
        [[ $(cat "/proc/$p/comm" 2>/dev/null) == @(timeout|qemu-system-*) ]] || continue
        kill "$p" 2>/dev/null || true
        sleep 1
        kill -9 "$p" 2>/dev/null || true
    done
    if [[ ${BOOT_TEST_KEEP:-0} == 1 ]]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# --- initramfs -------------------------------------------------------------------------------------
root="$tmp/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,ro,ovl}
if [[ $arch == x86_64 ]]; then
    cp /bin/busybox "$root/bin/busybox"
    # Applet symlinks made here, not with `busybox --install` in the guest: every guest syscall is
    # expensive under kvm_pvm (~300 us, see README.md).
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    # GLIBC_TUNABLES: under kvm_pvm, guest user space sees the host's AVX/AVX-512 as usable while
    # the guest kernel (no XSAVE) context-switches only x87/SSE state, so concurrently running glibc
    # programs corrupt each other's YMM upper halves (pipelines crash). Masking AVX in glibc avoids
    # it; see README.md "AVX state is not context-switched under kvm_pvm".
    init_env="export GLIBC_TUNABLES=$glibc_tunables"
    finish="reboot -f"
else
    # Debian's arm64 busybox-static; apt-get download needs dpkg to know arm64 (nothing is
    # installed for it). The host cannot run it, so /init makes the applet links.
    if ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
        log "adding the arm64 architecture to dpkg and updating apt's lists"
        dpkg --add-architecture arm64
        apt-get update -q >&2 || true
    fi
    (cd "$tmp" && apt-get download -q busybox-static:arm64 >&2) || die "apt-get download busybox-static:arm64 failed"
    dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$tmp/bb"
    cp "$tmp/bb/bin/busybox" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    init_env="/bin/busybox --install -s /bin"
    finish="poweroff -f"
fi
if [[ -f $agent ]]; then
    cp "$agent" "$root/bin/supermachine-agent"
else
    log "no agent at $agent: the agent check is skipped (cargo build --release -p supermachine-agent --target $arch-unknown-linux-musl)"
fi

cat >"$root/init" <<EOF
#!/bin/sh
export PATH=/bin
$init_env
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "SM: /init running, uptime \$(cut -d' ' -f1 /proc/uptime) s"
uname -a
grep -m1 'model name' /proc/cpuinfo
grep -m1 '^flags' /proc/cpuinfo
grep -E 'MemTotal|MemFree' /proc/meminfo
echo "SM: cmdline: \$(cat /proc/cmdline)"
echo "SM: /dev: \$(ls /dev | tr '\n' ' ')"

t0=\$(cut -d' ' -f1 /proc/uptime)
i=0
while [ \$i -lt $forks ]; do /bin/true; i=\$((i+1)); done
t1=\$(cut -d' ' -f1 /proc/uptime)
echo "SM: $forks fork+exec of true: \$t0 -> \$t1 s"

for d in /sys/bus/virtio/devices/*; do
    [ -e "\$d" ] || continue
    drv=\$(basename "\$(readlink "\$d/driver" 2>/dev/null)" 2>/dev/null)
    echo "SM: virtio \$(basename \$d) device=\$(cat \$d/device) driver=\${drv:-none}"
done
if dmesg | grep -q 'Registered PF_VSOCK'; then
    echo "SM: AF_VSOCK registered"
fi
if [ -x /bin/supermachine-agent ]; then
    /bin/supermachine-agent --help >/tmp/agent.txt 2>&1
    echo "SM: agent --help exit \$?: \$(head -n1 /tmp/agent.txt)"
fi

if [ -b /dev/vda ]; then
    mount -t ext4 -o ro /dev/vda /ro && echo "SM: ext4 ro mount ok: \$(cat /ro/hello.txt)"
    mount -t tmpfs tmpfs /tmp && mkdir -p /tmp/upper /tmp/work
    mount -t overlay overlay -o lowerdir=/ro,upperdir=/tmp/upper,workdir=/tmp/work /ovl &&
        echo written-in-guest > /ovl/new.txt &&
        [ -f /tmp/upper/new.txt ] && [ ! -e /ro/new.txt ] &&
        echo "SM: overlay ok: lower=\$(cat /ovl/hello.txt) upper=\$(cat /tmp/upper/new.txt)"
    # replacing a lower directory needs an opaque-dir xattr on the tmpfs upper (TMPFS_XATTR)
    rm -rf /ovl/d && mkdir /ovl/d && [ -z "\$(ls -A /ovl/d)" ] && [ -f /ro/d/old ] &&
        echo "SM: overlay opaque dir ok"
    dmesg | grep -q 'failed to set xattr' && echo "SM: overlay: upper lacks xattr support"
fi

set -o pipefail
i=0; pf=0
while [ \$i -lt 4 ]; do dmesg | tail -n 1 >/dev/null || pf=\$((pf+1)); i=\$((i+1)); done
echo "SM: concurrent pipelines failed: \$pf of 4"
dmesg | grep -E 'segfault|traps:' || true
echo "$marker uptime \$(cut -d' ' -f1 /proc/uptime) s"
$finish
EOF
chmod +x "$root/init"
initrd="$tmp/initramfs.cpio"
if [[ ${BOOT_TEST_GZIP:-0} == 1 ]]; then
    initrd+=.gz
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9 >"$initrd")
else
    (cd "$root" && find . | cpio -o -H newc --quiet >"$initrd")
fi

# --- ext4 disk for virtio-blk ----------------------------------------------------------------------
mkdir -p "$tmp/disk"
echo "hello-from-ext4" >"$tmp/disk/hello.txt"
mkdir -p "$tmp/disk/d"
echo "old" >"$tmp/disk/d/old"
mkfs.ext4 -q -F -L smtest -d "$tmp/disk" "$tmp/disk.img" 8M >&2

# --- boot --------------------------------------------------------------------------------------------
pvm=no
if [[ $arch == x86_64 ]]; then
    append="console=ttyS0 panic=-1 reboot=k"
    cpu=host
    if [[ -d /sys/module/kvm_pvm ]]; then
        pvm=yes
        append+=" $(head -n1 "$here/pvm-cmdline.txt")"
        # QEMU 7.2 aborts at start under kvm_pvm: "failed to set MSR 0x10a" (IA32_ARCH_CAPABILITIES).
        cpu=host,-arch-capabilities
    fi
    machine=(-M microvm,acpi=off -accel kvm -cpu "$cpu" -device i8042)
else
    append="console=ttyAMA0 panic=-1"
    if [[ $kvm == yes ]]; then
        machine=(-M virt,gic-version=3 -accel kvm -cpu host)
    else
        # pauth-impdef: QEMU's cheap pointer-authentication cipher instead of emulating QARMA.
        machine=(-M virt,gic-version=3 -accel tcg -cpu max,pauth-impdef=on)
    fi
fi
append+=" ${BOOT_TEST_APPEND:-}"
log "$arch kernel $kernel ($(stat -c %s "$kernel") bytes), initrd $(stat -c %s "$initrd") bytes, kvm=$kvm kvm_pvm=$pvm"
log "cmdline: $append"

out="$tmp/console.log"
: >"$out"
start=$EPOCHREALTIME
timeout -k 5 "$timeout_s" "$qemu" "${machine[@]}" -m 256 -smp 1 \
    -nodefaults -no-user-config -nographic -no-reboot -pidfile "$tmp/qemu.pid" \
    -serial stdio \
    -kernel "$kernel" -initrd "$initrd" -append "$append" \
    -drive "id=d0,file=$tmp/disk.img,format=raw,if=none,readonly=on" \
    -device virtio-blk-device,drive=d0 \
    </dev/null >"$out" 2>&1 &
qemu_pid=$!

# Timestamp console lines as they arrive (host wall clock since spawn).
stamp() { printf '[%8.3f] %s\n' "$(echo "$EPOCHREALTIME - $start" | bc)" "${1%$'\r'}" | tee -a "$tmp/console.ts" >&2; }
: >"$tmp/console.ts"
exec 4<"$out"
partial=
while :; do
    if IFS= read -r line <&4; then
        stamp "$partial$line"
        partial=
        continue
    fi
    partial+=$line   # read hit EOF mid-line: keep the fragment for the next round
    kill -0 "$qemu_pid" 2>/dev/null || break
    sleep 0.05
done
while IFS= read -r line <&4 || [[ -n $line ]]; do
    stamp "$partial$line"
    partial=
done
exec 4<&-
rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=
end=$EPOCHREALTIME
log "qemu exited with status $rc after $(echo "$end - $start" | bc) s"

((rc != 124 && rc != 137)) || die "timed out after ${timeout_s}s"
grep -q "$marker" "$tmp/console.ts" || die "marker not printed"
grep -q "SM: $forks fork+exec" "$tmp/console.ts" || die "fork+exec loop did not finish"
grep -q "SM: ext4 ro mount ok: hello-from-ext4" "$tmp/console.ts" || die "virtio-blk/ext4 check failed"
grep -q "SM: overlay ok" "$tmp/console.ts" || die "overlayfs check failed"
grep -q "SM: overlay opaque dir ok" "$tmp/console.ts" || die "overlayfs opaque-dir check failed"
grep -q "SM: concurrent pipelines failed: 0 of 4" "$tmp/console.ts" || die "concurrent pipelines failed"
if [[ -f $agent ]]; then
    grep -q "SM: agent --help exit 0: usage: supermachine-agent" "$tmp/console.ts" || die "the agent did not run"
fi
((rc == 0)) || die "qemu exit status $rc"

init_line=$(grep -m1 "SM: /init running" "$tmp/console.ts" || true)
log "PASS: $marker seen; first /init output: $init_line"
