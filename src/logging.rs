//! Where log lines go and what they look like. Under systemd (`JOURNAL_STREAM` naming our
//! stdout or stderr) events go natively to journald through `tracing-journald`: a priority per
//! level (so `journalctl -p warning` finds warnings and errors) and every field (`meter`,
//! `device`, `client`, `error`, ...) as a journal field (`METER=...`). Otherwise lines go to
//! stdout as text or JSON (`[log] format`), coloured only on a terminal and never with
//! `NO_COLOR` set. Sets up the subscriber; does not decide what is logged.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// `[log] format`: how lines are written when not logging to journald.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message`, fields).
    Json,
}

/// Where events go, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The native journald protocol (priorities and fields).
    Journald,
    /// stdout, as text (`ansi`: with colours) or JSON.
    Stdout { format: LogFormat, ansi: bool },
}

/// Changes the filter of the installed subscriber (SIGHUP).
pub type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// rumqttd logs routine events (a client closing, our readiness probe) at ERROR; it stays quiet
/// unless the filter names it.
pub fn filter_for(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    if level.contains("rumqttd") {
        EnvFilter::try_new(level)
    } else {
        EnvFilter::try_new(format!("{level},rumqttd=off"))
    }
}

/// Journal priorities: ERROR err(3), WARN warning(4), INFO info(6), DEBUG and TRACE debug(7),
/// as syslog has them (tracing-journald's own default puts INFO at notice).
pub fn priority_mappings() -> PriorityMappings {
    PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// `JOURNAL_STREAM` is `<device>:<inode>` of the stream systemd connected to our stdout or
/// stderr; it only counts when one of them still is that stream (systemd.exec(5)): a child
/// whose output was redirected inherits the variable but not the stream.
pub fn journal_stream_matches(value: &str, streams: &[(u64, u64)]) -> bool {
    let Some((dev, ino)) = value.trim().split_once(':') else {
        return false;
    };
    match (dev.parse::<u64>(), ino.parse::<u64>()) {
        (Ok(d), Ok(i)) => streams.contains(&(d, i)),
        _ => false,
    }
}

/// Device and inode of stdout and stderr (those that are open).
fn std_streams() -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for st in [
        nix::sys::stat::fstat(std::io::stdout()),
        nix::sys::stat::fstat(std::io::stderr()),
    ]
    .into_iter()
    .flatten()
    {
        #[allow(clippy::useless_conversion)] // dev_t/ino_t widths differ between targets
        v.push((u64::from(st.st_dev), u64::from(st.st_ino)));
    }
    v
}

/// Colours only for a terminal, and never when `NO_COLOR` is set to anything (no-color.org).
pub fn want_ansi(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The output for this process, from its environment.
pub fn choose_output(format: LogFormat) -> Output {
    if let Some(js) = std::env::var_os("JOURNAL_STREAM") {
        if journal_stream_matches(&js.to_string_lossy(), &std_streams()) {
            return Output::Journald;
        }
    }
    let ansi = want_ansi(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    Output::Stdout { format, ansi }
}

type BoxedLayer = Box<
    dyn Layer<tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>>
        + Send
        + Sync,
>;

/// Install the global subscriber. `RUST_LOG`, when set, wins over `level`. `None` when a
/// subscriber was already installed.
pub fn init(level: &str, format: LogFormat) -> Option<FilterHandle> {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| filter_for(&s).ok())
        .or_else(|| filter_for(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let mut output = choose_output(format);
    let mut journald_error = None;
    let layer: BoxedLayer = loop {
        match output {
            Output::Journald => match tracing_journald::layer() {
                Ok(j) => {
                    break Box::new(FullMessage(
                        j.with_field_prefix(None)
                            .with_syslog_identifier("dlms-bridge".into())
                            .with_priority_mappings(priority_mappings()),
                    ))
                }
                Err(e) => {
                    // journald's socket is gone: systemd still captures stdout.
                    journald_error = Some(e);
                    output = Output::Stdout {
                        format,
                        ansi: false,
                    };
                }
            },
            Output::Stdout {
                format: LogFormat::Json,
                ..
            } => {
                break Box::new(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_target(true),
                )
            }
            Output::Stdout {
                format: LogFormat::Text,
                ansi,
            } => {
                break Box::new(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_target(true),
                )
            }
        }
    };
    let res = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
    if let Some(e) = journald_error {
        tracing::warn!(error = %e, "Journald socket unavailable; logging to stdout.");
    }
    res.ok().map(|_| handle)
}

/// Journald shows MESSAGE in `journalctl -u`; tracing-journald puts only the event's message
/// there and the other fields beside it. This wrapper hands it the same event with the fields
/// also written into the message (`Read failed; retrying. meter=M1 error=timed out`), so the
/// default view is complete and `journalctl METER=M1` still works.
pub struct FullMessage<L>(pub L);

impl<S, L> Layer<S> for FullMessage<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, ctx)
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.0.on_record(id, values, ctx)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let fields = event.metadata().fields();
        let mut rec = Recorded::default();
        event.record(&mut rec);
        let message = render_message(&rec);
        let values: Vec<Option<String>> = fields
            .iter()
            .map(|f| {
                if f.name() == "message" {
                    Some(message.clone())
                } else {
                    rec.get(f.name()).map(str::to_string)
                }
            })
            .collect();
        let refs: Vec<Option<&dyn tracing::Value>> = values
            .iter()
            .map(|v| v.as_ref().map(|s| s as &dyn tracing::Value))
            .collect();
        let set = fields.value_set_all(&refs);
        let full = Event::new_child_of(event.parent().cloned(), event.metadata(), &set);
        self.0.on_event(&full, ctx)
    }
}

/// An event's fields as text, in order.
#[derive(Default)]
struct Recorded(Vec<(&'static str, String)>);

impl Recorded {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Visit for Recorded {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name(), value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}")));
    }
}

/// `message key=value key="two words"`.
fn render_message(rec: &Recorded) -> String {
    let mut out = rec.get("message").unwrap_or_default().to_string();
    for (name, value) in rec.0.iter().filter(|(n, _)| *n != "message") {
        if !out.is_empty() {
            out.push(' ');
        }
        if value.is_empty() || value.contains(char::is_whitespace) || value.contains('"') {
            let _ = write!(out, "{name}={value:?}");
        } else {
            let _ = write!(out, "{name}={value}");
        }
    }
    out
}

/// The journal priority an event of `level` gets (see [`priority_mappings`]).
pub fn priority_of(level: Level) -> Priority {
    let m = priority_mappings();
    match level {
        Level::ERROR => m.error,
        Level::WARN => m.warn,
        Level::INFO => m.info,
        Level::DEBUG => m.debug,
        _ => m.trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::prelude::*;

    #[test]
    fn journald_priorities_put_warn_and_error_under_warning() {
        // journalctl -p warning shows priorities 0..=4.
        let code = |l| priority_of(l) as u8 - b'0';
        assert_eq!(code(Level::ERROR), 3);
        assert_eq!(code(Level::WARN), 4);
        assert_eq!(code(Level::INFO), 6);
        assert_eq!(code(Level::DEBUG), 7);
        assert_eq!(code(Level::TRACE), 7);
        assert!([Level::ERROR, Level::WARN].iter().all(|l| code(*l) <= 4));
        assert!([Level::INFO, Level::DEBUG].iter().all(|l| code(*l) > 4));
    }

    #[test]
    fn journal_stream_must_name_our_stream() {
        assert!(journal_stream_matches("8:1234", &[(8, 1234), (8, 99)]));
        assert!(!journal_stream_matches("8:1235", &[(8, 1234)]));
        assert!(!journal_stream_matches("garbage", &[(8, 1234)]));
        assert!(!journal_stream_matches("", &[]));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(want_ansi(true, None));
        assert!(!want_ansi(false, None));
        assert!(!want_ansi(true, Some(OsStr::new("1"))));
        assert!(want_ansi(true, Some(OsStr::new(""))));
    }

    /// What the journald layer is handed: the fields, and a message carrying them too.
    type Fields = Vec<(&'static str, String)>;
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Fields>>>);
    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut r = Recorded::default();
            event.record(&mut r);
            self.0.lock().expect("lock").push(r.0);
        }
    }

    #[test]
    fn full_message_keeps_fields_and_completes_the_message() {
        let cap = Capture::default();
        let sub = tracing_subscriber::registry().with(FullMessage(cap.clone()));
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(meter = "Meter 1", error = %"timed out", n = 3, "Read failed; retrying.");
        });
        let got = cap.0.lock().expect("lock").clone();
        assert_eq!(got.len(), 1);
        let ev = &got[0];
        let get = |k: &str| ev.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("message").as_deref(),
            Some("Read failed; retrying. meter=\"Meter 1\" error=\"timed out\" n=3")
        );
        assert_eq!(get("meter").as_deref(), Some("Meter 1"));
        assert_eq!(get("n").as_deref(), Some("3"));
    }
}
