//! Optional broker persistence (`[broker] persistence = true`), Mosquitto's model: retained
//! messages and persistent sessions (subscriptions, queued and unacknowledged QoS 1/2 messages,
//! open inbound QoS 2 ids) are written to a SQLite file at shutdown and every autosave interval,
//! and read back at start. What changed since the last save is lost on a crash.
//!
//! Messages are stored as MQTT 5 PUBLISH packets (rumqttc's codec), so every property survives.
//! The functions here are blocking: callers run them on `spawn_blocking`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5;
use rusqlite::{params, Connection};

use super::codec::{self, Version};
use super::state::{Message, Queued, Session, State, SubOpts};
use super::topic;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("blocking task failed: {0}")]
    Worker(String),
}

/// One stored message: the PUBLISH as delivered (QoS, retain, properties) and the QoS it was
/// published with.
#[derive(Debug, Clone)]
pub struct StoredMsg {
    pub packet: Vec<u8>,
    pub published_qos: u8,
}

#[derive(Debug, Clone)]
pub struct StoredSession {
    pub client_id: String,
    pub version: u8,
    pub expiry: u32,
    pub subs: Vec<(String, SubOpts)>,
    pub queue: Vec<StoredMsg>,
    pub qos2_in: Vec<u16>,
}

/// Everything persisted.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub retained: Vec<StoredMsg>,
    pub sessions: Vec<StoredSession>,
}

fn encode(q: &Queued, now: Instant) -> StoredMsg {
    let mut props = q.msg.props.clone();
    if let Some(e) = q.msg.expires {
        let left = e.saturating_duration_since(now).as_secs().max(1);
        props
            .get_or_insert_with(Default::default)
            .message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
    }
    if !q.sub_ids.is_empty() {
        props
            .get_or_insert_with(Default::default)
            .subscription_identifiers = q.sub_ids.clone();
    }
    let mut out = BytesMut::new();
    codec::write_publish(
        &mut out,
        Version::V5,
        &q.msg.topic,
        &q.msg.payload,
        q.qos,
        q.retain,
        false,
        if q.qos > 0 { 1 } else { 0 },
        props,
    );
    StoredMsg {
        packet: out.to_vec(),
        published_qos: q.msg.qos,
    }
}

fn decode(m: &StoredMsg, now: Instant) -> Option<Queued> {
    let mut buf = BytesMut::from(&m.packet[..]);
    let v5::Packet::Publish(p) = v5::Packet::read(&mut buf, None).ok()? else {
        return None;
    };
    let topic = String::from_utf8(p.topic.to_vec()).ok()?;
    let mut props = p.properties;
    let sub_ids = props
        .as_mut()
        .map(|p| std::mem::take(&mut p.subscription_identifiers))
        .unwrap_or_default();
    let expires = props
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .map(|s| now + Duration::from_secs(u64::from(s)));
    Some(Queued {
        msg: Arc::new(Message {
            topic,
            payload: p.payload,
            qos: m.published_qos,
            retain: p.retain,
            props,
            expires,
            origin: None,
        }),
        qos: p.qos as u8,
        retain: p.retain,
        sub_ids,
    })
}

/// Copy what must survive out of the state (cheap: messages are shared).
pub fn snapshot(st: &State, now: Instant) -> Snapshot {
    let retained = st
        .retained
        .values()
        .filter(|m| !m.expired(now))
        .map(|m| {
            encode(
                &Queued {
                    msg: m.clone(),
                    qos: m.qos,
                    retain: true,
                    sub_ids: Vec::new(),
                },
                now,
            )
        })
        .collect();
    let sessions = st
        .sessions
        .values()
        .filter(|s| s.expiry > 0)
        .map(|s: &Session| StoredSession {
            client_id: s.client_id.to_string(),
            version: match s.version {
                Version::V31 => 3,
                Version::V311 => 4,
                Version::V5 => 5,
            },
            expiry: s.expiry,
            subs: s.subs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            // Unacknowledged messages first (they were sent first), then the queue.
            queue: s
                .inflight
                .values()
                .filter(|i| !i.released)
                .map(|i| &i.q)
                .chain(s.queue.iter())
                .filter(|q| q.qos > 0 && !q.msg.expired(now))
                .map(|q| encode(q, now))
                .collect(),
            qos2_in: s.qos2_in.iter().copied().collect(),
        })
        .collect();
    Snapshot { retained, sessions }
}

/// Put a loaded snapshot into a fresh state; returns (sessions, retained messages) restored.
pub fn restore(st: &mut State, snap: Snapshot, now: Instant) -> (usize, usize) {
    let mut retained = 0;
    for m in &snap.retained {
        if let Some(q) = decode(m, now) {
            st.retained.insert(q.msg.topic.clone(), q.msg);
            retained += 1;
        }
    }
    let sessions = snap.sessions.len();
    for s in snap.sessions {
        let version = match s.version {
            3 => Version::V31,
            5 => Version::V5,
            _ => Version::V311,
        };
        st.restore_session(&s.client_id, version, s.expiry, now);
        for (raw, opts) in s.subs {
            if let Some(spec) = topic::parse_filter(&raw) {
                st.restore_subscription(&s.client_id, &raw, &spec, opts);
            }
        }
        for m in &s.queue {
            if let Some(q) = decode(m, now) {
                st.enqueue(&s.client_id, q);
            }
        }
        if let Some(sess) = st.sessions.get_mut(s.client_id.as_str()) {
            sess.qos2_in.extend(s.qos2_in);
        }
    }
    (sessions, retained)
}

fn open(path: &Path) -> Result<Connection, Error> {
    let db = Connection::open(path)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, packet BLOB NOT NULL, qos INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, version INTEGER NOT NULL, expiry INTEGER NOT NULL, qos2_in TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS subs (client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL, no_local INTEGER NOT NULL, rap INTEGER NOT NULL, rh INTEGER NOT NULL, sub_id INTEGER);
         CREATE TABLE IF NOT EXISTS queue (client_id TEXT NOT NULL, seq INTEGER NOT NULL, packet BLOB NOT NULL, qos INTEGER NOT NULL);",
    )?;
    Ok(db)
}

/// Replace the stored state with `snap` in one transaction.
pub fn save(path: &Path, snap: &Snapshot) -> Result<(), Error> {
    let mut db = open(path)?;
    let tx = db.transaction()?;
    tx.execute_batch(
        "DELETE FROM retained; DELETE FROM sessions; DELETE FROM subs; DELETE FROM queue;",
    )?;
    {
        let mut ins =
            tx.prepare("INSERT OR REPLACE INTO retained (topic, packet, qos) VALUES (?1, ?2, ?3)")?;
        for (i, m) in snap.retained.iter().enumerate() {
            ins.execute(params![i.to_string(), m.packet, m.published_qos])?;
        }
        let mut ses = tx.prepare(
            "INSERT INTO sessions (client_id, version, expiry, qos2_in) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut sub = tx.prepare("INSERT INTO subs (client_id, filter, qos, no_local, rap, rh, sub_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?;
        let mut que =
            tx.prepare("INSERT INTO queue (client_id, seq, packet, qos) VALUES (?1, ?2, ?3, ?4)")?;
        for s in &snap.sessions {
            let qos2: Vec<String> = s.qos2_in.iter().map(u16::to_string).collect();
            ses.execute(params![s.client_id, s.version, s.expiry, qos2.join(",")])?;
            for (f, o) in &s.subs {
                sub.execute(params![
                    s.client_id,
                    f,
                    o.qos,
                    o.no_local,
                    o.retain_as_published,
                    o.retain_handling,
                    o.sub_id.map(|i| i as i64)
                ])?;
            }
            for (seq, m) in s.queue.iter().enumerate() {
                que.execute(params![s.client_id, seq as i64, m.packet, m.published_qos])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Read the stored state (empty when the file is new).
pub fn load(path: &Path) -> Result<Snapshot, Error> {
    let db = open(path)?;
    let msg = |r: &rusqlite::Row<'_>| -> rusqlite::Result<StoredMsg> {
        Ok(StoredMsg {
            packet: r.get(0)?,
            published_qos: r.get(1)?,
        })
    };
    let retained = db
        .prepare("SELECT packet, qos FROM retained")?
        .query_map([], msg)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut sessions: Vec<StoredSession> = db
        .prepare("SELECT client_id, version, expiry, qos2_in FROM sessions")?
        .query_map([], |r| {
            let qos2: String = r.get(3)?;
            Ok(StoredSession {
                client_id: r.get(0)?,
                version: r.get(1)?,
                expiry: r.get(2)?,
                subs: Vec::new(),
                queue: Vec::new(),
                qos2_in: qos2.split(',').filter_map(|s| s.parse().ok()).collect(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut subs =
        db.prepare("SELECT filter, qos, no_local, rap, rh, sub_id FROM subs WHERE client_id = ?1")?;
    let mut queue =
        db.prepare("SELECT packet, qos FROM queue WHERE client_id = ?1 ORDER BY seq")?;
    for s in &mut sessions {
        s.subs = subs
            .query_map([&s.client_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    SubOpts {
                        qos: r.get(1)?,
                        no_local: r.get(2)?,
                        retain_as_published: r.get(3)?,
                        retain_handling: r.get(4)?,
                        sub_id: r.get::<_, Option<i64>>(5)?.map(|i| i as usize),
                    },
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        s.queue = queue
            .query_map([&s.client_id], msg)?
            .collect::<Result<Vec<_>, _>>()?;
    }
    Ok(Snapshot { retained, sessions })
}
