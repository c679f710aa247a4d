//! Test certificates made with rcgen: a CA, the leaves it signs, PEM files with the key modes
//! the bridge demands. Used by the TLS tests of the uplink and of the broker's TLS listener.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A CA and what it signs, as PEM.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("self-signed CA");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// `(certificate PEM, key PEM)` for `names` (DNS names or IP addresses), a client or a
    /// server certificate, valid now unless `expired`.
    pub fn issue(&self, names: &[&str], client: bool, expired: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(names).expect("leaf params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "leaf".to_owned());
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// A rustls root store holding this CA alone.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("CA in store");
        roots
    }
}

/// Writes a PEM file with mode 0600 (the bridge refuses keys others may read).
pub fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write PEM");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}
