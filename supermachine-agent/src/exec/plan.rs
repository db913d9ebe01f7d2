//! Turning an `ExecRequest` into a checked plan (SEMANTICS.md step 1): everything that can be
//! rejected before anything is written or started is rejected here.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use supermachine_codec::{
    ExecRequest, StagedFile, StdioMode, WindowSize, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use super::spawn::LaunchSpec;
use crate::boot_flags::{BootFlags, PVM_GLIBC_TUNABLES};
use crate::error::{ExecError, Link};
use crate::staging;
use crate::state::Mode;
use crate::user;

/// `PATH` of a guest exec whose request does not set one.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `TERM` of a tty exec whose request does not set one.
pub const DEFAULT_TERM: &str = "xterm-256color";
/// Terminal size when the request gives none.
pub const DEFAULT_SIZE: WindowSize = WindowSize { cols: 80, rows: 24 };

/// A validated exec.
#[derive(Debug)]
pub struct Plan {
    /// `argv`, then every chain link, in order; never empty, no link empty.
    pub links: Vec<Vec<String>>,
    /// Environment, cwd and user, shared by every link.
    pub launch: LaunchSpec,
    /// Run on a pty.
    pub tty: bool,
    /// Initial terminal size (tty mode).
    pub size: WindowSize,
    /// Stdin mode.
    pub stdin: StdioMode,
    /// Stdout mode.
    pub stdout: StdioMode,
    /// Stderr mode (pipes mode only; a pty merges it into stdout).
    pub stderr: StdioMode,
    /// Files to write before the first link, with their checked paths.
    pub files: Vec<(PathBuf, StagedFile)>,
    /// Whether EXIT may carry the terminating signal (protocol version 2 and later; a
    /// version-1 host would refuse the longer frame).
    pub report_signal: bool,
}

fn invalid(message: impl Into<String>) -> ExecError {
    ExecError::InvalidRequest(message.into())
}

/// Validates `request` for an agent running in `mode` with the guest's `flags`.
pub fn plan(request: ExecRequest, mode: Mode, flags: BootFlags) -> Result<Plan, ExecError> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&request.version) {
        return Err(invalid(format!(
            "unsupported protocol version {} (this agent speaks {MIN_PROTOCOL_VERSION} to \
             {PROTOCOL_VERSION})",
            request.version
        )));
    }
    if request
        .argv
        .first()
        .map_or(true, |program| program.is_empty())
    {
        return Err(invalid("argv is empty"));
    }
    if let Some(i) = request
        .chain
        .iter()
        .position(|argv| argv.first().map_or(true, |program| program.is_empty()))
    {
        return Err(invalid(format!("chain[{i}] has an empty argv")));
    }
    let user = match &request.user {
        Some(spec) => Some(user::resolve(spec).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let files = request
        .stage_files
        .into_iter()
        .map(|file| match staging::file_path(file.path()) {
            Ok(path) => Ok((path, file)),
            Err(why) => Err(invalid(format!("staging {}: {why}", file.path()))),
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The base environment: the agent's own in host mode, a small default set in a guest; none
    // at all with `env_clear` (the caller asked for exactly the variables it set).
    let mut env: BTreeMap<OsString, OsString> = match (request.env_clear, mode) {
        (true, _) => BTreeMap::new(),
        (false, Mode::Host) => std::env::vars_os().collect(),
        (false, Mode::Guest) => {
            let home = user
                .as_ref()
                .map(|u| u.home.clone().unwrap_or_else(|| PathBuf::from("/")))
                .unwrap_or_else(user::own_home);
            BTreeMap::from([
                ("PATH".into(), GUEST_PATH.into()),
                ("HOME".into(), home.into_os_string()),
            ])
        }
    };
    // The terminal is the host's, not whatever the agent itself runs on: a tty exec gets our
    // TERM unless the request names one (or asked for an empty environment).
    if request.tty && !request.env_clear && !request.env.contains_key("TERM") {
        env.insert("TERM".into(), DEFAULT_TERM.into());
    }
    // A platform workaround rather than part of the environment the caller chose, so it stays
    // even with `env_clear` (programs would crash on the broken AVX without it); naming it in
    // `env_remove`, or setting it, is how a request opts out.
    if flags.pvm && mode == Mode::Guest {
        env.insert("GLIBC_TUNABLES".into(), PVM_GLIBC_TUNABLES.into());
    }
    for key in &request.env_remove {
        env.remove(&OsString::from(key));
    }
    for (key, value) in request.env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(invalid(format!("invalid environment variable {key:?}")));
        }
        env.insert(key.into(), value.into());
    }

    let mut links = Vec::with_capacity(1 + request.chain.len());
    links.push(request.argv);
    links.extend(request.chain);
    Ok(Plan {
        links,
        launch: LaunchSpec {
            env,
            cwd: request.cwd.map(PathBuf::from),
            user,
        },
        tty: request.tty,
        size: WindowSize {
            cols: request.cols.unwrap_or(DEFAULT_SIZE.cols),
            rows: request.rows.unwrap_or(DEFAULT_SIZE.rows),
        },
        stdin: request.stdin,
        stdout: request.stdout,
        stderr: request.stderr,
        report_signal: request.version >= 2,
        files,
    })
}

/// Checks that the working directory exists right before a link starts, so a missing cwd is
/// reported as such instead of as the ENOENT "program not found" that exec would give.
///
/// Checked per link (not once up front) because staged files and earlier links may create it.
pub fn check_cwd(cwd: Option<&Path>, link: Link) -> Result<(), ExecError> {
    let Some(cwd) = cwd else { return Ok(()) };
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(invalid(format!(
            "{link}cwd {} is not a directory",
            cwd.display()
        ))),
        Err(e) => Err(invalid(format!("{link}cwd {}: {e}", cwd.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(argv: &[&str]) -> ExecRequest {
        ExecRequest::new(argv.iter().copied())
    }

    fn rejection(request: ExecRequest) -> String {
        match plan(request, Mode::Guest, BootFlags::default()) {
            Err(ExecError::InvalidRequest(why)) => why,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(rejection(request(&[])), "argv is empty");
        assert_eq!(rejection(request(&[""])), "argv is empty");
        let mut chain = request(&["true"]);
        chain.chain = vec![vec!["true".into()], vec![]];
        assert_eq!(rejection(chain), "chain[1] has an empty argv");
        let mut version = request(&["true"]);
        version.version = PROTOCOL_VERSION + 1;
        assert!(rejection(version).contains(&format!("version {}", PROTOCOL_VERSION + 1)));
        let mut version = request(&["true"]);
        version.version = 0;
        assert!(rejection(version).contains("version 0"));
        let mut user = request(&["true"]);
        user.user = Some("no-such-user-xyz".into());
        assert!(rejection(user).contains("no-such-user-xyz"));
        let mut env = request(&["true"]);
        env.env.insert("A=B".into(), "x".into());
        assert!(rejection(env).contains("A=B"));
        let mut staged = request(&["true"]);
        staged.stage_files = vec![StagedFile::new("rel/x", "data")];
        assert_eq!(rejection(staged), "staging rel/x: path is not absolute");
    }

    #[test]
    fn guest_environment_defaults_and_merges() {
        let mut req = request(&["env"]);
        req.tty = true;
        req.env.insert("FOO".into(), "bar".into());
        req.env.insert("PATH".into(), "/opt/bin".into());
        req.chain = vec![vec!["true".into()]];
        let plan = plan(req, Mode::Guest, BootFlags::default()).unwrap();
        let env = &plan.launch.env;
        assert_eq!(env.get(&OsString::from("PATH")).unwrap(), "/opt/bin");
        assert_eq!(env.get(&OsString::from("FOO")).unwrap(), "bar");
        assert_eq!(env.get(&OsString::from("TERM")).unwrap(), DEFAULT_TERM);
        assert!(env.contains_key(&OsString::from("HOME")));
        assert_eq!(env.len(), 4, "{env:?}");
        assert_eq!(plan.links.len(), 2);
        assert_eq!(plan.size, DEFAULT_SIZE);
    }

    #[test]
    fn pvm_guests_get_glibc_tunables_unless_the_request_sets_them() {
        let pvm = BootFlags {
            pvm: true,
            ..BootFlags::default()
        };
        let tunables = OsString::from("GLIBC_TUNABLES");
        let default = plan(request(&["env"]), Mode::Guest, pvm).unwrap();
        assert_eq!(
            default.launch.env.get(&tunables).unwrap(),
            PVM_GLIBC_TUNABLES
        );
        let mut own = request(&["env"]);
        own.env
            .insert("GLIBC_TUNABLES".into(), "glibc.malloc.check=3".into());
        let own = plan(own, Mode::Guest, pvm).unwrap();
        assert_eq!(
            own.launch.env.get(&tunables).unwrap(),
            "glibc.malloc.check=3"
        );
        let plain = plan(request(&["env"]), Mode::Guest, BootFlags::default()).unwrap();
        assert!(!plain.launch.env.contains_key(&tunables));
    }

    #[test]
    fn env_clear_and_env_remove_shape_the_base_environment() {
        let pvm = BootFlags {
            pvm: true,
            ..BootFlags::default()
        };
        let key = |k: &str| OsString::from(k);
        let mut cleared = request(&["env"]);
        cleared.tty = true;
        cleared.env_clear = true;
        cleared.env.insert("ONLY".into(), "this".into());
        let env = plan(cleared.clone(), Mode::Guest, BootFlags::default())
            .unwrap()
            .launch
            .env;
        assert_eq!(env, BTreeMap::from([(key("ONLY"), key("this"))]));
        // On PVM the AVX workaround survives env_clear unless removed by name.
        let env = plan(cleared.clone(), Mode::Guest, pvm).unwrap().launch.env;
        assert_eq!(env.len(), 2, "{env:?}");
        assert!(env.contains_key(&key("GLIBC_TUNABLES")));
        cleared.env_remove = vec!["GLIBC_TUNABLES".into()];
        let env = plan(cleared, Mode::Guest, pvm).unwrap().launch.env;
        assert_eq!(env.len(), 1, "{env:?}");

        let mut removed = request(&["env"]);
        removed.env_remove = vec!["HOME".into(), "PATH".into()];
        removed.env.insert("PATH".into(), "/set/wins".into());
        let env = plan(removed, Mode::Guest, BootFlags::default())
            .unwrap()
            .launch
            .env;
        assert!(!env.contains_key(&key("HOME")), "{env:?}");
        assert_eq!(env.get(&key("PATH")).unwrap(), "/set/wins");
    }

    #[test]
    fn missing_cwd_is_reported_as_such() {
        let err = check_cwd(Some(Path::new("/no/such/dir")), Link(0)).unwrap_err();
        assert!(err.to_string().starts_with("cwd /no/such/dir: "), "{err}");
        let err = check_cwd(Some(Path::new("/etc/passwd")), Link(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "chain[0]: cwd /etc/passwd is not a directory"
        );
        assert!(check_cwd(Some(Path::new("/")), Link(0)).is_ok());
    }
}
