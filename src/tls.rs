//! PEM files for TLS, shared by the ThingsBoard uplink (client side) and the local broker's TLS
//! listener (server side): certificate chains, private keys, and the rule that a key file must
//! not be readable by group or others.
//!
//! Keys may be PKCS#8, PKCS#1 or SEC1 PEM; chains are leaf first. The files are read when a TLS
//! configuration is built (at start and on SIGHUP). It must not log or keep key material beyond
//! what it returns, and it builds no rustls configuration itself (`uplink::tls` and
//! `broker::tls` do).

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Permission bits a private key file must not have: readable by group or others.
pub const KEY_FILE_FORBIDDEN_MODE: u32 = 0o044;

/// What the PEM reader names a private key in its errors.
const PRIVATE_KEY: &str = "private key";

/// Why a certificate or key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key file could not be read or holds no PEM item of the kind expected.
    #[error("cannot read {what} from {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The key file may be read by group or others.
    #[error(
        "{} is readable by group or others (mode {mode:04o}); allow only its owner: chmod 600",
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
}

impl Error {
    /// Whether the private key file (rather than the certificate file) is at fault, so a
    /// configuration error can name the right key.
    pub fn is_key(&self) -> bool {
        match self {
            Error::File { what, .. } => *what == PRIVATE_KEY,
            Error::KeyPermissions { .. } => true,
        }
    }
}

/// Reads a certificate chain (`what` names it in errors: "client certificate", "server
/// certificate") and its key, checking the key file's permissions first.
pub fn read_identity(
    cert_file: &Path,
    key_file: &Path,
    what: &'static str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    check_key_permissions(key_file)?;
    let chain = read_certs(cert_file, what)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| Error::File {
        what: PRIVATE_KEY,
        path: key_file.to_path_buf(),
        reason: pem_reason(e),
    })?;
    Ok((chain, key))
}

/// Every certificate in a PEM file; an error when there is none.
pub fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let file_err = |reason: String| Error::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(pem_reason(e)))?;
    if certs.is_empty() {
        return Err(file_err("no PEM CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Refuses a key file readable by group or others (and one that cannot be stat'ed).
pub fn check_key_permissions(path: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::File {
        what: PRIVATE_KEY,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    mode_check(path, &meta)
}

#[cfg(unix)]
fn mode_check(path: &Path, meta: &std::fs::Metadata) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & KEY_FILE_FORBIDDEN_MODE != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn mode_check(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), Error> {
    Ok(())
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM block of that kind".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn key_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not really a key").expect("write");
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let r = check_key_permissions(&key);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.is_key());
            }
        }
        let missing = check_key_permissions(&dir.path().join("missing.pem"));
        assert!(matches!(&missing, Err(e @ Error::File { .. }) if e.is_key()));
    }

    #[test]
    fn a_certificate_file_without_certificates_is_refused_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "nothing here\n").expect("write");
        let e = read_certs(&cert, "server certificate").expect_err("no certificate");
        assert!(!e.is_key());
        assert!(e.to_string().contains("server certificate"), "{e}");
    }
}
