//! The per-user registry of running VMs: `<runtime dir>/<name>/`, one directory per VM, owned
//! by the process hosting it.
//!
//! ```text
//! <runtime dir>/            $SUPERMACHINE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/supermachine,
//!                           else /tmp/supermachine-<uid> (mode 0700)
//!   <name>/pid              the hosting process (written first: the claim)
//!   <name>/info.json        written once the VM serves (image, command, ports, image config)
//!   <name>/vsock.sock       the vsock muxer (`CONNECT <port>` → `OK <port>`)
//!   <name>/control.sock     ping / console / stop (see `control`)
//!   <name>/output.log       the command's output, for `run -d`
//! ```
//!
//! A host removes its directory when its VM ends. A host that was killed cannot, so every
//! reader checks that the pid still runs and removes directories whose host is gone: `ps`
//! never lists a dead VM, and the name becomes free again.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use supermachine::ImageConfig;

use crate::failure::Failure;

const PID_FILE: &str = "pid";
const INFO_FILE: &str = "info.json";
pub const MUXER_SOCKET: &str = "vsock.sock";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const OUTPUT_LOG: &str = "output.log";

/// Longest VM name; keeps socket paths under the 108-byte `sun_path` limit.
const MAX_NAME: usize = 48;

/// What `ps` and `exec` need to know about a VM, written by its host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub created_unix: u64,
    pub ports: Vec<String>,
    /// Env / WorkingDir / User defaults for `exec`.
    pub image_config: Option<ImageConfig>,
    pub detached: bool,
}

/// The registry root.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// A VM directory this process has claimed; removed on drop.
#[derive(Debug)]
pub struct Claim {
    dir: PathBuf,
    released: bool,
}

/// A registered VM as a reader sees it.
#[derive(Debug)]
pub struct Entry {
    pub name: String,
    pub dir: PathBuf,
    /// The hosting process (its pid, and a way to check it is still the same one).
    pub host: HostProcess,
    /// `None` while the VM is still starting.
    pub info: Option<Info>,
}

impl Registry {
    pub fn open() -> Result<Registry, Failure> {
        let root = root_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| Failure::from(e).context(format!("cannot create {}", root.display())))?;
        // The sockets in it control VMs: refuse a directory someone else could get into.
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(&root)?;
        if meta.uid() != rustix::process::getuid().as_raw() || meta.mode() & 0o077 != 0 {
            return Err(Failure::new(format!(
                "{} must be owned by you and private (mode 0700); remove it or set \
                 SUPERMACHINE_RUNTIME_DIR",
                root.display()
            )));
        }
        Ok(Registry { root })
    }

    /// Claims `name` for this process: fails if a live VM has it; takes over a dead one's.
    pub fn claim(&self, name: &str) -> Result<Claim, Failure> {
        check_name(name)?;
        let dir = self.root.join(name);
        for _ in 0..2 {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let claim = Claim {
                        dir: dir.clone(),
                        released: false,
                    };
                    fs::write(dir.join(PID_FILE), HostProcess::me().to_string())?;
                    return Ok(claim);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if self.entry(name).is_some() {
                        return Err(Failure::new(format!(
                            "the name {name:?} is already in use by a running VM (see `supermachine ps`; \
                             `supermachine stop {name}` frees it)"
                        )));
                    }
                    // `entry` removed the dead VM's directory; try again.
                }
                Err(e) => {
                    return Err(Failure::from(e).context(format!("cannot create {}", dir.display())))
                }
            }
        }
        Err(Failure::new(format!(
            "cannot claim the name {name:?}: another start raced for it"
        )))
    }

    /// A fresh name (`vm-` and six hex digits) that no VM has.
    pub fn fresh_name(&self) -> String {
        loop {
            let name = format!("vm-{:06x}", random_u32() & 0xff_ffff);
            if !self.root.join(&name).exists() {
                return name;
            }
        }
    }

    /// The VM named `name`, if its host still runs (a dead host's directory is removed).
    pub fn entry(&self, name: &str) -> Option<Entry> {
        if check_name(name).is_err() {
            return None;
        }
        let dir = self.root.join(name);
        let host: Option<HostProcess> = fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|s| s.parse().ok());
        let alive = host.is_some_and(|h| h.runs());
        if !dir.exists() {
            return None;
        }
        let Some(host) = host.filter(|_| alive) else {
            // A claim is pid-first, so a directory without a pid is either being created this
            // instant or abandoned; give a creator a moment before calling it dead.
            if host.is_none() && recently_modified(&dir) {
                return None;
            }
            tracing::debug!(name, "removing the registry entry of a dead VM host");
            let _ = fs::remove_dir_all(&dir);
            return None;
        };
        let info: Option<Info> = fs::read(dir.join(INFO_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        // A registered host answers on its control socket. One that was killed may still
        // show as a process for a moment while the kernel tears it down (or its pid may have
        // been reused): the socket tells.
        if info.is_some()
            && std::os::unix::net::UnixStream::connect(dir.join(CONTROL_SOCKET)).is_err()
        {
            tracing::debug!(
                name,
                "removing the registry entry of a VM host that does not answer"
            );
            let _ = fs::remove_dir_all(&dir);
            return None;
        }
        Some(Entry {
            name: name.to_owned(),
            dir,
            host,
            info,
        })
    }

    /// The VM named `name`, or an error saying there is none.
    pub fn find(&self, name: &str) -> Result<Entry, Failure> {
        self.entry(name).ok_or_else(|| {
            Failure::new(format!(
                "no running VM named {name:?} (see `supermachine ps`)"
            ))
        })
    }

    /// The VM named `name` once it serves (not while it is starting).
    pub fn find_ready(&self, name: &str) -> Result<(Entry, Info), Failure> {
        let entry = self.find(name)?;
        match entry.info.clone() {
            Some(info) => Ok((entry, info)),
            None => Err(Failure::new(format!(
                "the VM {name:?} is still starting; try again in a moment"
            ))),
        }
    }

    /// Every VM whose host runs, by name.
    pub fn list(&self) -> Result<Vec<Entry>, Failure> {
        let mut names: Vec<String> = fs::read_dir(&self.root)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names.iter().filter_map(|n| self.entry(n)).collect())
    }
}

impl Claim {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Publishes the VM's info: from now on `ps` shows it as running.
    pub fn publish(&self, info: &Info) -> Result<(), Failure> {
        let bytes = serde_json::to_vec_pretty(info)?;
        let tmp = self.dir.join(".info.json.tmp");
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, self.dir.join(INFO_FILE))?;
        Ok(())
    }

    /// Hands the claim to another process (the `run -d` worker): this one must not remove it.
    pub fn hand_over(mut self) -> PathBuf {
        self.released = true;
        self.dir.clone()
    }

    /// Takes over a directory claimed by the parent (`run -d`), rewriting the pid.
    pub fn adopt(dir: PathBuf) -> Result<Claim, Failure> {
        fs::write(dir.join(PID_FILE), HostProcess::me().to_string())?;
        Ok(Claim {
            dir,
            released: false,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.released {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn root_dir() -> PathBuf {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("SUPERMACHINE_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    supermachine::os::default_runtime_dir()
}

fn check_name(name: &str) -> Result<(), Failure> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok_start && ok_chars && name.len() <= MAX_NAME {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "invalid VM name {name:?}: use up to {MAX_NAME} letters, digits, '_', '.' or '-', \
             starting with a letter or digit"
        )))
    }
}

/// A hosting process: its pid and its start time (clock ticks after boot, `/proc/PID/stat`
/// field 22), which tells it apart from a later process that reuses the pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProcess {
    pub pid: u32,
    started: u64,
}

impl HostProcess {
    /// This process.
    fn me() -> HostProcess {
        let pid = std::process::id();
        HostProcess {
            pid,
            started: stat(pid).map_or(0, |st| st.started),
        }
    }

    /// Whether the process still runs (not exiting, not a zombie) and is the same one.
    ///
    /// "Exiting" matters: a killed host keeps its sockets open until the kernel has torn down
    /// its memory (the guest's RAM; that can take a while), so its control socket still
    /// accepts connections although nothing will ever answer.
    pub fn runs(&self) -> bool {
        stat(self.pid).is_some_and(|st| {
            !matches!(st.state, 'Z' | 'X')
                && st.flags & PF_EXITING == 0
                && st.started == self.started
        })
    }
}

impl std::fmt::Display for HostProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.pid, self.started)
    }
}

impl std::str::FromStr for HostProcess {
    type Err = ();

    fn from_str(s: &str) -> Result<HostProcess, ()> {
        let mut fields = s.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(pid)), Some(Ok(started))) => Ok(HostProcess {
                pid: u32::try_from(pid).map_err(|_| ())?,
                started,
            }),
            _ => Err(()),
        }
    }
}

/// `PF_EXITING` in `/proc/PID/stat`'s flags (include/linux/sched.h): set when the process
/// starts to exit, before it releases anything.
const PF_EXITING: u64 = 0x4;

/// The fields of `/proc/PID/stat` that tell whether a host runs.
struct ProcStat {
    state: char,
    flags: u64,
    started: u64,
}

fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<ProcStat> {
    // The fields after the parenthesised command name (which may hold spaces and parentheses):
    // state is field 3, flags field 9, start time field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        flags: fields.get(6)?.parse().ok()?,
        started: fields.get(19)?.parse().ok()?,
    })
}

fn recently_modified(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(5))
}

fn random_u32() -> u32 {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    match fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u32::from_ne_bytes(bytes),
        // Names only need to differ between one user's VMs; the claim catches collisions.
        Err(_) => std::process::id().rotate_left(16) ^ std::process::id(),
    }
}

/// Makes `path` private to the user (the sockets grant full control of the VM).
pub fn make_private(path: &Path) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs() {
        let me = HostProcess::me();
        assert!(me.runs());
        let reused = HostProcess {
            pid: me.pid,
            started: me.started + 1,
        };
        assert!(
            !reused.runs(),
            "a pid with another start time is another process"
        );
    }

    #[test]
    fn stat_fields_survive_odd_command_names() {
        // A command name with spaces and a ')' must not shift the fields; flags 0x400144
        // carries PF_EXITING (0x4).
        let line = "4242 (a) b (c)) D 1 4242 4242 0 -1 4194628 10 0 0 0 5 6 0 0 20 0 9 0 \
                    123456 1000 100 18446744073709551615";
        let st = parse_stat(line).expect("parses");
        assert_eq!(st.state, 'D');
        assert_eq!(st.flags, 4194628);
        assert_ne!(st.flags & PF_EXITING, 0);
        assert_eq!(st.started, 123456);
        assert!(parse_stat("4242 (truncated) R 1").is_none());
    }
}
