//! What a reload changed: the keys whose values differ between two configurations, and which of
//! them the running bridge applies without a restart. Pure.

use super::RawConfig;

/// Keys a reload applies live; every other change needs a restart.
/// The broker's TLS files are re-read (for new connections); `broker.tls_listen` itself needs a
/// restart.
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    "meters",
    "mappings",
    "broker.tls_cert_file",
    "broker.tls_key_file",
    "broker.tls_ca_file",
    "broker.tls_require_client_cert",
    // Re-read by the uplink at every reload, used from its next connection (TLS on or off,
    // `thingsboard.tls` and `port`, needs a restart).
    "thingsboard.ca_file",
    "thingsboard.cert_file",
    "thingsboard.key_file",
];

/// Keys (`thingsboard.host`, `meters`) whose values differ. Secrets are compared by value,
/// though they are never shown.
pub fn changed_keys(old: &RawConfig, new: &RawConfig) -> Vec<String> {
    let (a, b) = match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return vec!["(configuration)".into()],
    };
    let mut out = Vec::new();
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return out;
    };
    let mut sections: Vec<&String> = a.keys().chain(b.keys()).collect();
    sections.sort();
    sections.dedup();
    for s in sections {
        match (a.get(s), b.get(s)) {
            (Some(serde_json::Value::Object(ta)), Some(serde_json::Value::Object(tb))) => {
                let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    if ta.get(k) != tb.get(k) {
                        out.push(format!("{s}.{k}"));
                    }
                }
            }
            (va, vb) => {
                if va != vb {
                    out.push(s.clone());
                }
            }
        }
    }
    // Serialised secrets are masked: compare the values themselves.
    if old.thingsboard.access_token.expose() != new.thingsboard.access_token.expose()
        && !out.iter().any(|k| k == "thingsboard.access_token")
    {
        out.push("thingsboard.access_token".into());
    }
    let pw = |c: &RawConfig| c.broker.password.as_ref().map(|p| p.expose().to_string());
    if pw(old) != pw(new) && !out.iter().any(|k| k == "broker.password") {
        out.push("broker.password".into());
    }
    let mpw = |c: &RawConfig| -> Vec<[Option<String>; 3]> {
        let show = |s: &Option<super::Secret>| s.as_ref().map(|p| p.expose().to_string());
        c.meters
            .iter()
            .map(|m| {
                [
                    show(&m.password),
                    show(&m.authentication_key),
                    show(&m.block_cipher_key),
                ]
            })
            .collect()
    };
    if mpw(old) != mpw(new) && !out.iter().any(|k| k == "meters") {
        out.push("meters".into());
    }
    out.sort();
    out
}

/// Split changed keys into (applied live, needing a restart).
pub fn split_live(changed: &[String]) -> (Vec<String>, Vec<String>) {
    changed
        .iter()
        .cloned()
        .partition(|k| LIVE_KEYS.contains(&k.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, Secret};

    #[test]
    fn nothing_changed_means_nothing_reported() {
        let a = load_str("[thingsboard]\naccess_token = \"x\"\n").expect("parses");
        assert!(changed_keys(&a, &a.clone()).is_empty());
    }

    #[test]
    fn changes_are_named_and_split() {
        let a = load_str("[thingsboard]\naccess_token = \"x\"\n").expect("parses");
        let mut b = a.clone();
        b.log.level = "debug".into();
        b.thingsboard.host = "tb.example.com".into();
        b.thingsboard.access_token = Secret::new("y");
        b.meters.push(crate::config::MeterConfig::default());
        let changed = changed_keys(&a, &b);
        assert_eq!(
            changed,
            [
                "log.level",
                "meters",
                "thingsboard.access_token",
                "thingsboard.host"
            ]
        );
        let (live, restart) = split_live(&changed);
        assert_eq!(live, ["log.level", "meters"]);
        assert_eq!(restart, ["thingsboard.access_token", "thingsboard.host"]);
    }

    #[test]
    fn the_thingsboard_certificate_files_are_live_and_tls_on_off_needs_a_restart() {
        let a = load_str("[thingsboard]\naccess_token = \"x\"\n").expect("parses");
        let mut b = a.clone();
        b.thingsboard.ca_file = Some("/etc/dlms-bridge/ca.pem".into());
        b.thingsboard.cert_file = Some("/etc/dlms-bridge/gw.pem".into());
        b.thingsboard.key_file = Some("/etc/dlms-bridge/gw.key".into());
        b.thingsboard.tls = Some(true);
        let (live, restart) = split_live(&changed_keys(&a, &b));
        assert_eq!(
            live,
            [
                "thingsboard.ca_file",
                "thingsboard.cert_file",
                "thingsboard.key_file"
            ]
        );
        assert_eq!(restart, ["thingsboard.tls"]);
    }

    #[test]
    fn the_broker_tls_files_are_live_and_its_address_needs_a_restart() {
        let a = load_str("[thingsboard]\naccess_token = \"x\"\n").expect("parses");
        let mut b = a.clone();
        b.broker.tls_listen = Some("0.0.0.0:8884".into());
        b.broker.tls_cert_file = Some("/etc/dlms-bridge/broker.crt".into());
        b.broker.tls_key_file = Some("/etc/dlms-bridge/broker.key".into());
        let (live, restart) = split_live(&changed_keys(&a, &b));
        assert_eq!(live, ["broker.tls_cert_file", "broker.tls_key_file"]);
        assert_eq!(restart, ["broker.tls_listen"]);
    }
}
