//! tb-gateway `${…}` expressions and MQTT topic filters, compiled once and evaluated per message.
//!
//! A [`Template`] is literal text with embedded `${path}` expressions; a [`JsonPath`] is the
//! JSONPath subset tb-gateway users write (`a.b.c`, `list[0].v`, `items[*].v`, `['key']`). A
//! [`TopicFilter`] matches MQTT topics with `+`/`#`. Everything here is pure and allocation-light:
//! nothing is parsed or compiled while a message is evaluated, and no input can make it panic.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;

/// Why an expression or a topic filter could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `${` without its closing `}`.
    #[error("`{0}`: `${{` is not closed by `}}`")]
    Unclosed(String),
    /// `${}` or a path with an empty segment (`a..b`).
    #[error("`{0}`: empty path segment")]
    EmptySegment(String),
    /// A `[` that is neither an index, `*` nor a quoted key.
    #[error("`{0}`: bad `[...]` selector (use [0], [*] or ['key'])")]
    BadSelector(String),
    /// A topic filter that MQTT does not allow.
    #[error("topic filter `{0}`: {1}")]
    BadTopicFilter(String, &'static str),
}

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    /// An object member.
    Key(String),
    /// An array element.
    Index(usize),
    /// Every member or element; the first one for which the rest of the path resolves is used.
    Wildcard,
}

/// A compiled JSONPath-ish selector over a JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPath {
    /// The text as written (without `${}`), also tried as a top-level key first, as tb-gateway does.
    raw: String,
    segments: Vec<Segment>,
}

impl JsonPath {
    /// Compile `a.b[0].c`, `$.a.b`, `items[*].v`, `['key with.dot']`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let raw = text.trim().to_string();
        let mut rest = raw.as_str();
        if let Some(r) = rest.strip_prefix("$.") {
            rest = r;
        } else if rest == "$" {
            rest = "";
        }
        let mut segments = Vec::new();
        let bytes = rest.as_bytes();
        let mut i = 0;
        let mut expect_key = true;
        if rest.is_empty() {
            return Err(Error::EmptySegment(text.to_string()));
        }
        while i < bytes.len() {
            match bytes[i] {
                b'[' => {
                    let close = rest[i..]
                        .find(']')
                        .map(|c| c + i)
                        .ok_or_else(|| Error::BadSelector(text.to_string()))?;
                    let inner = rest[i + 1..close].trim();
                    let seg = if inner == "*" {
                        Segment::Wildcard
                    } else if let Ok(n) = inner.parse::<usize>() {
                        Segment::Index(n)
                    } else if inner.len() >= 2
                        && ((inner.starts_with('\'') && inner.ends_with('\''))
                            || (inner.starts_with('"') && inner.ends_with('"')))
                    {
                        Segment::Key(inner[1..inner.len() - 1].to_string())
                    } else {
                        return Err(Error::BadSelector(text.to_string()));
                    };
                    segments.push(seg);
                    i = close + 1;
                    expect_key = false;
                }
                b'.' => {
                    if expect_key {
                        return Err(Error::EmptySegment(text.to_string()));
                    }
                    i += 1;
                    expect_key = true;
                    if i == bytes.len() {
                        return Err(Error::EmptySegment(text.to_string()));
                    }
                }
                _ => {
                    let end = rest[i..]
                        .find(['.', '['])
                        .map(|e| e + i)
                        .unwrap_or(rest.len());
                    let key = rest[i..end].trim();
                    if key.is_empty() {
                        return Err(Error::EmptySegment(text.to_string()));
                    }
                    segments.push(if key == "*" {
                        Segment::Wildcard
                    } else {
                        Segment::Key(key.to_string())
                    });
                    i = end;
                    expect_key = false;
                }
            }
        }
        Ok(JsonPath { raw, segments })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The single top-level key this path reads, if it is that simple (`${deviceName}`).
    pub fn top_level_key(&self) -> Option<&str> {
        match self.segments.as_slice() {
            [Segment::Key(k)] => Some(k),
            _ => None,
        }
    }

    /// The first value the path selects, or `None` when it selects nothing. JSON `null` counts as
    /// missing, as it does in tb-gateway.
    pub fn find<'a>(&self, v: &'a Value) -> Option<&'a Value> {
        if let Some(direct) = v.as_object().and_then(|o| o.get(&self.raw)) {
            return non_null(direct);
        }
        walk(v, &self.segments).and_then(non_null)
    }
}

fn non_null(v: &Value) -> Option<&Value> {
    (!v.is_null()).then_some(v)
}

fn walk<'a>(v: &'a Value, segs: &[Segment]) -> Option<&'a Value> {
    let Some((first, rest)) = segs.split_first() else {
        return Some(v);
    };
    match first {
        Segment::Key(k) => walk(v.as_object()?.get(k)?, rest),
        Segment::Index(n) => walk(v.as_array()?.get(*n)?, rest),
        Segment::Wildcard => match v {
            Value::Array(a) => a.iter().find_map(|x| walk(x, rest).and_then(non_null)),
            Value::Object(o) => o.values().find_map(|x| walk(x, rest).and_then(non_null)),
            _ => None,
        },
    }
}

/// One piece of a [`Template`].
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Expr(JsonPath),
}

/// Literal text with `${path}` expressions, e.g. `Meter ${serial}` or `${hum}:${temp}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
}

/// How substituted values are written into the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    /// Strings as they are, everything else as JSON text (`3.5`, `true`, `{"a":1}`).
    Plain,
    /// Every value JSON-encoded (strings get quotes), except the names listed in
    /// [`PLAIN_NAMES`]; used for the value expressions of requests (spec §6.5).
    Json,
}

/// Placeholders of request expressions that are always written as plain text.
pub const PLAIN_NAMES: &[&str] = &["deviceName", "methodName", "requestId", "attributeKey"];

impl Template {
    /// Compile a template; text without `${` is a constant.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| Error::Unclosed(text.to_string()))?;
            let path = JsonPath::parse(&after[..end]).map_err(|e| match e {
                Error::EmptySegment(_) => Error::EmptySegment(text.to_string()),
                _ => Error::BadSelector(text.to_string()),
            })?;
            parts.push(Part::Expr(path));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template {
            raw: text.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// True when the template has no `${…}` at all.
    pub fn is_constant(&self) -> bool {
        !self.parts.iter().any(|p| matches!(p, Part::Expr(_)))
    }

    /// The path when the template is exactly one `${path}` with no literal text.
    pub fn single_path(&self) -> Option<&JsonPath> {
        match self.parts.as_slice() {
            [Part::Expr(p)] => Some(p),
            _ => None,
        }
    }

    /// Top-level keys the template reads directly (`${deviceName}` → `deviceName`).
    pub fn top_level_keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => e.top_level_key(),
            Part::Literal(_) => None,
        })
    }

    /// Evaluate as a value: a single `${path}` yields the selected JSON value itself (typed),
    /// anything else the rendered text. `Err(path)` names the first expression that found nothing.
    pub fn eval_value<'a>(&self, v: &'a Value) -> Result<Cow<'a, Value>, &str> {
        if let Some(p) = self.single_path() {
            return p.find(v).map(Cow::Borrowed).ok_or(p.as_str());
        }
        self.render(v, Render::Plain)
            .map(|s| Cow::Owned(Value::String(s)))
    }

    /// Render to text. `Err(path)` names the first expression that found nothing.
    pub fn render(&self, v: &Value, mode: Render) -> Result<String, &str> {
        if let [Part::Literal(l)] = self.parts.as_slice() {
            return Ok(l.clone());
        }
        let mut out = String::with_capacity(self.raw.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Expr(p) => {
                    let found = p.find(v).ok_or(p.as_str())?;
                    let plain = mode == Render::Plain
                        || p.top_level_key().is_some_and(|k| PLAIN_NAMES.contains(&k));
                    write_value(&mut out, found, plain);
                }
            }
        }
        Ok(out)
    }
}

/// Append a JSON value as text: strings bare when `plain`, otherwise JSON.
pub fn write_value(out: &mut String, v: &Value, plain: bool) {
    match v {
        Value::String(s) if plain => out.push_str(s),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        other => out.push_str(&other.to_string()),
    }
}

/// One level of a [`TopicFilter`].
#[derive(Debug, Clone, PartialEq)]
enum Level {
    Exact(String),
    /// `+`: exactly one level.
    Plus,
    /// `#`: this level and every one below (also the parent itself, as MQTT says).
    Hash,
}

/// A compiled MQTT topic filter (`$share/<group>/` prefixes are dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct TopicFilter {
    raw: String,
    levels: Vec<Level>,
}

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<Self, Error> {
        let bad = |why| Error::BadTopicFilter(filter.to_string(), why);
        let mut f = filter;
        if let Some(rest) = f.strip_prefix("$share/") {
            f = rest
                .split_once('/')
                .map(|(_, t)| t)
                .ok_or_else(|| bad("`$share/<group>/` needs a topic"))?;
        }
        if f.is_empty() {
            return Err(bad("must not be empty"));
        }
        let parts: Vec<&str> = f.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, l) in parts.iter().enumerate() {
            levels.push(match *l {
                "#" if i == parts.len() - 1 => Level::Hash,
                "+" => Level::Plus,
                l if l.contains('#') => {
                    return Err(bad("`#` must be a whole level and the last one"))
                }
                l if l.contains('+') => return Err(bad("`+` must be a whole level")),
                l => Level::Exact(l.to_string()),
            });
        }
        Ok(TopicFilter {
            raw: filter.to_string(),
            levels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// MQTT matching of a concrete topic (wildcards never match a leading `$` level).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Exact(_))) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Hash => return true,
                Level::Plus => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Exact(e) => {
                    if parts.next() != Some(e.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload() -> Value {
        json!({
            "deviceName": "Meter 1",
            "a": {"b": {"c": 7}},
            "list": [{"v": 1}, {"v": 2}],
            "items": [{"x": 1}, {"v": "second"}],
            "with space": "ws",
            "dotted.key": "dk",
            "nul": null,
            "flag": true,
            "num": 3.5,
            "obj": {"k": [1, 2]}
        })
    }

    #[test]
    fn paths_select_values() {
        let p = payload();
        let cases: &[(&str, Option<Value>)] = &[
            ("deviceName", Some(json!("Meter 1"))),
            ("a.b.c", Some(json!(7))),
            ("$.a.b.c", Some(json!(7))),
            ("list[0].v", Some(json!(1))),
            ("list[1].v", Some(json!(2))),
            ("list[5].v", None),
            ("items[*].v", Some(json!("second"))),
            ("a.*.c", Some(json!(7))),
            ("with space", Some(json!("ws"))),
            ("dotted.key", Some(json!("dk"))),
            ("['dotted.key']", Some(json!("dk"))),
            ("nul", None),
            ("missing", None),
            ("a.b.c.d", None),
            ("deviceName[0]", None),
            ("obj.k[1]", Some(json!(2))),
        ];
        for (path, want) in cases {
            let jp = JsonPath::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(jp.find(&p).cloned(), *want, "{path}");
        }
    }

    #[test]
    fn malformed_paths_are_errors() {
        for bad in ["", "a..b", "a.", ".a", "a[", "a[x]", "a[-1]", "$"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn templates_render_and_report_missing() {
        let p = payload();
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("${deviceName}", Ok("Meter 1")),
            ("Meter ${a.b.c}", Ok("Meter 7")),
            ("${deviceName}:${num}:${flag}", Ok("Meter 1:3.5:true")),
            ("constant", Ok("constant")),
            ("", Ok("")),
            ("${obj}", Ok(r#"{"k":[1,2]}"#)),
            ("x${missing}y", Err("missing")),
            ("${nul}", Err("nul")),
        ];
        for (t, want) in cases {
            let tpl = Template::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(
                tpl.render(&p, Render::Plain).as_deref().map_err(|e| *e),
                *want,
                "{t}"
            );
        }
    }

    #[test]
    fn template_values_keep_their_type() {
        let p = payload();
        let t = Template::parse("${a.b.c}").expect("parses");
        assert_eq!(t.eval_value(&p).map(|c| c.into_owned()), Ok(json!(7)));
        let t = Template::parse("v=${a.b.c}").expect("parses");
        assert_eq!(t.eval_value(&p).map(|c| c.into_owned()), Ok(json!("v=7")));
    }

    #[test]
    fn json_render_quotes_values_but_not_names() {
        let ctx = json!({"deviceName": "M1", "params": {"pin": 4, "s": "on"}, "methodName": "set"});
        let t = Template::parse("${deviceName}/${methodName}=${params.s}|${params}").expect("ok");
        assert_eq!(
            t.render(&ctx, Render::Json).as_deref(),
            Ok(r#"M1/set="on"|{"pin":4,"s":"on"}"#)
        );
    }

    #[test]
    fn malformed_templates_are_errors() {
        for bad in ["${", "${deviceName", "a${}b", "${a..b}", "${a[}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn topic_filters_match_like_mqtt() {
        let cases: &[(&str, &str, bool)] = &[
            ("v1/devices/me/telemetry", "v1/devices/me/telemetry", true),
            (
                "v1/devices/me/telemetry",
                "v1/devices/me/telemetry/x",
                false,
            ),
            ("v1/devices/me/telemetry", "v1/devices/me", false),
            ("sensors/+/telemetry", "sensors/abc/telemetry", true),
            ("sensors/+/telemetry", "sensors/telemetry", false),
            ("sensors/+/telemetry", "sensors/a/b/telemetry", false),
            ("sensors/#", "sensors/a/b", true),
            ("sensors/#", "sensors", true),
            ("sensors/#", "other/a", false),
            ("#", "a/b/c", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$share/g/meters/+", "meters/7", true),
            ("a//b", "a//b", true),
            ("+", "", true),
        ];
        for (f, t, want) in cases {
            let tf = TopicFilter::parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(tf.matches(t), *want, "{f} vs {t}");
        }
        for bad in ["", "a/#/b", "a/b#", "a+/b", "$share/g"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad:?} should fail");
        }
    }
}
