#!/usr/bin/env bash
# The nested lane: runs one command, as root, in the same working directory and environment, on
# real vendor-standard KVM inside a QEMU TCG guest ("L1"): kvm_amd in an x86_64 L1 that emulates
# AMD-V with nested paging (--arch x86_64, the default), or arm64 KVM in an aarch64 L1 started at
# EL2 (--arch aarch64: `-M virt,virtualization=on,gic-version=3`, VHE and a GICv3 vgic). The
# host's /dev/kvm here is PVM (slow guest kernel work, one vCPU); L1's is what a user's machine
# has. Recipe and measurements: the repository's design note NESTED-LANE.md.
#
#   lane/run.sh [--arch x86_64|aarch64] [--cpus N] [--memory MiB] [--timeout SECONDS] [--verbose] -- COMMAND [ARG...]
#
# * Installs what it needs, once (root; cached under ${XDG_CACHE_HOME:-~/.cache}/supermachine/lane):
#   QEMU >= 10 from bookworm-backports, Debian 12's linux-image-6.12.*+deb12-amd64 (x86_64;
#   SUPERMACHINE_LANE_L1=6.1 for linux-image-6.1.0-*-amd64) or linux-image-6.1.0-*-arm64 (unpacked, not
#   installed), an initramfs with a static busybox (the host's; for aarch64 Debian's
#   busybox-static:arm64, which needs `dpkg --add-architecture arm64`, done here) and lane/init.sh
#   as /init.
# * x86_64: L1 sees the host's whole `/` over 9p and runs the command chrooted there (checkout,
#   target/, caches, the guest kernel and agent, the host's programs): build on the host, run only
#   guest-bound tests and benchmarks here, e.g.
#     cargo test --no-run --message-format=json | jq -r 'select(.executable) | .executable'
#   lists the test binaries; run one with `lane/run.sh -- target/debug/deps/snapshot-HASH`.
# * aarch64: the host's programs are x86 and cannot run there, so L1 keeps its own root (busybox,
#   PATH=/bin) and mounts the host's directories over 9p at the same paths, all but its system
#   directories (/usr, /etc, /bin, /lib*, ...): the checkout, /root, /home, /tmp, ... Run static
#   binaries cross-built for aarch64-unknown-linux-musl from there.
# * In L1: SUPERMACHINE_CACHE_DIR, TMPDIR and XDG_RUNTIME_DIR point into an L1 tmpfs (snapshots
#   and sockets do not belong on 9p); everything else in the environment is passed as is. Host
#   code runs under TCG there too: slow, so keep host-side work out of the lane.
# * Output: the command's stdout and stderr, merged, stream on stdout (L1's serial console);
#   its stdin is /dev/null.
# * Exit status: the command's; 124 when --timeout expired (L1 is killed); 125 when the lane
#   could not start or L1 stopped without reporting (the message says why); 130/143 on SIGINT/TERM.
# * Teardown: QEMU dies with this script (PR_SET_PDEATHSIG through setpriv), even on SIGKILL;
#   temp state lives in one directory, removed by a trap, by a watchdog once this script and its
#   QEMU are gone, and as a last resort by the next start. The host mounts nothing.
set -euo pipefail

LANE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/lane"
TMP_BASE="${TMPDIR:-/tmp}/supermachine-lane"

die() { printf 'lane/run.sh: error: %s\n' "$*" >&2; exit 125; }
say() { printf 'lane: %s\n' "$*" >&2; }
usage() {
  sed -n 's/^#   \(lane\/run.sh .*\)/usage: \1/p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

arch="${SUPERMACHINE_LANE_ARCH:-x86_64}" cpus=2 memory=4096 timeout=1800 verbose=0
while (($#)); do
  case "$1" in
    --arch) arch="${2:?--arch needs x86_64 or aarch64}"; shift 2 ;;
    --cpus) cpus="${2:?--cpus needs a number}"; shift 2 ;;
    --memory) memory="${2:?--memory needs MiB}"; shift 2 ;;
    --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
    --verbose) verbose=1; shift ;;
    --reap) # internal: the watchdog's and the next start's cleanup of one run directory
      reap_dir="${2:?}"
      if [[ -f $reap_dir/qemu.pid ]]; then
        pid="$(<"$reap_dir/qemu.pid")"
        # Only a QEMU of this run: its command line names the run directory.
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "lane.run=$reap_dir "; then
          kill -KILL "$pid" 2>/dev/null || true
        fi
      fi
      rm -rf "$reap_dir"
      exit 0 ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) usage ;;
  esac
done
(($#)) || usage
[[ $cpus =~ ^[1-9][0-9]*$ && $memory =~ ^[1-9][0-9]*$ && $timeout =~ ^[1-9][0-9]*$ ]] \
  || { printf 'lane/run.sh: error: --cpus, --memory and --timeout take positive integers\n' >&2; usage; }
((EUID == 0)) || die "run as root: installing QEMU and serving the host's / to L1 over 9p (passthrough) need it"

# What differs between the lanes. MODULES: what L1's /init loads (insmod), in an order derived
# from their `depends=` by ensure_initrd (the design note's x86 order put virtio before
# virtio_ring, which 6.1.0-57 rejects); on arm64 KVM, virtio and the PCI host bridge are built in.
# SUPERMACHINE_LANE_CPU / SUPERMACHINE_LANE_MACHINE replace QEMU's -cpu / -M (lane/check-teardown.sh
# uses them to test the errors of an L1 without svm / without EL2).
case "$arch" in
  x86_64 | amd64)
    [[ $(uname -m) == x86_64 ]] || die "the x86_64 nested lane needs an x86_64 host (this is $(uname -m))"
    arch=x86_64 deb_arch=amd64 qemu=qemu-system-x86_64 qemu_pkg=qemu-system-x86
    # tun: /dev/net/tun for peers' TAP devices (examples/bench_net.rs runs Firecracker with one).
    # L1's kernel: Debian 12's 6.12 by default, the KVM of today's distributions (restores
    # pre-fault their working set with KVM_PRE_FAULT_MEMORY, 6.10+); there virtio is built in
    # and fscache is part of netfs. SUPERMACHINE_LANE_L1=6.1: Debian 12's original 6.1, which
    # cannot pre-fault (restores then take one nested page fault per page they touch).
    case "${SUPERMACHINE_LANE_L1:-6.12}" in
      6.1)
        MODULES=(irqbypass kvm ccp kvm-amd virtio_ring virtio virtio_pci_modern_dev
          virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p tun)
        # The L1 kernel's cache link; the x86 lane's name from before there were two.
        kernel_link=linux ;;
      6.12)
        MODULES=(irqbypass kvm ccp kvm-amd 9pnet 9pnet_virtio netfs 9p tun)
        kernel_link=linux-6.12 ;;
      *) die "SUPERMACHINE_LANE_L1 is 6.1 or 6.12, not '$SUPERMACHINE_LANE_L1'" ;;
    esac
    # AMD-V with nested paging; minus the EPYC-v4 features TCG lacks (QEMU warns about each).
    qemu_args=(-accel tcg,thread=multi
      -cpu "${SUPERMACHINE_LANE_CPU:-EPYC-v4,+svm,+npt,-fxsr-opt,-misalignsse,-osvw,-topoext,-perfctr-core,-clzero,-ibpb,-nrip-save,-xsavec,-xsaves}"
      -vga none -bios qboot.rom)
    append="console=ttyS0 panic=-1 kvm_amd.npt=1" ;;
  aarch64 | arm64)
    arch=aarch64 deb_arch=arm64 qemu=qemu-system-aarch64 qemu_pkg=qemu-system-arm
    MODULES=(virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p)
    kernel_link=linux-aarch64
    # virtualization=on: L1 starts at EL2, where arm64 KVM needs it. pauth-impdef: TCG's
    # architected pointer-authentication cipher (QARMA) is slow to emulate; QEMU's documented
    # cheaper "implementation defined" one behaves the same for software.
    qemu_args=(-M "${SUPERMACHINE_LANE_MACHINE:-virt,virtualization=on,gic-version=3}"
      -accel tcg,thread=multi -cpu "${SUPERMACHINE_LANE_CPU:-max,pauth-impdef=on}")
    append="console=ttyAMA0 panic=-1" ;;
  *) die "--arch: x86_64 or aarch64, not '$arch'" ;;
esac

# --- installs, cached and serialised between concurrent runners -------------------------------

qemu_major() {
  { "$qemu" --version 2>/dev/null || true; } | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}

ensure_qemu() {
  local major
  major="$(qemu_major)"
  [[ -n $major ]] && ((major >= 10)) && return
  say "installing QEMU 10 from bookworm-backports (once)"
  # bookworm's QEMU 7.2 conflicts with the qemu-utils 10 that the machine image ships.
  if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg opts=
    [[ -f $keyring ]] && opts="[signed-by=$keyring] "
    echo "deb ${opts}http://deb.debian.org/debian bookworm-backports main" \
      >/etc/apt/sources.list.d/bookworm-backports.list
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || true
  apt-get install -y -q --no-install-recommends -t bookworm-backports "$qemu_pkg" >&2 \
    || die "could not install $qemu_pkg from bookworm-backports (apt-get failed above)"
  major="$(qemu_major)"
  [[ -n $major ]] && ((major >= 10)) || die "$qemu >= 10 is still missing after installing it"
}

# Another architecture's packages (apt-get download PKG:arm64) need dpkg to know it, and apt its
# package lists. Nothing is installed for it.
ensure_foreign_arch() {
  [[ $deb_arch == "$(dpkg --print-architecture)" ]] && return
  dpkg --print-foreign-architectures | grep -qx "$deb_arch" && apt-cache show "linux-image-$deb_arch:$deb_arch" >/dev/null 2>&1 && return
  say "adding the $deb_arch architecture to dpkg and updating apt's lists (once)"
  dpkg --add-architecture "$deb_arch"
  apt-get update -q >&2 || true
}

# Debian's bookworm kernel, unpacked into $CACHE/linux-VERSION; $CACHE/$kernel_link points at it.
ensure_l1_kernel() {
  L1="$CACHE/$kernel_link"
  local m missing=
  for m in "${MODULES[@]}"; do [[ -f $L1/modules/$m.ko ]] || missing=1; done
  [[ -f $L1/vmlinuz && -z $missing ]] && return
  local pkg=
  if [[ $kernel_link == linux-6.12 ]]; then
    pkg="$(apt-cache search --names-only "^linux-image-6\\.12\\.[0-9]+\\+deb12-$deb_arch\$" \
      | awk '{print $1}' | sort -V | tail -n1)"
    [[ -n $pkg ]] || die "apt knows no linux-image-6.12.*+deb12-$deb_arch package: run apt-get update (Debian 12 sources)"
  fi
  [[ -n $pkg ]] || pkg="$(apt-cache depends "linux-image-$deb_arch:$deb_arch" 2>/dev/null \
    | sed -n "s/^ *Depends: \\(linux-image-6\\.1\\.0-[0-9]*-$deb_arch\\)\\(:$deb_arch\\)\\{0,1\\}\$/\\1/p" | head -n1)"
  [[ -n $pkg ]] || pkg="$(apt-cache search --names-only "^linux-image-6\\.1\\.0-[0-9]+-$deb_arch\$" \
    | awk '{print $1}' | sort -V | tail -n1)"
  [[ -n $pkg ]] || die "apt knows no linux-image-6.1.0-*-$deb_arch package: run apt-get update (Debian 12 sources)"
  say "fetching L1 kernel $pkg:$deb_arch (once)"
  local work="$CACHE/.fetch.$$"
  rm -rf "$work" && mkdir -p "$work/x"
  (cd "$work" && apt-get download -q "$pkg:$deb_arch" >&2) || die "apt-get download $pkg:$deb_arch failed"
  dpkg-deb -x "$work"/*.deb "$work/x"
  local version="${pkg#linux-image-}"
  local out="$CACHE/linux-$version"
  rm -rf "$out" && mkdir -p "$out/modules"
  cp "$work/x/boot/vmlinuz-$version" "$out/vmlinuz"
  # What is built in: ensure_initrd skips those among the modules' dependencies.
  cp "$work/x/lib/modules/$version/modules.builtin" "$out/modules.builtin"
  local m path
  for m in "${MODULES[@]}"; do
    path="$(find "$work/x/lib/modules/$version" -name "$m.ko*" | head -n1)"
    [[ -n $path ]] || die "$pkg has no module $m"
    case "$path" in
      *.ko) cp "$path" "$out/modules/$m.ko" ;;
      *.ko.xz) xz -dc "$path" >"$out/modules/$m.ko" ;;
      *) die "unexpected module file $path" ;;
    esac
  done
  ln -sfn "linux-$version" "$L1"
  rm -rf "$work"
}

# L1's static busybox: the host's for x86_64, Debian's busybox-static:arm64 (unpacked) for aarch64.
ensure_busybox() {
  if [[ $arch == x86_64 ]]; then
    BUSYBOX=/usr/bin/busybox
    [[ -x $BUSYBOX ]] && file -L "$BUSYBOX" | grep -q 'statically linked' \
      || die "a static busybox is needed at $BUSYBOX: apt-get install -y busybox-static"
    return
  fi
  BUSYBOX="$CACHE/busybox-$deb_arch"
  [[ -x $BUSYBOX ]] && return
  say "fetching busybox-static:$deb_arch (once)"
  local work="$CACHE/.fetch.$$"
  rm -rf "$work" && mkdir -p "$work/x"
  (cd "$work" && apt-get download -q "busybox-static:$deb_arch" >&2) \
    || die "apt-get download busybox-static:$deb_arch failed"
  dpkg-deb -x "$work"/*.deb "$work/x"
  [[ -x $work/x/bin/busybox ]] || die "busybox-static:$deb_arch has no bin/busybox"
  mv "$work/x/bin/busybox" "$BUSYBOX.tmp" && mv "$BUSYBOX.tmp" "$BUSYBOX"
  rm -rf "$work"
}

# aarch64 only: Debian's mke2fs for arm64 and the shared libraries it loads (glibc's loader and
# libc included), unpacked into $E2FS, so the image pipeline (`mkfs.ext4 -d`) runs in L1's busybox
# root. Busybox has no mkfs.ext4 with -d, and the host's is an x86 program.
E2FS_DEBS=(e2fsprogs libext2fs2 libcom-err2 libblkid1 libuuid1 libc6)
ensure_e2fsprogs() {
  E2FS=
  [[ $arch == x86_64 ]] && return
  E2FS="$CACHE/e2fsprogs-$deb_arch"
  [[ -x $E2FS/sbin/mke2fs ]] && return
  say "fetching e2fsprogs:$deb_arch and its libraries (once)"
  local work="$CACHE/.fetch.$$" pkg
  rm -rf "$work" && mkdir -p "$work/x"
  for pkg in "${E2FS_DEBS[@]}"; do
    (cd "$work" && apt-get download -q "$pkg:$deb_arch" >&2) || die "apt-get download $pkg:$deb_arch failed"
  done
  for pkg in "$work"/*.deb; do dpkg-deb -x "$pkg" "$work/x"; done
  [[ -x $work/x/sbin/mke2fs ]] || die "e2fsprogs:$deb_arch has no sbin/mke2fs"
  rm -rf "$E2FS.tmp" && mkdir -p "$E2FS.tmp/sbin"
  cp -a "$work/x/sbin/mke2fs" "$E2FS.tmp/sbin/"
  # Libraries only: /lib/ld-linux-*.so.1 and /lib/<triplet>/*.so*, as the loader looks for them.
  (cd "$work/x" && find lib usr/lib -maxdepth 2 \( -name 'ld-linux-*' -o -name '*.so*' \) 2>/dev/null \
    | cpio -pdm --quiet "$E2FS.tmp") || die "cannot copy e2fsprogs:$deb_arch's libraries"
  rm -rf "$E2FS" && mv "$E2FS.tmp" "$E2FS"
  rm -rf "$work"
}

# The initramfs, keyed by what goes into it.
ensure_initrd() {
  local key
  key="$(cat "$LANE_DIR/init.sh" "$BUSYBOX" "$L1"/modules/*.ko \
    ${E2FS:+$(find "$E2FS" -type f | sort)} | sha256sum | cut -c1-16)"
  INITRD="$CACHE/initrd-$key.gz"
  [[ -f $INITRD ]] && return
  say "building the L1 initramfs (once)"
  local stage="$RUN/initrd"
  mkdir -p "$stage"/{bin,lib/modules,proc,sys,dev,host}
  cp "$BUSYBOX" "$stage/bin/busybox"
  install -m 0755 "$LANE_DIR/init.sh" "$stage/init"
  cp "$L1"/modules/*.ko "$stage/lib/modules/"
  if [[ -n $E2FS ]]; then
    cp -a "$E2FS"/. "$stage/"
    ln -s ../sbin/mke2fs "$stage/bin/mkfs.ext4"
  fi
  # Load order: each module after everything in its `depends=` (insmod does not resolve them)
  # that is not built into the kernel.
  local -A placed=()
  local builtin
  for builtin in $(sed -n 's|.*/\([^/]*\)\.ko$|\1|p' "$L1/modules.builtin" 2>/dev/null); do
    placed[$builtin]=1
  done
  local order=() m dep ready progress=1
  while ((${#order[@]} < ${#MODULES[@]} && progress)); do
    progress=0
    for m in "${MODULES[@]}"; do
      [[ -n ${placed[$m]:-} ]] && continue
      ready=1
      for dep in $(strings "$L1/modules/$m.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
        [[ -n ${placed[${dep//_/-}]:-} || -n ${placed[${dep//-/_}]:-} ]] || ready=0
      done
      ((ready)) && { placed[$m]=1; order+=("$m"); progress=1; }
    done
  done
  ((${#order[@]} == ${#MODULES[@]})) || die "cannot order the L1 modules by their dependencies"
  printf '%s\n' "${order[@]}" >"$stage/lib/modules/order"
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp.$$"
  mv "$INITRD.tmp.$$" "$INITRD"
  rm -rf "$stage"
}

# --- one run directory per run --------------------------------------------------------------

mkdir -p "$TMP_BASE" "$CACHE"
chmod 0700 "$TMP_BASE"
# Reap what earlier runs left (a runner SIGKILLed before its watchdog could clean up): a
# directory whose lock nobody holds belongs to a dead run. One without a lock file is a run
# starting right now, unless it is old.
for dir in "$TMP_BASE"/run.*; do
  [[ -d $dir ]] || continue
  if [[ -e $dir/lock ]]; then
    flock -n "$dir/lock" "${BASH_SOURCE[0]}" --reap "$dir" || true
  elif [[ -n $(find "$dir" -maxdepth 0 -mmin +10) ]]; then
    rm -rf "$dir"
  fi
done

RUN="$(mktemp -d "$TMP_BASE/run.XXXXXXXX")"
exec {lock_fd}>"$RUN/lock"
flock -n "$lock_fd" || die "cannot lock $RUN/lock"
qemu_pid= timer_pid=
cleanup() {
  set +e
  [[ -n $qemu_pid ]] && kill -KILL "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
  [[ -n $timer_pid ]] && kill -KILL "$timer_pid" 2>/dev/null && wait "$timer_pid" 2>/dev/null
  rm -rf "$RUN"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
# The watchdog: once this script and its QEMU are gone (even by SIGKILL) the lock is free, and it
# removes the run directory. It holds neither the lock nor our stdout.
flock "$RUN/lock" "${BASH_SOURCE[0]}" --reap "$RUN" </dev/null >/dev/null 2>&1 {lock_fd}>&- &

# One installer at a time; the lock is released before L1 boots, so runs go in parallel.
exec {install_fd}>"$CACHE/.install.lock"
flock "$install_fd"
ensure_qemu
ensure_foreign_arch
ensure_l1_kernel
ensure_busybox
ensure_e2fsprogs
ensure_initrd
exec {install_fd}>&-
command -v setpriv >/dev/null || die "setpriv (util-linux) is missing: apt-get install -y util-linux"

# What L1 runs (x86_64: chrooted into the host's /; aarch64: in its own root, with busybox's
# sh): this environment (minus bash's own variables; on aarch64 PATH is L1's /bin, as the host's
# programs cannot run there), the L1 tmpfs for caches and sockets, this directory, the command.
mkdir -m 0700 "$RUN/l1"
{
  echo "# generated by lane/run.sh"
  for name in $(compgen -e); do
    case "$name" in
      BASH* | SHELLOPTS | SHLVL | PWD | OLDPWD | _ | SUPERMACHINE_CACHE_DIR | TMPDIR | XDG_RUNTIME_DIR) continue ;;
      PATH) [[ $arch == x86_64 ]] || { echo 'export PATH=/bin'; continue; } ;;
    esac
    printf 'export %s=%q\n' "$name" "${!name}"
  done
  printf 'mkdir -m 0700 %q %q %q\n' "$RUN/l1/cache" "$RUN/l1/tmp" "$RUN/l1/run"
  printf 'export SUPERMACHINE_CACHE_DIR=%q TMPDIR=%q XDG_RUNTIME_DIR=%q\n' \
    "$RUN/l1/cache" "$RUN/l1/tmp" "$RUN/l1/run"
  printf 'cd %q || exit 125\n' "$PWD"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$RUN/cmd.sh"

append="$append lane.run=$RUN "
((verbose)) || append="quiet loglevel=3 $append"
say "booting $arch L1: $cpus vCPUs, $memory MiB, QEMU TCG with $([[ $arch == x86_64 ]] && echo AMD-V || echo EL2) (timeout ${timeout}s)"
start=$SECONDS
# stdin from /dev/null: QEMU leaves the terminal alone and the command reads nothing.
setpriv --pdeathsig KILL -- "$qemu" "${qemu_args[@]}" -smp "$cpus" -m "$memory" \
  -nographic -no-reboot -nic none \
  -kernel "$L1/vmlinuz" -initrd "$INITRD" -append "$append" \
  -virtfs local,path=/,mount_tag=host,security_model=passthrough,id=host \
  </dev/null {lock_fd}>&- &
qemu_pid=$!
echo "$qemu_pid" >"$RUN/qemu.pid"
setpriv --pdeathsig KILL -- sleep "$timeout" </dev/null >/dev/null {lock_fd}>&- &
timer_pid=$!

finished=
set +e
wait -n -p finished "$qemu_pid" "$timer_pid"
qemu_status=$?
set -e
if [[ $finished == "$timer_pid" ]]; then
  timer_pid=
  kill -KILL "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
  printf 'lane/run.sh: error: timed out after %ss; L1 killed\n' "$timeout" >&2
  exit 124
fi
qemu_pid=
elapsed=$((SECONDS - start))
if [[ -f $RUN/rc ]]; then
  rc="$(<"$RUN/rc")"
  say "command exited $rc; L1 ran ${elapsed}s"
  exit "$rc"
fi
[[ -f $RUN/error ]] && die "L1: $(<"$RUN/error")"
die "L1 stopped (QEMU exit $qemu_status) without reporting the command's exit code: see its console output above"
