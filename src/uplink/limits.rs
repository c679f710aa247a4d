//! ThingsBoard's session limits (spec §1.6, §3.2) and the client-side rate limiter that keeps
//! the session under them: ThingsBoard closes the whole gateway session when a rate limit
//! trips, so the uplink must never reach one.
//!
//! - `getSessionLimits` is asked after every connect (client-side RPC on
//!   `v1/devices/me/rpc/request/{n}`); the answer gives `maxPayloadSize`, `maxInflightMessages`
//!   and rate limits as `capacity:seconds[,..]` strings. Older ThingsBoard never answers: the
//!   configured caps apply alone.
//! - The limiter is a set of windows per counted quantity (messages, telemetry data points),
//!   each holding at most 80 % of ThingsBoard's capacity (what its SDK does), the configured
//!   caps as given. A publish goes out only when every window has room; otherwise it waits in
//!   the pending queue and its rows stay durable in the store.
//!
//! Pure: the caller passes the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::{ConfigError, GatewayConfig};

/// Share of ThingsBoard's reported capacity we use (its SDK keeps 80 %).
pub const TB_LIMIT_SHARE_PERCENT: u64 = 80;

/// Method of the session limits request.
pub const SESSION_LIMITS_METHOD: &str = "getSessionLimits";

/// How long data waits for the answer after a connect (the SDK's 5 s); older ThingsBoard never
/// answers.
pub const SESSION_LIMITS_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers to our own client-side RPCs (`getSessionLimits`).
pub const TOPIC_ME_RPC_RESPONSE_FILTER: &str = "v1/devices/me/rpc/response/+";

/// One `capacity:seconds` window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub capacity: u64,
    pub period: Duration,
}

/// Parse ThingsBoard's `capacity:seconds[,capacity:seconds..]`; empty → no windows.
pub fn parse_rate_limit(s: &str) -> Result<Vec<Window>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (c, p) = part
            .split_once(':')
            .ok_or_else(|| format!("`{part}` is not capacity:seconds"))?;
        let capacity: u64 = c
            .trim()
            .parse()
            .map_err(|_| format!("`{c}` in `{part}` is not a whole number"))?;
        let secs: u64 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{p}` in `{part}` is not a whole number of seconds"))?;
        if capacity == 0 || secs == 0 {
            return Err(format!("`{part}`: capacity and seconds must be above 0"));
        }
        out.push(Window {
            capacity,
            period: Duration::from_secs(secs),
        });
    }
    Ok(out)
}

/// Configuration checks for `[gateway]`.
pub fn validate_gateway(g: &GatewayConfig) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    if !g.stats_interval.is_zero() && g.stats_interval < Duration::from_secs(1) {
        errs.push(ConfigError::new(
            "gateway.stats_interval",
            "must be 0 (off) or at least 1s",
        ));
    }
    if g.rpc_timeout < Duration::from_millis(100) || g.rpc_timeout > Duration::from_secs(60) {
        errs.push(ConfigError::new(
            "gateway.rpc_timeout",
            "must be between 100ms and 60s (ThingsBoard waits 10s by default)",
        ));
    }
    for (key, v) in [
        ("gateway.messages_rate_limit", &g.messages_rate_limit),
        ("gateway.data_points_rate_limit", &g.data_points_rate_limit),
    ] {
        if let Err(e) = parse_rate_limit(v) {
            errs.push(ConfigError::new(key, e));
        }
    }
    errs
}

/// What `getSessionLimits` answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionLimits {
    pub max_payload_size: Option<usize>,
    pub max_inflight: Option<u16>,
    /// Sub-device traffic through the gateway (`gatewayRateLimits`).
    pub messages: Vec<Window>,
    pub telemetry_messages: Vec<Window>,
    pub data_points: Vec<Window>,
}

/// Parse a `getSessionLimits` answer; `None` if it is not one.
pub fn parse_session_limits(payload: &[u8]) -> Option<SessionLimits> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let obj = v.as_object()?;
    if !obj.contains_key("maxPayloadSize") && !obj.contains_key("gatewayRateLimits") {
        return None;
    }
    let windows = |section: &str, key: &str| -> Vec<Window> {
        obj.get(section)
            .and_then(|s| s.get(key))
            .and_then(Value::as_str)
            .and_then(|s| parse_rate_limit(s).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|w| Window {
                capacity: (w.capacity * TB_LIMIT_SHARE_PERCENT / 100).max(1),
                period: w.period,
            })
            .collect()
    };
    // Sub-device data is limited by `gatewayRateLimits`; the gateway's own messages (stats,
    // RPC replies to it) by `rateLimits`: we count everything against the stricter union.
    let mut messages = windows("gatewayRateLimits", "messages");
    messages.extend(windows("rateLimits", "messages"));
    let mut telemetry_messages = windows("gatewayRateLimits", "telemetryMessages");
    telemetry_messages.extend(windows("rateLimits", "telemetryMessages"));
    let mut data_points = windows("gatewayRateLimits", "telemetryDataPoints");
    data_points.extend(windows("rateLimits", "telemetryDataPoints"));
    Some(SessionLimits {
        max_payload_size: obj
            .get("maxPayloadSize")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok()),
        max_inflight: obj
            .get("maxInflightMessages")
            .and_then(Value::as_u64)
            .map(|n| {
                u16::try_from(n * TB_LIMIT_SHARE_PERCENT / 100)
                    .unwrap_or(u16::MAX)
                    .max(1)
            }),
        messages,
        telemetry_messages,
        data_points,
    })
}

/// A sliding-window counter: at most `capacity` units within any `period`.
#[derive(Debug, Clone)]
struct Slide {
    w: Window,
    /// (when, units) of what was let through within the last period.
    log: VecDeque<(Instant, u64)>,
    used: u64,
}

impl Slide {
    fn new(w: Window) -> Slide {
        Slide {
            w,
            log: VecDeque::new(),
            used: 0,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, n)) = self.log.front() {
            if now.saturating_duration_since(at) >= self.w.period {
                self.log.pop_front();
                self.used -= n;
            } else {
                break;
            }
        }
    }

    /// When `units` more fit (`now` if they fit now).
    fn ready_at(&mut self, now: Instant, units: u64) -> Instant {
        self.expire(now);
        // A single publish larger than the whole capacity waits for an empty window.
        let units = units.min(self.w.capacity);
        if self.used + units <= self.w.capacity {
            return now;
        }
        let mut freed = self.used + units - self.w.capacity;
        for &(at, n) in &self.log {
            if n >= freed {
                return at + self.w.period;
            }
            freed -= n;
        }
        now + self.w.period
    }

    fn take(&mut self, now: Instant, units: u64) {
        self.used += units;
        self.log.push_back((now, units));
    }
}

/// The limiter over messages and data points; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    messages: Vec<Slide>,
    telemetry_messages: Vec<Slide>,
    data_points: Vec<Slide>,
}

impl RateLimiter {
    /// Limits from configured caps and (when known) ThingsBoard's session limits.
    pub fn new(
        cfg_messages: &[Window],
        cfg_points: &[Window],
        tb: Option<&SessionLimits>,
    ) -> RateLimiter {
        let mk = |a: &[Window], b: &[Window]| -> Vec<Slide> {
            a.iter().chain(b).copied().map(Slide::new).collect()
        };
        let empty = SessionLimits::default();
        let tb = tb.unwrap_or(&empty);
        RateLimiter {
            messages: mk(cfg_messages, &tb.messages),
            telemetry_messages: mk(&[], &tb.telemetry_messages),
            data_points: mk(cfg_points, &tb.data_points),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.messages.is_empty()
            && self.telemetry_messages.is_empty()
            && self.data_points.is_empty()
    }

    /// When a publish carrying `points` telemetry data points (0 for other topics) may go.
    pub fn ready_at(&mut self, now: Instant, telemetry: bool, points: u64) -> Instant {
        let mut at = now;
        for s in &mut self.messages {
            at = at.max(s.ready_at(now, 1));
        }
        if telemetry {
            for s in &mut self.telemetry_messages {
                at = at.max(s.ready_at(now, 1));
            }
            for s in &mut self.data_points {
                at = at.max(s.ready_at(now, points));
            }
        }
        at
    }

    /// Count a publish that went out.
    pub fn take(&mut self, now: Instant, telemetry: bool, points: u64) {
        for s in &mut self.messages {
            s.take(now, 1);
        }
        if telemetry {
            for s in &mut self.telemetry_messages {
                s.take(now, 1);
            }
            for s in &mut self.data_points {
                s.take(now, points);
            }
        }
    }
}

/// Data points in a telemetry payload `{"dev":[{"ts","values":{..}}|{..},..]}`.
pub fn data_points(payload: &[u8]) -> u64 {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) else {
        return 0;
    };
    m.values()
        .filter_map(Value::as_array)
        .flatten()
        .map(|e| match e.get("values").and_then(Value::as_object) {
            Some(v) if e.get("ts").is_some() => v.len() as u64,
            _ => e.as_object().map_or(0, |o| o.len() as u64),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_strings_parse_like_thingsboard() {
        assert_eq!(
            parse_rate_limit("20:1,600:60").unwrap(),
            vec![
                Window {
                    capacity: 20,
                    period: Duration::from_secs(1)
                },
                Window {
                    capacity: 600,
                    period: Duration::from_secs(60)
                }
            ]
        );
        assert!(parse_rate_limit("").unwrap().is_empty());
        assert!(parse_rate_limit("20").is_err());
        assert!(parse_rate_limit("0:1").is_err());
        assert!(parse_rate_limit("a:b").is_err());
    }

    #[test]
    fn session_limits_answer_parses_at_80_percent() {
        let p = br#"{"maxPayloadSize":65536,"maxInflightMessages":100,
            "rateLimits":{"messages":"100:1","telemetryMessages":null,"telemetryDataPoints":null},
            "gatewayRateLimits":{"messages":"10:1,300:60","telemetryMessages":"10:1","telemetryDataPoints":"50:1"}}"#;
        let l = parse_session_limits(p).unwrap();
        assert_eq!(l.max_payload_size, Some(65536));
        assert_eq!(l.max_inflight, Some(80));
        assert_eq!(l.messages.len(), 3);
        assert_eq!(l.messages[0].capacity, 8);
        assert_eq!(l.data_points[0].capacity, 40);
        assert!(parse_session_limits(br#"{"success":true}"#).is_none());
    }

    #[test]
    fn the_limiter_holds_publishes_until_the_window_has_room() {
        let t0 = Instant::now();
        let w = parse_rate_limit("3:1").unwrap();
        let mut l = RateLimiter::new(&w, &[], None);
        for _ in 0..3 {
            assert_eq!(l.ready_at(t0, false, 0), t0);
            l.take(t0, false, 0);
        }
        assert_eq!(l.ready_at(t0, false, 0), t0 + Duration::from_secs(1));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.ready_at(t1, false, 0), t1);
        // Data points: a publish of 30 points against 50:1 then one of 30 more waits.
        let p = parse_rate_limit("50:1").unwrap();
        let mut l = RateLimiter::new(&[], &p, None);
        l.take(t0, true, 30);
        assert_eq!(l.ready_at(t0, true, 30), t0 + Duration::from_secs(1));
        assert_eq!(
            l.ready_at(t0, false, 0),
            t0,
            "non-telemetry is not held by points"
        );
    }

    #[test]
    fn data_points_are_counted_per_key() {
        let p = br#"{"M":[{"ts":1,"values":{"a":1,"b":2}},{"c":3}]}"#;
        assert_eq!(data_points(p), 3);
        assert_eq!(data_points(b"nope"), 0);
    }
}
