//! Reading the configuration with every problem reported at once. figment (like serde) stops at
//! the first error, so the merged value tree is deserialized repeatedly: each error is recorded
//! in plain words with its key path, the offending key is removed, and the rest is tried again.
//! TOML syntax errors are reported without quoting the source line, whose value may be a secret.
//! Reads only the configuration file itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use figment::error::{Actual, Kind};
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;

use super::{env_provider, ConfigError, Error, RawConfig};

/// More errors than this in one file are not worth listing one by one.
const MAX_ERRORS: usize = 100;

/// Key names whose values are never quoted in a message.
const SECRET_KEYS: &[&str] = &[
    "access_token",
    "password",
    "token",
    "secret",
    "authentication_key",
    "block_cipher_key",
];

/// Where the TOML text comes from, for messages.
pub(super) enum Source<'a> {
    File(&'a Path),
    Str,
}

/// Defaults < `text` < environment (when `with_env`), every problem collected.
pub(super) fn load_text(text: &str, src: Source<'_>, with_env: bool) -> Result<RawConfig, Error> {
    match load_text_collecting(text, src, with_env)? {
        (raw, errs) if errs.is_empty() => Ok(raw),
        (_, errs) => Err(Error::Invalid(errs)),
    }
}

/// Like [`load_text`], but a configuration with bad keys still yields the rest of it (bad
/// keys removed, so at their defaults) beside the errors, for validating what remains.
pub(super) fn load_text_collecting(
    text: &str,
    src: Source<'_>,
    with_env: bool,
) -> Result<(RawConfig, Vec<ConfigError>), Error> {
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        let name = match src {
            Source::File(p) => p.display().to_string(),
            Source::Str => "configuration".into(),
        };
        return Err(Error::Parse(toml_syntax_error(&name, text, &e)));
    }
    let mut fig = Figment::from(Serialized::defaults(RawConfig::default()));
    fig = match src {
        // The file again, through figment, so each value keeps its source for messages.
        Source::File(p) => fig.merge(Toml::file_exact(p)),
        Source::Str => fig.merge(Toml::string(text)),
    };
    if with_env {
        fig = fig.merge(env_provider());
    }
    extract_all(&fig)
}

/// Deserialize `fig` into a `RawConfig`, collecting every error instead of the first.
fn extract_all(fig: &Figment) -> Result<(RawConfig, Vec<ConfigError>), Error> {
    let mut root = match fig.find_value("") {
        Ok(v) => v,
        Err(e) => return Err(Error::Parse(mask_source_lines(&e.to_string()))),
    };
    let mut errs: Vec<ConfigError> = Vec::new();
    // Array elements removed so far, by array path: later indices are reported as written.
    let mut removed: BTreeMap<Vec<String>, BTreeSet<usize>> = BTreeMap::new();
    loop {
        let e = match root.deserialize::<RawConfig>() {
            Ok(raw) => return Ok((raw, errs)),
            Err(e) => e,
        };
        let Some(first) = e.into_iter().next() else {
            return Err(Error::Invalid(errs));
        };
        let (err, prune) = describe(fig, &first, &removed);
        if !errs.contains(&err) {
            errs.push(err);
        }
        if errs.len() >= MAX_ERRORS || !prune_at(&mut root, &prune, &mut removed) {
            return Err(Error::Invalid(errs));
        }
    }
}

/// The error in plain words, and the path to remove so the next attempt gets past it.
fn describe(
    fig: &Figment,
    e: &figment::Error,
    removed: &BTreeMap<Vec<String>, BTreeSet<usize>>,
) -> (ConfigError, Vec<String>) {
    let mut path = e.path.clone();
    let message = match &e.kind {
        Kind::UnknownField(name, expected) => {
            if path.last() != Some(name) {
                path.push(name.clone());
            }
            let mut m = "unknown key".to_string();
            if !expected.is_empty() {
                m += &format!("; known keys here: {}", expected.join(", "));
            }
            m
        }
        Kind::MissingField(name) => {
            if path.last().is_some_and(|l| l == name.as_ref()) {
                path.pop();
            }
            // The entry cannot be used without it: drop the whole entry.
            let key = written_key(&path, removed, Some(name));
            let err = ConfigError::new(key, "missing; this key is required");
            return (err, path);
        }
        Kind::UnknownVariant(v, expected) => format!(
            "`{v}` is not one of {}",
            expected
                .iter()
                .map(|x| format!("\"{x}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            plain_type_error(path.last().map(String::as_str), actual, expected)
        }
        Kind::InvalidLength(n, expected) => format!("has {n} elements, expected {expected}"),
        Kind::Message(m) => plain_message(m),
        other => mask_source_lines(&other.to_string()),
    };
    let key = written_key(&path, removed, None);
    let message = match source_of(fig, e, &path) {
        Some(s) => format!("{message} ({s})"),
        None => message,
    };
    (ConfigError::new(key, message), path)
}

/// `thingsboard.port`, `meters[2].registers[0].obis`, with array indices as written in the file.
fn written_key(
    path: &[String],
    removed: &BTreeMap<Vec<String>, BTreeSet<usize>>,
    last: Option<&str>,
) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        match seg.parse::<usize>() {
            Ok(mut idx) if i > 0 => {
                if let Some(gone) = removed.get(&path[..i].to_vec()) {
                    for g in gone {
                        if *g <= idx {
                            idx += 1;
                        }
                    }
                }
                out += &format!("[{idx}]");
            }
            _ => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(seg);
            }
        }
    }
    if let Some(l) = last {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(l);
    }
    out
}

/// "in /etc/dlms-bridge/config.toml" or "from environment variable DLMS_BRIDGE_X__Y".
fn source_of(fig: &Figment, e: &figment::Error, path: &[String]) -> Option<String> {
    // The longest prefix of the path that figment can attribute (it does not index arrays).
    let md = e.metadata.as_ref().or_else(|| {
        (1..=path.len())
            .rev()
            .find_map(|n| fig.find_metadata(&path[..n].join(".")))
    })?;
    if let Some(src) = &md.source {
        return Some(format!("in {src}"));
    }
    if md.name.contains("environment") {
        // figment's own interpolation ignores the `__` split; name the variable as written.
        let var = format!("{}{}", super::ENV_PREFIX, path.join("__").to_uppercase());
        return Some(format!("from environment variable {var}"));
    }
    None
}

fn is_secret(key: Option<&str>) -> bool {
    key.is_some_and(|k| SECRET_KEYS.contains(&k))
}

/// serde's "invalid value: integer `99999`, expected u16" as an operator would say it.
fn plain_type_error(key: Option<&str>, actual: &Actual, expected: &str) -> String {
    let found = if is_secret(key) {
        String::new()
    } else {
        match actual {
            // Text where a number, boolean or table belongs may be anything pasted, a token
            // included: say what it is, not what it says.
            Actual::Str(_) if expected != "a duration" => " (found text)".to_string(),
            Actual::Str(s) => format!(" (found \"{s}\")"),
            Actual::Signed(n) => format!(" (found {n})"),
            Actual::Unsigned(n) => format!(" (found {n})"),
            Actual::Float(n) => format!(" (found {n})"),
            Actual::Bool(b) => format!(" (found {b})"),
            other => format!(" (found {other})"),
        }
    };
    let is_port = key.is_some_and(|k| k == "port" || k.ends_with("_port"));
    let what = match expected {
        "u16" if is_port => "port must be 1–65535".to_string(),
        "u8" => "must be a whole number from 0 to 255".into(),
        "u16" => "must be a whole number from 0 to 65535".into(),
        "u32" => "must be a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "must be a whole number, 0 or more".into(),
        "i8" => "must be a whole number from -128 to 127".into(),
        "i16" | "i32" | "i64" | "isize" => "must be a whole number".into(),
        "f32" | "f64" => "must be a number".into(),
        "a boolean" => "must be true or false".into(),
        "a string" => "must be a string in double quotes".into(),
        "a duration" => "must be a duration like \"500ms\", \"20s\", \"5m\" or \"30days\"".into(),
        "a sequence" => "must be a list, like [\"a\", \"b\"]".into(),
        e if e.starts_with("struct ") || e.contains("map") => "must be a table".into(),
        e => format!("must be {e}"),
    };
    format!("{what}{found}")
}

/// Custom serde messages: humantime's parse errors become one plain sentence.
fn plain_message(m: &str) -> String {
    const HUMANTIME: &[&str] = &[
        "time unit",
        "expected number",
        "invalid character",
        "number is too large",
        "unknown time unit",
    ];
    if HUMANTIME.iter().any(|h| m.contains(h)) {
        return format!(
            "must be a duration like \"500ms\", \"20s\", \"5m\" or \"30days\" ({})",
            m.trim_end_matches('.')
        );
    }
    mask_source_lines(m)
}

/// Remove the value at `path` from the tree (an array element is removed from its array and
/// remembered, so later errors name it as written). `false` when nothing could be removed.
fn prune_at(
    root: &mut Value,
    path: &[String],
    removed: &mut BTreeMap<Vec<String>, BTreeSet<usize>>,
) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = root;
    for seg in parents {
        cur = match cur {
            Value::Dict(_, d) => match d.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(_, a) => match seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Dict(_, d) => d.remove(last).is_some(),
        Value::Array(_, a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                let gone = removed.entry(parents.to_vec()).or_default();
                // Store the index as written: shift past elements removed before it.
                let mut orig = i;
                for g in gone.iter() {
                    if *g <= orig {
                        orig += 1;
                    }
                }
                gone.insert(orig);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// A TOML syntax error with line, column and the key on that line, never the line itself.
fn toml_syntax_error(name: &str, text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return format!("{name}: TOML syntax error: {msg}");
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or_default();
    let shown = masked_line(line);
    format!("{name}: TOML syntax error at line {line_no}, column {column}: {msg} (line {line_no}: `{shown}`)")
}

/// A config line with its value hidden: `access_token = ***`; a line without `=` is hidden whole.
fn masked_line(line: &str) -> String {
    let trimmed = line.trim();
    if trimmed.starts_with('[') && !trimmed.contains('=') && !trimmed.contains('"') {
        return trimmed.to_string();
    }
    match trimmed.split_once('=') {
        Some((k, _)) if !k.contains('"') => format!("{} = ***", k.trim()),
        _ => "***".into(),
    }
}

/// Mask the quoted source lines of a toml error (`  3 | access_token = "…`) in any message.
pub(crate) fn mask_source_lines(msg: &str) -> String {
    msg.lines()
        .map(|l| {
            let t = l.trim_start();
            let digits = t.chars().take_while(char::is_ascii_digit).count();
            if digits > 0 && t[digits..].trim_start().starts_with('|') {
                let rest = t[digits..].trim_start()[1..].to_string();
                format!("{} | {}", &t[..digits], masked_line(&rest))
            } else if t.starts_with('|') && t.contains('^') {
                // The caret under a masked line points at nothing.
                String::new()
            } else {
                l.to_string()
            }
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(toml: &str) -> Vec<ConfigError> {
        match load_text(toml, Source::Str, false) {
            Err(Error::Invalid(e)) => e,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_parse_error_in_one_run() {
        let errs = errors(
            "[thingsboard]\nport = 99999\nacess_token = \"x\"\nkeep_alive = \"soon\"\n\
             [store]\npaht = \"x\"\nmax_age = 5\n[broker]\nenabled = \"yes\"\n",
        );
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "thingsboard.port",
            "thingsboard.acess_token",
            "thingsboard.keep_alive",
            "store.paht",
            "store.max_age",
            "broker.enabled",
        ] {
            assert!(keys.contains(&k), "{k} missing from {errs:?}");
        }
        let port = errs.iter().find(|e| e.key == "thingsboard.port").unwrap();
        assert_eq!(port.message, "port must be 1–65535 (found 99999)");
        let ka = errs
            .iter()
            .find(|e| e.key == "thingsboard.keep_alive")
            .unwrap();
        assert!(
            ka.message.starts_with("must be a duration like \"500ms\""),
            "{ka}"
        );
        let unknown = errs.iter().find(|e| e.key == "store.paht").unwrap();
        assert!(unknown.message.contains("unknown key"), "{unknown}");
        assert!(unknown.message.contains("path"), "{unknown}");
    }

    #[test]
    fn array_errors_keep_their_written_index() {
        let errs = errors(
            "[[meters]]\nname = \"a\"\nhost = \"h\"\nport = 1\nregisters = [{ key = \"v\" }]\n\
             [[meters]]\nname = \"b\"\nhost = \"h\"\nport = 70000\n",
        );
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"meters[0].registers[0].obis"), "{errs:?}");
        assert!(keys.contains(&"meters[1].port"), "{errs:?}");
    }

    #[test]
    fn secrets_are_not_quoted_in_type_errors() {
        let errs = errors("[thingsboard]\naccess_token = 123456789\n");
        let all = format!("{errs:?}");
        assert!(!all.contains("123456789"), "{all}");
        assert!(all.contains("thingsboard.access_token"), "{all}");
    }

    #[test]
    fn toml_syntax_errors_mask_the_line() {
        let text = "[thingsboard]\nhost = \"h\"\naccess_token = \"SECRET-TOKEN-42\n";
        let e = load_text(text, Source::Str, false).expect_err("broken");
        let msg = e.to_string();
        assert!(!msg.contains("SECRET-TOKEN-42"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("access_token = ***"), "{msg}");
    }

    #[test]
    fn quoted_source_lines_are_masked() {
        let m = "TOML parse error at line 3, column 16\n  |\n3 | access_token = \"abc\n  |                ^\ninvalid basic string";
        let out = mask_source_lines(m);
        assert!(!out.contains("abc"), "{out}");
        assert!(out.contains("3 | access_token = ***"), "{out}");
    }
}
