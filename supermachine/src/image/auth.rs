//! Registry credentials: given explicitly, or looked up in Docker's `config.json`.
//!
//! The lookup reads `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, and uses the
//! `auths` entry of the registry (`"auth"`: base64 `user:password`, or `"username"` +
//! `"password"`, or `"registrytoken"` as a bearer token). Credential helpers (`credsStore`,
//! `credHelpers`) are not run; a registry that only has one of those is pulled anonymously, with a
//! log line saying so.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;

use super::error::ImageError;

/// How to authenticate to a registry.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Credentials {
    /// No credentials (registries that allow anonymous pulls, or hand out anonymous tokens).
    #[default]
    Anonymous,
    /// A user name and password (HTTP basic, or exchanged for a bearer token when the registry
    /// asks for one).
    Basic {
        /// The user name.
        username: String,
        /// The password or access token.
        password: String,
    },
    /// A registry bearer token, sent as is.
    Bearer(String),
}

impl Credentials {
    /// Basic credentials.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    pub(crate) fn to_oci(&self) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The credentials for `registry` in the Docker config file at `path`; `Ok(None)` when the file
/// does not exist or has no usable entry for it.
pub(crate) fn from_docker_config(
    path: &std::path::Path,
    registry: &str,
) -> Result<Option<Credentials>, ImageError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ImageError::Credentials {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
    };
    let bad = |reason: String| ImageError::Credentials {
        path: path.to_owned(),
        reason,
    };
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let wanted = normalize_registry(registry);
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| normalize_registry(key) == wanted)
        .map(|(_, entry)| entry);
    let Some(entry) = entry else {
        if config.cred_helpers.contains_key(registry) || config.creds_store.is_some() {
            tracing::info!(
                registry,
                path = %path.display(),
                "docker credential helpers are not supported; pulling anonymously"
            );
        }
        return Ok(None);
    };
    if let Some(token) = entry.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::Bearer(token.clone())));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("auths.{registry}.auth is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| bad(format!("auths.{registry}.auth is not UTF-8")))?;
        let (user, pass) = decoded.split_once(':').ok_or_else(|| {
            bad(format!(
                "auths.{registry}.auth is not base64(user:password)"
            ))
        })?;
        return Ok(Some(Credentials::basic(user, pass)));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::basic(u, p))),
        _ => Ok(None),
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/` → `host:5000`.
fn normalize_registry(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                    "ghcr.io": {{"registrytoken": "tok"}}
                }}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            from_docker_config(&path, "docker.io").unwrap(),
            Some(Credentials::basic("alice", "s3:cret"))
        );
        assert_eq!(
            from_docker_config(&path, "127.0.0.1:5000").unwrap(),
            Some(Credentials::basic("bob", "pw"))
        );
        assert_eq!(
            from_docker_config(&path, "ghcr.io").unwrap(),
            Some(Credentials::Bearer("tok".into()))
        );
        assert_eq!(from_docker_config(&path, "quay.io").unwrap(), None);
        assert_eq!(
            from_docker_config(&dir.path().join("missing.json"), "x").unwrap(),
            None
        );
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(
            from_docker_config(&path, "x"),
            Err(ImageError::Credentials { .. })
        ));
        assert!(!format!("{:?}", Credentials::basic("u", "secret")).contains("secret"));
    }
}
