//! TLS to ThingsBoard: the rustls client configuration built from `[thingsboard]` (`tls`,
//! `ca_file`, `cert_file`, `key_file`), the key file permission check, and the wording of
//! certificate failures.
//!
//! Trust: with `ca_file` only the CA certificates in that file are trusted (what tb-gateway's
//! `caCert` does); without it, the system roots (`rustls-native-certs`: `/etc/ssl/certs` on
//! Debian, kept current by the `ca-certificates` package and `update-ca-certificates`, where a
//! private CA can be installed too). The server's host name (or IP address) is always checked.
//! X.509 device credentials: `cert_file` (PEM chain, leaf first) and `key_file` (PEM, PKCS#8,
//! PKCS#1 or SEC1) are presented as the client certificate.
//!
//! Crypto: rustls with the `ring` provider (no OpenSSL, no aws-lc C build). Files are read when
//! the configuration is built: at start and on SIGHUP (the session task decides when).
//! It must not: log key material, or accept a key file that group or others may read.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use crate::config::ThingsboardConfig;
use crate::tls::{read_certs, read_identity};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key file is unreadable, empty, or (the key) readable by others.
    #[error(transparent)]
    Files(#[from] crate::tls::Error),
    /// No trusted root certificate at all (no `ca_file`, and no system roots found).
    #[error("no trusted CA certificates: install ca-certificates or set thingsboard.ca_file")]
    NoRoots,
    /// rustls refused the material (a key that does not match the certificate, say).
    #[error("invalid TLS material: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the TLS configuration is built from; sent to the uplink again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// TLS on (resolved: `tls`, or port 8883 when unset).
    pub enabled: bool,
    /// Trust only the CAs in this PEM file instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for X.509 device credentials.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
}

impl TlsSettings {
    pub fn from_config(cfg: &ThingsboardConfig) -> TlsSettings {
        TlsSettings {
            enabled: cfg.tls_enabled(),
            ca_file: cfg.ca_file.clone(),
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
        }
    }
}

/// Builds the rustls client configuration: reads every file named (and the system roots when
/// there is no `ca_file`). `Ok(None)` when TLS is off.
pub fn client_config(s: &TlsSettings) -> Result<Option<Arc<ClientConfig>>, Error> {
    if !s.enabled {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &s.ca_file {
        Some(path) => {
            for cert in read_certs(path, "CA certificates")? {
                roots.add(cert).map_err(|e| crate::tls::Error::File {
                    what: "CA certificates",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            // Unreadable entries in the system store are skipped, as browsers do.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    if roots.is_empty() {
        return Err(Error::NoRoots);
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&s.cert_file, &s.key_file) {
        (Some(cert), Some(key)) => {
            let (chain, key) = read_identity(cert, key, "client certificate")?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// A TLS failure found anywhere in an error's chain (rumqttc wraps rustls errors in
/// `io::Error`, whose `source()` skips the wrapped error itself, hence `get_ref`).
pub fn rustls_cause<'a>(
    mut err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    loop {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
            err = inner;
            continue;
        }
        err = err.source()?;
    }
}

/// One operator-facing sentence for a TLS failure: what is wrong with whose certificate.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    match e {
        rustls::Error::InvalidCertificate(c) => {
            let why = match c {
                C::Expired | C::ExpiredContext { .. } => "has expired".to_owned(),
                C::NotValidYet | C::NotValidYetContext { .. } => {
                    "is not valid yet (check the clock)".to_owned()
                }
                C::UnknownIssuer => "is not signed by a trusted CA (untrusted; set \
                                     thingsboard.ca_file to the CA that issued it)"
                    .to_owned(),
                C::NotValidForName => "is not valid for this host name (wrong host)".to_owned(),
                C::NotValidForNameContext {
                    expected,
                    presented,
                } => format!(
                    "is not valid for {expected:?} (wrong host; it names {})",
                    presented.join(", ")
                ),
                C::Revoked => "is revoked".to_owned(),
                C::BadSignature => "has a bad signature".to_owned(),
                other => format!("is invalid ({other:?})"),
            };
            format!("ThingsBoard's TLS certificate {why}")
        }
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::AccessDenied
            | A::UnsupportedCertificate),
        ) => format!(
            "ThingsBoard refused our client certificate (TLS alert {a:?}); check \
             thingsboard.cert_file/key_file and the device's X.509 credentials"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_failures_read_as_one_sentence() {
        use rustls::CertificateError as C;
        let text = |c| describe(&rustls::Error::InvalidCertificate(c));
        assert!(text(C::Expired).contains("expired"));
        assert!(text(C::UnknownIssuer).contains("untrusted"));
        assert!(text(C::NotValidForName).contains("wrong host"));
        let alert = describe(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(alert.contains("refused our client certificate"));
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let found = rustls_cause(&io).expect("found through io::Error::get_ref");
        assert!(matches!(found, rustls::Error::InvalidCertificate(_)));
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(rustls_cause(&plain).is_none());
    }
}
