//! The broker's optional TLS listener: its rustls server configuration (built from
//! `[broker] tls_cert_file`, `tls_key_file`, `tls_ca_file`, `tls_require_client_cert`), the
//! acceptor that SIGHUP swaps, and the rate-limited report of failed handshakes.
//!
//! Once a handshake is done, a TLS connection is served exactly as a plain one (`conn.rs`).
//! Mutual TLS follows Mosquitto's `cafile` + `require_certificate`: with a CA file, a client
//! certificate is verified against it when presented, and must be presented when required.
//! It must not: log key material, or let one client's failed handshake affect another.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config::BrokerConfig;
use crate::tls::{read_certs, read_identity};

/// At most one WARN per this period about failed TLS handshakes (the rest go to DEBUG).
const HANDSHAKE_WARN_EVERY: Duration = Duration::from_secs(60);

/// Why the TLS listener's configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key file is unreadable, empty, or (the key) readable by others.
    #[error(transparent)]
    Files(#[from] crate::tls::Error),
    /// rustls refused the material (a key that does not match the certificate, say).
    #[error("invalid TLS material: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA file holds nothing usable to verify client certificates with.
    #[error("cannot verify client certificates with {}: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
}

impl Error {
    /// The `[broker]` key to name in a configuration error.
    pub fn config_key(&self) -> &'static str {
        match self {
            Error::Files(e) if e.is_key() => "broker.tls_key_file",
            Error::Files(crate::tls::Error::File {
                what: "client CA certificates",
                ..
            })
            | Error::ClientCa { .. } => "broker.tls_ca_file",
            Error::Files(_) => "broker.tls_cert_file",
            // Certificate and key were each readable: most often they do not belong together.
            Error::Rustls(_) => "broker.tls_key_file",
        }
    }
}

/// What the TLS listener's configuration is built from; given again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM, leaf first).
    pub cert_file: PathBuf,
    /// Its private key (PEM); must not be readable by group or others.
    pub key_file: PathBuf,
    /// Verify client certificates against the CAs in this PEM file.
    pub ca_file: Option<PathBuf>,
    /// Refuse clients that present no certificate (needs `ca_file`).
    pub require_client_cert: bool,
}

impl TlsSettings {
    /// The settings of `[broker]`, `None` when the TLS listener is off (no `tls_listen`) or its
    /// files are not configured (validation refuses that).
    pub fn from_config(cfg: &BrokerConfig) -> Option<TlsSettings> {
        cfg.tls_listen.as_ref()?;
        Some(TlsSettings {
            cert_file: cfg.tls_cert_file.clone()?,
            key_file: cfg.tls_key_file.clone()?,
            ca_file: cfg.tls_ca_file.clone(),
            require_client_cert: cfg.tls_require_client_cert,
        })
    }
}

/// Reads every file named in `s` and builds the server configuration (ring provider, TLS 1.2
/// and 1.3).
pub fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = read_identity(&s.cert_file, &s.key_file, "server certificate")?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &s.ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path, "client CA certificates")? {
                roots.add(cert).map_err(|e| Error::ClientCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if s.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| Error::ClientCa {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// The running TLS listener's acceptor (replaced on reload) and its failed-handshake report.
pub(crate) struct TlsState {
    /// Cloned for each new connection; a reload swaps it, connections already up keep theirs.
    acceptor: RwLock<TlsAcceptor>,
    /// What the acceptor was last built from (for the reload log).
    settings: Mutex<TlsSettings>,
    /// Failed handshakes not yet reported at WARN, and when the next WARN may be logged.
    failures: Mutex<(u64, Instant)>,
}

impl TlsState {
    pub(crate) fn new(settings: TlsSettings) -> Result<TlsState, Error> {
        let config = server_config(&settings)?;
        Ok(TlsState {
            acceptor: RwLock::new(TlsAcceptor::from(config)),
            settings: Mutex::new(settings),
            failures: Mutex::new((0, Instant::now())),
        })
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().clone()
    }

    /// Re-read the files; on failure the old configuration stays.
    pub(crate) fn reload(&self, settings: TlsSettings) -> Result<(), Error> {
        let config = server_config(&settings)?;
        *self.acceptor.write() = TlsAcceptor::from(config);
        *self.settings.lock() = settings;
        Ok(())
    }

    pub(crate) fn settings(&self) -> TlsSettings {
        self.settings.lock().clone()
    }

    /// One WARN per [`HANDSHAKE_WARN_EVERY`] at most (with the count since the last one); DEBUG
    /// for every failure. Scanners and misconfigured clients must not flood the log.
    pub(crate) fn handshake_failed(&self, peer: std::net::SocketAddr, why: &str) {
        debug!(%peer, error = %why, "TLS handshake failed; connection closed.");
        let now = Instant::now();
        let mut f = self.failures.lock();
        f.0 += 1;
        if now >= f.1 {
            let failed = std::mem::take(&mut f.0);
            f.1 = now + HANDSHAKE_WARN_EVERY;
            drop(f);
            warn!(
                %peer,
                error = %why,
                failed,
                "TLS handshake with a local client failed (at most one such warning a minute; \
                 the others at DEBUG)."
            );
        }
    }
}
