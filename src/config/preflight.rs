//! What `run` needs beyond a well-formed configuration: a ThingsBoard access token, and every
//! file the configuration names readable (the queue's directory writable) by the user the
//! process runs as. `check-config --as-user` first becomes the service user
//! ([`switch_user`]), so the answer is the service's, not root's. Reads and probes files; never
//! writes or creates any.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

use super::{validate, Config, ConfigError, RawConfig};

/// The system user the packaged unit runs as (`User=` in dlms-bridge.service).
pub const SERVICE_USER: &str = "dlms-bridge";

/// Why [`switch_user`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such user in the passwd database.
    #[error("no user named {0}")]
    NoSuchUser(String),
    /// Only root can take another user's identity.
    #[error("checking as user {0} needs root (run: sudo dlms-bridge check-config --as-user {0})")]
    NotRoot(String),
    /// A set*id call failed.
    #[error("cannot become user {user}")]
    Switch {
        user: String,
        #[source]
        source: nix::Error,
    },
}

/// Become `name` (its uid, primary group and supplementary groups) for the rest of the
/// process. Staying the same user is always allowed.
pub fn switch_user(name: &str) -> Result<(), Error> {
    use nix::unistd::{getuid, initgroups, setgid, setuid, User};
    let user = User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| Error::NoSuchUser(name.to_string()))?;
    if user.uid == getuid() {
        return Ok(());
    }
    if !getuid().is_root() {
        return Err(Error::NotRoot(name.to_string()));
    }
    let switch = |source| Error::Switch {
        user: name.to_string(),
        source,
    };
    let cname = std::ffi::CString::new(name).map_err(|_| Error::NoSuchUser(name.to_string()))?;
    initgroups(&cname, user.gid).map_err(switch)?;
    setgid(user.gid).map_err(switch)?;
    setuid(user.uid).map_err(switch)?;
    Ok(())
}

/// The name of the user this process runs as (for messages).
pub fn current_user() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

/// Load, validate and preflight `path` (default [`super::DEFAULT_CONFIG_PATH`]): what `run`,
/// `check-config` and a reload use. Every problem of the three stages comes back at once in
/// [`super::Error::Invalid`]; a key that failed to parse is not reported again by the later
/// stages (they see its default).
pub fn load_and_check(path: Option<&Path>) -> Result<(RawConfig, Config), super::Error> {
    let (raw, mut errs) = super::load_collecting(path)?;
    let bad: Vec<String> = errs.iter().map(|e| e.key.clone()).collect();
    let unseen = |e: &ConfigError| {
        !bad.iter().any(|b| {
            e.key == *b
                || e.key.starts_with(&format!("{b}."))
                || e.key.starts_with(&format!("{b}["))
        })
    };
    let kept = raw.clone();
    errs.extend(preflight(&raw).into_iter().filter(|e| unseen(e)));
    match validate(raw) {
        Ok(cfg) if errs.is_empty() => Ok((kept, cfg)),
        Ok(_) => Err(super::Error::Invalid(errs)),
        Err(v) => {
            errs.extend(v.into_iter().filter(|e| unseen(e)));
            Err(super::Error::Invalid(errs))
        }
    }
}

/// Everything `run` needs that validation does not look at; every problem, each with its key.
pub fn preflight(raw: &RawConfig) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let user = current_user();
    if raw.thingsboard.access_token.is_empty() && !raw.simulator.demo {
        errs.push(ConfigError::new(
            "thingsboard.access_token",
            "is empty: set the access token of the ThingsBoard gateway device (or \
             DLMS_BRIDGE_THINGSBOARD__ACCESS_TOKEN); only the simulator demo \
             ([simulator] demo = true) runs without one",
        ));
    }
    for (i, m) in raw.meters.iter().enumerate() {
        if let Some(db) = &m.database {
            if let Err(why) = readable(db) {
                errs.push(ConfigError::new(
                    format!("meters[{i}].database"),
                    format!("{}: {why} (as user {user})", db.display()),
                ));
            }
        }
    }
    for (i, m) in raw.mappings.iter().enumerate() {
        if let Some(f) = &m.tb_gateway_file {
            if let Err(why) = readable(f) {
                errs.push(ConfigError::new(
                    format!("mappings[{i}].tb_gateway_file"),
                    format!("{}: {why} (as user {user})", f.display()),
                ));
            }
        }
    }
    if let Err(why) = store_writable(&raw.store.path) {
        errs.push(ConfigError::new(
            "store.path",
            format!("{}: {why} (as user {user})", raw.store.path.display()),
        ));
    }
    errs
}

/// Open for reading, as the service will.
pub fn readable(p: &Path) -> Result<(), String> {
    match File::open(p) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_dir() => Err("is a directory, not a file".into()),
            _ => Ok(()),
        },
        Err(e) => Err(plain_io(&e)),
    }
}

/// The queue file (when it exists) opens read-write, and its directory (or the nearest existing
/// parent, since the store creates missing directories) is writable for the WAL files.
fn store_writable(p: &Path) -> Result<(), String> {
    if p.exists() {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| plain_io(&e))?;
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut probe = dir.as_path();
    while !probe.exists() {
        match probe.parent() {
            Some(up) if !up.as_os_str().is_empty() => probe = up,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    if !probe.is_dir() {
        return Err(format!("{} is not a directory", probe.display()));
    }
    access(probe, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        format!(
            "directory {} is not writable ({})",
            probe.display(),
            plain_io(&io::Error::from(e))
        )
    })
}

fn plain_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "does not exist".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token() -> RawConfig {
        let mut raw = RawConfig::default();
        raw.thingsboard.access_token = super::super::Secret::new("t");
        raw
    }

    #[test]
    fn empty_token_is_an_error_unless_demo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut raw = RawConfig::default();
        raw.store.path = dir.path().join("q.db");
        let errs = preflight(&raw);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "thingsboard.access_token");
        raw.simulator.demo = true;
        raw.simulator.meters = 1;
        assert!(preflight(&raw).is_empty());
    }

    #[test]
    fn missing_files_are_named_by_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut raw = with_token();
        raw.store.path = dir.path().join("sub/dir/q.db");
        raw.mappings.push(crate::config::MappingConfig {
            tb_gateway_file: Some(dir.path().join("gone.json")),
            ..Default::default()
        });
        raw.meters.push(crate::config::MeterConfig {
            database: Some(dir.path().join("admin.db")),
            ..Default::default()
        });
        let errs = preflight(&raw);
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["meters[0].database", "mappings[0].tb_gateway_file"],
            "{errs:?}"
        );
        assert!(errs[1].message.contains("does not exist"), "{errs:?}");
    }
}
