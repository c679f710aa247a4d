//! Access rights: with no token configured (only allowed on a loopback listen) everyone is
//! admin; otherwise every request but `/healthz` and `/readyz` needs `token` (read) or
//! `admin_token` (read and admin), as `Authorization: Bearer <t>` or as the password of basic
//! auth (any user name; browsers then prompt for it). Comparisons are constant-time.
//!
//! Without tokens, a browser on the box is the only client, so two browser attacks are closed:
//! DNS rebinding (a foreign name resolving to 127.0.0.1) by accepting only loopback `Host`
//! headers, and cross-site form posts by the API taking only `application/json` bodies.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::config::{HttpConfig, Secret};

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Right {
    /// GET endpoints: health, metrics, status, the page.
    Read,
    /// Also POST/PUT/DELETE on `/api/meters`.
    Admin,
}

/// The configured tokens (secrets never leave this struct except for comparison).
#[derive(Clone, Default)]
pub struct Auth {
    read: Option<Secret>,
    admin: Option<Secret>,
}

impl Auth {
    pub fn from_config(cfg: &HttpConfig) -> Self {
        let keep = |s: &Option<Secret>| s.clone().filter(|s| !s.is_empty());
        Auth {
            read: keep(&cfg.token),
            admin: keep(&cfg.admin_token),
        }
    }

    /// The right the request's credentials grant; `None` when they grant nothing.
    pub fn right(&self, headers: &HeaderMap) -> Option<Right> {
        if self.read.is_none() && self.admin.is_none() {
            return loopback_host(headers).then_some(Right::Admin);
        }
        let given = credential(headers)?;
        let eq = |s: &Option<Secret>| {
            s.as_ref()
                .is_some_and(|s| bool::from(s.expose().as_bytes().ct_eq(given.as_bytes())))
        };
        if eq(&self.admin) {
            Some(Right::Admin)
        } else if eq(&self.read) {
            Some(Right::Read)
        } else {
            None
        }
    }
}

/// Whether the `Host` header names this machine (`localhost`, a loopback IP), with any port.
/// A request without `Host` (HTTP/1.0 tools) comes from a local program, not a browser.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The token from `Bearer <t>`, or the password from `Basic base64(user:password)`.
fn credential(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        return text.split_once(':').map(|(_, p)| p.to_string());
    }
    None
}

fn refuse(status: StatusCode, why: &str) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": why }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"dlms-bridge\", charset=\"UTF-8\""),
        );
    }
    r
}

/// Middleware: at least read rights.
pub async fn require_read(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.right(req.headers()) {
        Some(_) => next.run(req).await,
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "authentication required: Bearer token or basic auth",
        ),
    }
}

/// Middleware: admin rights (401 without valid credentials, 403 with read-only ones).
pub async fn require_admin(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.right(req.headers()) {
        Some(Right::Admin) => next.run(req).await,
        Some(Right::Read) => refuse(
            StatusCode::FORBIDDEN,
            "this token is read-only; meter changes need http.admin_token",
        ),
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "authentication required: Bearer token or basic auth",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().expect("header"));
        h
    }

    #[test]
    fn rights_by_token_and_form() {
        let auth = Auth::from_config(&HttpConfig {
            token: Some(Secret::new("r")),
            admin_token: Some(Secret::new("a")),
            ..HttpConfig::default()
        });
        assert_eq!(auth.right(&HeaderMap::new()), None);
        assert_eq!(auth.right(&headers("Bearer r")), Some(Right::Read));
        assert_eq!(auth.right(&headers("Bearer a")), Some(Right::Admin));
        assert_eq!(auth.right(&headers("Bearer x")), None);
        // "anyone:a" in base64.
        assert_eq!(
            auth.right(&headers("Basic YW55b25lOmE=")),
            Some(Right::Admin)
        );
        assert_eq!(auth.right(&headers("Basic !!!")), None);
        let open = Auth::from_config(&HttpConfig::default());
        assert_eq!(open.right(&HeaderMap::new()), Some(Right::Admin));
        let host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, h.parse().expect("host"));
            m
        };
        for ok in [
            "127.0.0.1:8484",
            "localhost:8484",
            "[::1]:8484",
            "localhost",
        ] {
            assert_eq!(open.right(&host(ok)), Some(Right::Admin), "{ok}");
        }
        // DNS rebinding: a foreign name that resolves to loopback.
        assert_eq!(open.right(&host("evil.example:8484")), None);
    }
}
