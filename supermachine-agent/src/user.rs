//! Resolving an exec's `user` (OCI `User` syntax) to numeric ids.
//!
//! Accepted forms: `name`, `uid`, `name:group`, `uid:gid`, `name:gid`, `uid:group`. Names are
//! looked up in the guest's `/etc/passwd` and `/etc/group`. A numeric uid without a passwd
//! entry is fine (primary gid 0, as container runtimes do); a name that does not resolve is not.

use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

/// A user or group as written: a number or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    /// Numeric id.
    Num(u32),
    /// Name to look up.
    Name(String),
}

/// The parsed (not yet resolved) form of a user spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// The user part.
    pub user: Id,
    /// The group part, if given.
    pub group: Option<Id>,
}

/// A user the exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory, when the user has a passwd entry.
    pub home: Option<PathBuf>,
}

/// Why a user spec is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// Empty spec or empty part.
    #[error("invalid user {0:?}: expected name, uid, name:group or uid:gid")]
    Malformed(String),
    /// No passwd entry for a user name.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// No group entry for a group name.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// The passwd/group lookup itself failed.
    #[error("looking up {what}: {errno}")]
    Lookup {
        /// What was being looked up.
        what: String,
        /// The error.
        errno: nix::errno::Errno,
    },
}

impl Id {
    fn parse(part: &str) -> Option<Id> {
        if part.is_empty() {
            return None;
        }
        Some(match part.parse::<u32>() {
            Ok(n) => Id::Num(n),
            Err(_) => Id::Name(part.to_owned()),
        })
    }
}

/// Parses a user spec without looking anything up.
pub fn parse(spec: &str) -> Result<UserSpec, UserError> {
    let malformed = || UserError::Malformed(spec.to_owned());
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    Ok(UserSpec {
        user: Id::parse(user).ok_or_else(malformed)?,
        group: match group {
            Some(group) => Some(Id::parse(group).ok_or_else(malformed)?),
            None => None,
        },
    })
}

/// Parses and resolves a user spec against the guest's user database.
pub fn resolve(spec: &str) -> Result<ResolvedUser, UserError> {
    let spec = parse(spec)?;
    let (uid, mut gid, home) = match spec.user {
        Id::Num(uid) => match lookup_uid(uid)? {
            Some(user) => (uid, user.gid.as_raw(), Some(user.dir)),
            None => (uid, 0, None),
        },
        Id::Name(name) => match User::from_name(&name) {
            Ok(Some(user)) => (user.uid.as_raw(), user.gid.as_raw(), Some(user.dir)),
            Ok(None) => return Err(UserError::UnknownUser(name)),
            Err(errno) => {
                return Err(UserError::Lookup {
                    what: format!("user {name:?}"),
                    errno,
                })
            }
        },
    };
    match spec.group {
        None => {}
        Some(Id::Num(n)) => gid = n,
        Some(Id::Name(name)) => match Group::from_name(&name) {
            Ok(Some(group)) => gid = group.gid.as_raw(),
            Ok(None) => return Err(UserError::UnknownGroup(name)),
            Err(errno) => {
                return Err(UserError::Lookup {
                    what: format!("group {name:?}"),
                    errno,
                })
            }
        },
    }
    Ok(ResolvedUser { uid, gid, home })
}

fn lookup_uid(uid: u32) -> Result<Option<User>, UserError> {
    User::from_uid(Uid::from_raw(uid)).map_err(|errno| UserError::Lookup {
        what: format!("uid {uid}"),
        errno,
    })
}

/// The home directory of the user the agent itself runs as (for `HOME` in guest mode).
pub fn own_home() -> PathBuf {
    match User::from_uid(Uid::current()) {
        Ok(Some(user)) => user.dir,
        _ if Uid::current().is_root() => PathBuf::from("/root"),
        _ => PathBuf::from("/"),
    }
}

/// The ids as nix types, for `fchown`.
pub fn ids(user: &ResolvedUser) -> (Uid, Gid) {
    (Uid::from_raw(user.uid), Gid::from_raw(user.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Id {
        Id::Name(s.to_owned())
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            parse("1000").unwrap(),
            UserSpec {
                user: Id::Num(1000),
                group: None
            }
        );
        assert_eq!(
            parse("1000:50").unwrap(),
            UserSpec {
                user: Id::Num(1000),
                group: Some(Id::Num(50))
            }
        );
        assert_eq!(
            parse("nobody").unwrap(),
            UserSpec {
                user: name("nobody"),
                group: None
            }
        );
        assert_eq!(
            parse("app:staff").unwrap(),
            UserSpec {
                user: name("app"),
                group: Some(name("staff"))
            }
        );
        assert_eq!(
            parse("0:wheel").unwrap(),
            UserSpec {
                user: Id::Num(0),
                group: Some(name("wheel"))
            }
        );
    }

    #[test]
    fn rejects_empty_parts() {
        for bad in ["", ":", "1000:", ":50"] {
            assert_eq!(
                parse(bad),
                Err(UserError::Malformed(bad.to_owned())),
                "{bad:?}"
            );
        }
        // Too large for a uid: treated as a name, which then does not resolve.
        assert!(matches!(
            resolve("99999999999"),
            Err(UserError::UnknownUser(_))
        ));
    }

    #[test]
    fn resolves_against_the_user_database() {
        let root = resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.home.as_deref(), Some(std::path::Path::new("/root")));
        assert_eq!(resolve("0").unwrap(), root);
        // A uid without a passwd entry is allowed, with gid 0.
        let anon = resolve("54321").unwrap();
        assert_eq!((anon.uid, anon.gid, anon.home), (54321, 0, None));
        assert_eq!(resolve("54321:7").unwrap().gid, 7);
        assert_eq!(resolve("root:0").unwrap().gid, 0);
        assert_eq!(
            resolve("no-such-user-xyz"),
            Err(UserError::UnknownUser("no-such-user-xyz".into()))
        );
        assert_eq!(
            resolve("root:no-such-group-xyz"),
            Err(UserError::UnknownGroup("no-such-group-xyz".into()))
        );
    }
}
