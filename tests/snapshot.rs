//! Snapshot and restore against real microVMs: exec after restore, independence of VMs restored
//! from one snapshot (RNG, clock, memory), every class of damaged or mismatched snapshot
//! refused with its error, no leaks over many restore cycles, and the zero-flag snapshot cache
//! under concurrent first starts.
//!
//! One VM is started per test binary (from the snapshot cache when warm) and snapshotted into
//! a temp dir that every test restores from. The tests take turns (a lock), since the leak test
//! counts this process's threads, fds and mappings. Needs `/dev/kvm`; skips without it only
//! when `SUPERMACHINE_REQUIRE_KVM` is unset.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use supermachine::{Error, Snapshot, SnapshotError, Vm};

fn runtime() -> &'static tokio::runtime::Runtime {
    supermachine_e2e::shared_runtime()
}

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The snapshot every test restores from (taken once per binary), and the dir holding it.
async fn source() -> &'static (tempfile::TempDir, Snapshot) {
    static SOURCE: tokio::sync::OnceCell<(tempfile::TempDir, Snapshot)> =
        tokio::sync::OnceCell::const_new();
    SOURCE
        .get_or_init(|| async {
            let config = supermachine_e2e::test_vm_config().expect("test VM config");
            let vm = Vm::start(config).await.expect("source VM starts");
            // The snapshot's clock says 2001: a restored guest shows the host's time only if
            // the reseed (which also sets the clock) reached it before what the test asks.
            let set = vm
                .exec(["date", "-s", "@978307200"])
                .output()
                .await
                .expect("exec date -s");
            assert!(set.status.success(), "date -s: {set:?}");
            let now = vm.exec(["date", "+%s"]).output().await.expect("exec date");
            let now: u64 = String::from_utf8_lossy(&now.stdout)
                .trim()
                .parse()
                .expect("date +%s");
            assert!(
                now < 1_000_000_000,
                "the source guest's clock was not set back: {now}"
            );
            let dir = tempfile::tempdir().expect("temp dir");
            let snapshot = vm
                .snapshot(dir.path().join("snap"))
                .await
                .expect("snapshot");
            // Snapshotting leaves the VM running.
            let out = vm
                .exec(["echo", "still here"])
                .output()
                .await
                .expect("exec");
            assert_eq!(&out.stdout[..], b"still here\n");
            (dir, snapshot)
        })
        .await
}

/// Checks what [`RNG_AND_CLOCK`] printed in restored guests: each line's random bytes are its
/// own, and each guest clock was within 2 s of the host's (`before..after`, Unix seconds). A
/// guest not reseeded can still read bytes of its own (early in its life its kernel reseeds on
/// its own, from RDRAND), but its clock says 2001, as the snapshot's did ([`source`]).
fn assert_reseeded(lines: &[(i32, String)], before: u64, after: u64) {
    let mut seen = std::collections::HashSet::new();
    for (code, line) in lines {
        assert_eq!(*code, 0, "{line}");
        let (bytes, date) = line.split_once(' ').expect("bytes and date");
        assert_eq!(bytes.len(), 32, "{line}");
        assert!(
            seen.insert(bytes.to_owned()),
            "random bytes {bytes} read twice"
        );
        let t: u64 = date.trim().parse().expect("date +%s");
        assert!(
            t + 2 >= before && t <= after + 2,
            "guest clock {t} not within 2 s of the host ({before}..{after})"
        );
    }
}

/// Prints 16 random bytes in hex and the guest's clock in Unix seconds, on one line.
const RNG_AND_CLOCK: &str =
    "echo $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n') $(date +%s)";

fn run(test: &str, body: impl std::future::Future<Output = ()>) {
    if !supermachine_e2e::kvm_available_or_skip(test) {
        return;
    }
    let _turn = one_at_a_time();
    runtime().block_on(body);
}

async fn sh(vm: &Vm, script: &str) -> (i32, String) {
    let out = vm
        .exec(["sh", "-c", script])
        .output()
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    (
        supermachine_e2e::shell_code(&out.status),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn restored_vms_run_execs_and_share_nothing() {
    run("restored_vms_run_execs_and_share_nothing", async {
        let (_, snapshot) = source().await;
        let (a, b) = tokio::join!(Vm::restore(snapshot), Vm::restore(snapshot));
        let (a, b) = (a.expect("restore a"), b.expect("restore b"));
        assert!(a.start_timings().restored && b.start_timings().restored);

        let script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";
        let before = unix_now();
        let ((code_a, out_a), (code_b, out_b)) = tokio::join!(sh(&a, script), sh(&b, script));
        let after = unix_now();
        assert_eq!((code_a, code_b), (0, 0), "{out_a} / {out_b}");
        let (rand_a, date_a) = out_a.split_once('\n').expect("two lines");
        let (rand_b, date_b) = out_b.split_once('\n').expect("two lines");
        assert_eq!(rand_a.len(), 64, "{out_a}");
        assert_ne!(
            rand_a, rand_b,
            "two restored VMs read the same random bytes"
        );
        for date in [date_a, date_b] {
            let t: u64 = date.trim().parse().expect("date +%s");
            assert!(
                t + 2 >= before && t <= after + 2,
                "guest clock {t} not within 2 s of the host ({before}..{after})"
            );
        }

        // Copy-on-write: what one VM writes, the other never sees.
        assert_eq!(
            sh(&a, "echo mine > /tmp/cow-marker && cat /tmp/cow-marker").await,
            (0, "mine".into())
        );
        assert_eq!(sh(&b, "test -e /tmp/cow-marker").await.0, 1);
    });
}

/// The reseed rides in front of the first requests: several requests made at once, before the
/// guest has answered anything, must each find it applied, in both VMs restored from one
/// snapshot (without it, the two VMs' reads would repeat each other's).
#[test]
fn concurrent_first_requests_all_find_the_guest_reseeded() {
    run(
        "concurrent_first_requests_all_find_the_guest_reseeded",
        async {
            let (_, snapshot) = source().await;
            let before = unix_now();
            let (a, b) = tokio::join!(Vm::restore(snapshot), Vm::restore(snapshot));
            let (a, b) = (a.expect("restore a"), b.expect("restore b"));
            let reads = |vm| futures::future::join_all((0..4).map(move |_| sh(vm, RNG_AND_CLOCK)));
            let (from_a, from_b) = tokio::join!(reads(&a), reads(&b));
            let lines: Vec<_> = from_a.into_iter().chain(from_b).collect();
            assert_reseeded(&lines, before, unix_now());
        },
    );
}

/// Clients of `Vm::serve_vsock_unix` reach the agent around the VM's `Agent`, so they carry no
/// reseed: as the first thing asked of two VMs restored from one snapshot, they must still find
/// each guest reseeded. The muxer holds them until it is; behind it, each restored VM is sent
/// the reseed 20 ms after its restore anyway (without both, this fails: checked by mutation).
#[test]
fn muxer_clients_first_find_the_guest_reseeded() {
    run("muxer_clients_first_find_the_guest_reseeded", async {
        let (_, snapshot) = source().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let before = unix_now();
        let (a, b) = tokio::join!(Vm::restore(snapshot), Vm::restore(snapshot));
        let (a, b) = (a.expect("restore a"), b.expect("restore b"));
        let mut lines = Vec::new();
        for (name, vm) in [("a", &a), ("b", &b)] {
            let path = dir.path().join(name);
            let muxer = tokio::spawn(vm.serve_vsock_unix(&path));
            let bound = Instant::now();
            while !path.exists() {
                assert!(
                    bound.elapsed() < Duration::from_secs(30),
                    "the muxer never bound"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let client =
                supermachine::Agent::with_connector(supermachine::UnixConnector::muxed(&path));
            let out = client
                .exec(["sh", "-c", RNG_AND_CLOCK])
                .output()
                .await
                .expect("exec through the muxer");
            lines.push((
                supermachine_e2e::shell_code(&out.status),
                String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            ));
            muxer.abort();
        }
        assert_reseeded(&lines, before, unix_now());
    });
}

/// Whether this host's KVM can map guest memory ahead of the guest, asked the way the VMM asks
/// it: `KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY)` on a new VM (Linux 6.10+ on x86_64 with
/// two-dimensional paging; not PVM, which shadows the guest's page tables).
fn host_prefaults() -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // _IO(KVMIO, 0x01), _IO(KVMIO, 0x03); the capability's number from the kernel's uapi.
    const KVM_CREATE_VM: u32 = 0xAE01;
    const KVM_CHECK_EXTENSION: u32 = 0xAE03;
    const KVM_CAP_PRE_FAULT_MEMORY: libc::c_ulong = 236;
    let Ok(kvm) = std::fs::File::open("/dev/kvm") else {
        return false;
    };
    // SAFETY: KVM_CREATE_VM takes an integer (the machine type, 0: the default) and returns a
    // new descriptor or -1.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0 as libc::c_ulong) };
    if vm < 0 {
        return false;
    }
    // SAFETY: `vm` was just returned by KVM_CREATE_VM and is owned by nobody else.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and returns one.
    let supported = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_CHECK_EXTENSION as _,
            KVM_CAP_PRE_FAULT_MEMORY,
        )
    };
    supported > 0
}

#[test]
fn snapshots_record_a_working_set_and_restores_survive_a_damaged_one() {
    run(
        "snapshots_record_a_working_set_and_restores_survive_a_damaged_one",
        async {
            let (_, snapshot) = source().await;
            let file = snapshot.dir().join("working-set");
            assert_eq!(
                file.exists(),
                host_prefaults(),
                "a working set is recorded exactly where KVM can pre-fault"
            );
            if let Ok(meta) = std::fs::metadata(&file) {
                // Header, then 16 bytes per run; a first exec touches hundreds of pages.
                assert!(
                    meta.len() > 24 + 16 * 10 && (meta.len() - 24) % 16 == 0,
                    "{meta:?}"
                );
            }
            // Restores with it run execs (the other tests restore with it too); a damaged
            // or foreign one is ignored, never fatal.
            let work = tempfile::tempdir().expect("temp dir");
            for (name, bytes) in [("garbage", &b"not a working set"[..]), ("empty", &b""[..])] {
                let dir = work.path().join(name);
                copy_snapshot(snapshot.dir(), &dir);
                std::fs::write(dir.join("working-set"), bytes).expect("damage");
                let copy = Snapshot::open(&dir).await.expect("open the copy");
                let vm = Vm::restore(&copy)
                    .await
                    .expect("restore despite the damage");
                assert_eq!(sh(&vm, "echo ok").await, (0, "ok".into()), "{name}");
            }
        },
    );
}

/// A sparse copy of the source snapshot to damage (a plain copy where `cp` has no `--sparse`:
/// busybox's, in the arm64 lane).
fn copy_snapshot(src: &Path, dst: &Path) {
    let copy = |args: &[&str]| {
        Command::new("cp")
            .args(args)
            .arg(src)
            .arg(dst)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("cp")
            .success()
    };
    assert!(copy(&["-a", "--sparse=always"]) || copy(&["-a"]));
}

fn snapshot_error(result: Result<Snapshot, Error>) -> SnapshotError {
    match result {
        Err(Error::Snapshot(e)) => e,
        Err(other) => panic!("expected a snapshot error, got {other}"),
        Ok(_) => panic!("a damaged snapshot was accepted"),
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.write_all_at(bytes, offset).expect("patch");
}

#[test]
fn damaged_and_mismatched_snapshots_are_refused() {
    run("damaged_and_mismatched_snapshots_are_refused", async {
        let (_, snapshot) = source().await;
        let work = tempfile::tempdir().expect("temp dir");
        let case = |name: &str| -> PathBuf {
            let dir = work.path().join(name);
            copy_snapshot(snapshot.dir(), &dir);
            dir
        };

        let dir = case("truncated");
        let memory = dir.join("memory");
        let len = std::fs::metadata(&memory).expect("memory").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&memory)
            .and_then(|f| f.set_len(len - 4096))
            .expect("truncate");
        assert!(matches!(
            snapshot_error(Snapshot::open(&dir).await),
            SnapshotError::MemoryTruncated { found, expected, .. } if found + 4096 == expected
        ));

        let dir = case("checksum");
        patch(&dir.join("vmstate"), 200, b"\xde\xad");
        let err = snapshot_error(Snapshot::open(&dir).await);
        assert!(
            matches!(&err, SnapshotError::Corrupt { why, .. } if why.contains("checksum")),
            "{err}"
        );

        let dir = case("vmstate-version");
        patch(&dir.join("vmstate"), 8, &99u32.to_le_bytes());
        assert!(matches!(
            snapshot_error(Snapshot::open(&dir).await),
            SnapshotError::FormatVersion { found: 99, .. }
        ));

        let dir = case("meta-version");
        let meta = std::fs::read_to_string(dir.join("meta.json")).expect("meta");
        // The version this build writes (supermachine's SNAPSHOT_FORMAT_VERSION).
        let current = "\"format_version\": 2";
        assert!(meta.contains(current), "{meta}");
        let meta = meta.replacen(current, "\"format_version\": 7", 1);
        std::fs::write(dir.join("meta.json"), meta).expect("write meta");
        assert!(matches!(
            snapshot_error(Snapshot::open(&dir).await),
            SnapshotError::FormatVersion { found: 7, .. }
        ));

        let dir = case("no-meta");
        std::fs::remove_file(dir.join("meta.json")).expect("rm meta");
        assert!(matches!(
            snapshot_error(Snapshot::open(&dir).await),
            SnapshotError::Io { .. }
        ));

        // Damage after `open` is caught by the restore itself, and leaves nothing running.
        let dir = case("truncated-after-open");
        let opened = Snapshot::open(&dir).await.expect("intact copy opens");
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .and_then(|f| f.set_len(1 << 20))
            .expect("truncate");
        match Vm::restore(&opened).await {
            Err(Error::Snapshot(SnapshotError::MemoryTruncated { .. })) => {}
            Err(other) => panic!("expected MemoryTruncated, got {other}"),
            Ok(_) => panic!("restored a truncated snapshot"),
        }

        // Changed memory contents: only the explicit (slow) verification reads them.
        let dir = case("changed-memory");
        let intact = Snapshot::open(&dir).await.expect("intact copy opens");
        intact
            .verify_memory()
            .await
            .expect("intact memory verifies");
        patch(&dir.join("memory"), 0x10_0000, b"garbage");
        let changed = Snapshot::open(&dir).await.expect("size still right");
        assert!(matches!(
            changed.verify_memory().await,
            Err(Error::Snapshot(SnapshotError::MemoryChanged { .. }))
        ));

        // Another VM than the configuration describes.
        let config = supermachine_e2e::test_vm_config().expect("config");
        snapshot
            .check_matches(&config)
            .await
            .expect("the source config matches");
        let what = |config: supermachine::VmConfig| {
            let snapshot = &snapshot;
            async move {
                match snapshot.check_matches(&config).await {
                    Err(Error::Snapshot(SnapshotError::Mismatch { what, .. })) => what,
                    Err(other) => panic!("expected a mismatch, got {other}"),
                    Ok(()) => panic!("a different VM matched"),
                }
            }
        };
        assert!(what(config.clone().memory_mib(512))
            .await
            .starts_with("memory"));
        assert!(what(config.clone().vcpus(2)).await.starts_with("vCPUs"));
        let other_agent = work.path().join("agent");
        let mut bytes =
            std::fs::read(supermachine_e2e::agent_binary().expect("agent")).expect("read");
        bytes.push(0);
        std::fs::write(&other_agent, bytes).expect("write agent");
        assert!(what(config.clone().agent(&other_agent))
            .await
            .starts_with("agent"));
        let other_kernel = work.path().join("vmlinux");
        let mut bytes =
            std::fs::read(supermachine_e2e::guest_kernel().expect("kernel")).expect("read");
        bytes.push(0);
        std::fs::write(&other_kernel, bytes).expect("write kernel");
        assert!(what(config.kernel(&other_kernel))
            .await
            .starts_with("kernel"));
    });
}

fn count_dir(path: impl AsRef<Path>) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Temporary entries (`.snapshot-*`, `.tmp*`: dot names) in `path`. Other tests of this binary
/// boot their own configurations meanwhile, adding committed snapshots and lock files to the
/// shared cache (a loaded run saw 10 -> 12 entries); only a temporary one left behind is a leak.
fn count_temporary(path: impl AsRef<Path>) -> usize {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().as_encoded_bytes().starts_with(b"."))
                .count()
        })
        .unwrap_or(0)
}

/// Threads of this process, without the kernel's per-VM `kvm-nx-lpage-recovery` workers
/// (created and reaped by KVM with each VM fd, asynchronously).
fn own_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .map(|c| !c.starts_with("kvm-nx-lpage"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// Threads whose name says they belong to a VM (vCPUs, block I/O).
fn vm_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .map(|c| c.starts_with("sm-vcpu") || c.starts_with("virtio-blk"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Mappings of `path` (a restored VM maps its snapshot's memory file).
fn mappings_of(path: &Path) -> usize {
    let needle = path.to_string_lossy().into_owned();
    count_maps(|l| l.contains(&needle))
}

/// Lines of `/proc/self/maps` that `matches`.
fn count_maps(matches: impl Fn(&str) -> bool) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().filter(|l| matches(l)).count())
        .unwrap_or(0)
}

/// How many more mappings than before the process may hold after the cycles: allocator arenas
/// (see [`Footprint`]), far below the 50 a per-cycle leak would leave.
const ALLOCATOR_SLACK: usize = 4;

/// What a leaking VM would leave in this process. Thread and mapping totals may also shrink
/// meanwhile (tokio retires idle blocking-pool threads, with their stacks), so those must only
/// not grow; what belongs to VMs (the memory file, the vCPUs' `kvm-vcpu` run pages) must be
/// back exactly where it was. The mapping total may grow by [`ALLOCATOR_SLACK`]: glibc's malloc
/// keeps per-thread arenas after their threads end, and the arm64 lane saw one cycle out of 50
/// leave one more (47 → 48 mappings, nothing else changed); a leak per cycle would show 50.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    vm_threads: usize,
    threads: usize,
    memory_mappings: usize,
    vcpu_mappings: usize,
    mappings: usize,
    /// The snapshot dir and its parent, where the snapshot code makes its temp dirs.
    snapshot_entries: usize,
    /// Temporary entries in the snapshot cache, where `Vm::start` makes its temp dirs.
    cache_temporaries: usize,
}

impl Footprint {
    fn no_more_than(&self, before: &Footprint) -> bool {
        self.fds == before.fds
            && self.vm_threads == before.vm_threads
            && self.memory_mappings == before.memory_mappings
            && self.vcpu_mappings == before.vcpu_mappings
            && self.snapshot_entries == before.snapshot_entries
            && self.cache_temporaries <= before.cache_temporaries
            && self.threads <= before.threads
            && self.mappings <= before.mappings + ALLOCATOR_SLACK
    }
}

fn footprint(snapshot: &Snapshot) -> Footprint {
    let cache = supermachine::cache::root()
        .map(|r| r.join("snapshots"))
        .unwrap_or_default();
    Footprint {
        fds: count_dir("/proc/self/fd"),
        vm_threads: vm_threads(),
        threads: own_threads(),
        memory_mappings: mappings_of(&snapshot.dir().join("memory")),
        vcpu_mappings: count_maps(|l| l.contains("anon_inode:kvm-vcpu")),
        mappings: mappings(),
        snapshot_entries: count_dir(snapshot.dir()) + snapshot.dir().parent().map_or(0, count_dir),
        cache_temporaries: count_temporary(cache),
    }
}

#[test]
fn fifty_restore_cycles_leak_nothing() {
    run("fifty_restore_cycles_leak_nothing", async {
        let (_, snapshot) = source().await;
        let cycle = || async {
            let vm = Vm::restore(snapshot).await.expect("restore");
            let out = vm.exec(["true"]).output().await.expect("exec");
            assert!(out.status.success());
            drop(vm);
        };
        // One cycle first: lazily created process-wide things (signal handler, runtime
        // threads, tracing) are not leaks.
        cycle().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = footprint(snapshot);
        assert_eq!(
            (
                before.vm_threads,
                before.memory_mappings,
                before.vcpu_mappings
            ),
            (0, 0, 0)
        );
        for _ in 0..50 {
            cycle().await;
        }
        // KVM reaps VM resources shortly after the last fd closes.
        let mut after = footprint(snapshot);
        for _ in 0..50 {
            if after.no_more_than(&before) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = footprint(snapshot);
        }
        assert!(
            after.no_more_than(&before),
            "50 restore→exec→drop cycles left something behind:\nbefore {before:?}\nafter  {after:?}"
        );
    });
}

#[test]
fn snapshot_refuses_a_used_directory_and_an_ended_vm() {
    run("snapshot_refuses_a_used_directory_and_an_ended_vm", async {
        let (_, snapshot) = source().await;
        let vm = Vm::restore(snapshot).await.expect("restore");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("something"), b"x").expect("write");
        match vm.snapshot(dir.path()).await {
            Err(Error::Snapshot(SnapshotError::Exists(_))) => {}
            other => panic!("expected Exists, got {other:?}"),
        }
        vm.stop().await;
        match vm.snapshot(dir.path().join("new")).await {
            Err(Error::VmExited(_)) => {}
            other => panic!("expected VmExited, got {other:?}"),
        }
        assert_eq!(
            count_dir(dir.path()),
            1,
            "nothing written for failed snapshots"
        );
    });
}

/// A snapshot taken while an exec runs: in VMs restored from it, that exec's connection belongs
/// to a host process that is gone, so the restore resets the guest's vsock transport; the
/// agent's listener survives it (new execs work) and the orphaned exec is killed.
#[test]
fn snapshot_with_an_exec_in_flight_restores_cleanly() {
    run("snapshot_with_an_exec_in_flight_restores_cleanly", async {
        let (_, snapshot) = source().await;
        let vm = Vm::restore(snapshot).await.expect("restore");
        let mut child = vm
            .exec(["sh", "-c", "echo started; exec sleep 1000"])
            .spawn()
            .await
            .expect("spawn");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut line = [0u8; 8];
        tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut line)
            .await
            .expect("the exec started");
        let dir = tempfile::tempdir().expect("temp dir");
        let busy = vm
            .snapshot(dir.path().join("busy"))
            .await
            .expect("snapshot");
        let restored = Vm::restore(&busy).await.expect("restore the busy snapshot");
        assert_eq!(sh(&restored, "echo fine").await, (0, "fine".into()));
        // The orphaned `sleep 1000` dies once the agent sees its connection reset.
        let mut left = String::new();
        for _ in 0..50 {
            left = sh(&restored, "ps -o args | grep -c '^sleep 1000' || true")
                .await
                .1;
            if left == "0" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(left, "0", "the exec of the old host process still runs");
        // Meanwhile the source VM's exec is still there.
        assert_eq!(sh(&vm, "ps -o args | grep -c '^sleep 1000'").await.1, "1");
        drop(child);
    });
}

/// The guest's uptime (`/proc/uptime`, its monotonic clock) in seconds.
async fn uptime(vm: &Vm) -> f64 {
    // No shell in between: the read happens closer to the host's timestamps around it.
    let out = vm
        .exec(["cat", "/proc/uptime"])
        .output()
        .await
        .expect("exec cat /proc/uptime");
    let out = String::from_utf8_lossy(&out.stdout);
    out.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("/proc/uptime said {out:?}"))
}

/// A restored guest's monotonic clock goes on from the snapshot's: the time a snapshot sat on
/// disk never shows up in the guest, however old the snapshot (a jump would fire every timer at
/// once, and on PVM hosts, whose guests read the host's TSC, the first request after restoring
/// a day-old snapshot cost seconds of guest CPU). The guest's clock may only advance while the
/// host ran it: from the first uptime read to the snapshot, and from the restore to the second.
#[test]
fn a_restored_guests_clock_skips_the_time_on_disk() {
    run("a_restored_guests_clock_skips_the_time_on_disk", async {
        // Allowance beyond the host-measured intervals for /proc/uptime's 10 ms resolution and
        // for guest and host clocks running at slightly different rates.
        const SLACK: f64 = 0.5;
        let (_, snapshot) = source().await;
        let vm = Vm::restore(snapshot).await.expect("restore");
        let dir = tempfile::tempdir().expect("temp dir");
        let t0 = Instant::now();
        let before = uptime(&vm).await;
        let aged = vm
            .snapshot(dir.path().join("aged"))
            .await
            .expect("snapshot");
        let ran_before = t0.elapsed();
        vm.stop().await;
        // The bound below counts each exec whole, although the guest reads its uptime partway
        // through: a jump could hide inside that surplus, up to about one exec per side. The
        // time on disk is longer than both together, on slow hosts too, so a jump always
        // breaks the bound.
        let on_disk = Duration::from_secs(3) + 2 * ran_before;
        tokio::time::sleep(on_disk).await;
        let t1 = Instant::now();
        let restored = Vm::restore(&aged).await.expect("restore the aged snapshot");
        let after = uptime(&restored).await;
        let ran_after = t1.elapsed();
        let ran = (ran_before + ran_after).as_secs_f64();
        assert!(
            after - before <= ran + SLACK,
            "the guest's uptime went from {before} s to {after} s while the host ran it for \
             {ran:.2} s: the {:.2} s on disk showed up in the guest",
            on_disk.as_secs_f64()
        );
        assert!(after >= before, "uptime went back: {before} -> {after}");
    });
}

/// Set in the child process of `restore_works_in_a_fresh_process`: the snapshot to restore.
const CHILD_SNAPSHOT_ENV: &str = "SUPERMACHINE_TEST_SNAPSHOT_DIR";

/// A snapshot restores in a process that never ran the VM: the test re-runs this binary with
/// only `fresh_process_child` selected and the snapshot's path in the environment.
#[test]
fn restore_works_in_a_fresh_process() {
    run("restore_works_in_a_fresh_process", async {
        let (_, snapshot) = source().await;
        let exe = std::env::current_exe().expect("test binary");
        let out = tokio::process::Command::new(exe)
            .args(["--exact", "fresh_process_child", "--nocapture"])
            .env(CHILD_SNAPSHOT_ENV, snapshot.dir())
            .output()
            .await
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("child restored: hello from a fresh process"),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The child half of `restore_works_in_a_fresh_process`; does nothing when run on its own.
#[test]
fn fresh_process_child() {
    let Some(dir) = std::env::var_os(CHILD_SNAPSHOT_ENV) else {
        return;
    };
    runtime().block_on(async {
        let snapshot = Snapshot::open(&dir).await.expect("open in the child");
        let vm = Vm::restore(&snapshot).await.expect("restore in the child");
        let (code, out) = sh(&vm, "echo hello from a fresh process").await;
        assert_eq!(code, 0);
        println!("child restored: {out}");
    });
}

/// Two first starts of one configuration at once: exactly one boots (and writes the cache),
/// the other waits for it and restores; neither sees a half-written snapshot.
#[test]
fn concurrent_first_starts_boot_once() {
    run("concurrent_first_starts_boot_once", async {
        // A configuration nobody started before: a unique, inert kernel parameter.
        let marker = format!(
            "supermachine.test_key={}",
            unix_now() ^ u64::from(std::process::id())
        );
        let config = supermachine_e2e::test_vm_config()
            .expect("config")
            .kernel_cmdline(marker);
        let cache = supermachine::cache::root()
            .expect("cache root")
            .join("snapshots");
        let entries = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let old = entries(&cache);
        let (a, b) = tokio::join!(Vm::start(config.clone()), Vm::start(config.clone()));
        let (a, b) = (a.expect("start a"), b.expect("start b"));
        let restored = [a.start_timings().restored, b.start_timings().restored];
        assert_eq!(
            restored.iter().filter(|r| **r).count(),
            1,
            "exactly one start restores: {restored:?}"
        );
        let (code, _) = sh(&b, "true").await;
        assert_eq!(code, 0);
        // The cache entry is complete, and a third start restores it.
        let c = Vm::start(config).await.expect("start c");
        assert!(c.start_timings().restored);
        drop((a, b, c));
        // This configuration will never be started again: do not let CI caches grow.
        for new in entries(&cache).into_iter().filter(|e| !old.contains(e)) {
            let _ = std::fs::remove_dir_all(&new).or_else(|_| std::fs::remove_file(&new));
        }
    });
}
