//! The broker's shared state: sessions by client id, the subscription tree, retained messages,
//! the bridge's own subscribers, and the routing of one message to all of them. It lives behind
//! one `parking_lot::Mutex` (no poisoning: a panicking connection task cannot wedge the others)
//! that is never held across an `.await`; nothing here does I/O.
//!
//! Delivery is pull-based: routing appends to each matching session's bounded queue and wakes
//! that session's connection task, which takes what its in-flight window allows. A session that
//! has no connection simply keeps its queue (QoS 1/2 only, as Mosquitto does).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::codec::Version;
use super::topic::{self, FilterSpec, Tree};
use super::ClientInfo;

/// Most messages one connection takes from its queue at a time (see [`State::take_deliverable`]).
pub const MAX_BATCH: usize = 64;

/// Session expiry meaning "never" (MQTT 3.1.1 `clean_session = 0`, MQTT 5 `0xFFFFFFFF`).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// One message as published, shared by every queue it is delivered to.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 properties forwarded to subscribers (topic alias and subscription ids removed).
    pub props: Option<PublishProperties>,
    /// When the message expiry interval runs out.
    pub expires: Option<Instant>,
    /// Client id of the publisher (`None` for the bridge), for No Local.
    pub origin: Option<Arc<str>>,
}

impl Message {
    pub fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// A message waiting in, or in flight from, one session.
#[derive(Debug, Clone)]
pub struct Queued {
    pub msg: Arc<Message>,
    /// Delivered QoS: min(published, subscribed).
    pub qos: u8,
    /// Retain flag to send.
    pub retain: bool,
    /// MQTT 5 subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<usize>,
}

/// One outbound QoS 1/2 message awaiting its acknowledgement.
#[derive(Debug, Clone)]
pub struct Inflight {
    pub q: Queued,
    /// PUBREC received, PUBREL sent: only PUBCOMP is awaited.
    pub released: bool,
}

/// What the connection task must write: a PUBLISH or (on resume) a PUBREL.
#[derive(Debug)]
pub enum Out {
    Publish { pkid: u16, q: Queued, dup: bool },
    PubRel(u16),
}

/// Options of one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOpts {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 send retained on subscribe, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
    pub sub_id: Option<usize>,
}

/// A will message and when it may be published.
#[derive(Debug, Clone)]
pub struct Will {
    pub msg: Arc<Message>,
    /// MQTT 5 will delay interval, seconds.
    pub delay: u32,
}

/// Signals from the state to one connection task.
#[derive(Debug)]
pub struct ConnSignal {
    /// Messages were queued for the session.
    pub notify: Notify,
    /// Close the connection (takeover, shutdown); `reason` says why.
    pub kick: CancellationToken,
    /// MQTT 5 reason code to send when kicked (0 = shutdown, send 0x8B).
    pub reason: AtomicU8,
    /// Messages received from / sent to this connection.
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

/// The connection that currently owns a session.
#[derive(Debug)]
pub struct ConnSlot {
    pub id: u64,
    pub signal: Arc<ConnSignal>,
    /// Outbound QoS 1/2 window: min(client's Receive Maximum, `max_inflight_messages`).
    pub window: usize,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub peer: SocketAddr,
    pub connected_since: crate::model::TimestampMs,
}

#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    pub version: Version,
    /// Raw filter (with any `$share/` prefix) → options.
    pub subs: HashMap<String, SubOpts>,
    pub queue: VecDeque<Queued>,
    pub inflight: BTreeMap<u16, Inflight>,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids received and not yet released (kept across reconnects).
    pub qos2_in: HashSet<u16>,
    /// Seconds the session outlives its connection.
    pub expiry: u32,
    pub conn: Option<ConnSlot>,
    pub disconnected_at: Option<Instant>,
    /// Will waiting for its delay (or the session's end).
    pub pending_will: Option<(Will, Instant)>,
}

impl Session {
    fn new(client_id: Arc<str>, version: Version, expiry: u32) -> Session {
        Session {
            client_id,
            version,
            subs: HashMap::new(),
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_pkid: 0,
            qos2_in: HashSet::new(),
            expiry,
            conn: None,
            disconnected_at: None,
            pending_will: None,
        }
    }

    fn alloc_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
        None
    }
}

/// A bridge subscriber (from [`super::BrokerHandle::subscribe`]).
#[derive(Debug)]
pub struct BridgeSub {
    pub filter: String,
    pub tx: mpsc::Sender<(String, Bytes)>,
}

/// Limits the state enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per-session queue bound (`max_queued_messages`).
    pub max_queued: usize,
}

/// Counters for `$SYS`, the statistics API and the drop WARN.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
    /// Messages dropped because a session queue was full.
    pub dropped_queue_full: u64,
    /// Messages dropped because a bridge subscriber's channel was full.
    pub dropped_bridge: u64,
    pub connections_total: u64,
}

#[derive(Debug)]
pub struct State {
    pub limits: Limits,
    pub sessions: HashMap<Arc<str>, Session>,
    pub tree: Tree<Arc<str>, SubOpts>,
    pub retained: HashMap<String, Arc<Message>>,
    pub bridge_subs: Vec<BridgeSub>,
    pub counters: Counters,
    pub connected: usize,
}

/// What [`State::connect`] decided.
pub struct Connected {
    pub session_present: bool,
    /// Unacknowledged messages to resend (DUP) and PUBRELs to repeat, in packet-id order.
    pub resend: Vec<Out>,
}

impl State {
    pub fn new(limits: Limits) -> State {
        State {
            limits,
            sessions: HashMap::new(),
            tree: Tree::default(),
            retained: HashMap::new(),
            bridge_subs: Vec::new(),
            counters: Counters::default(),
            connected: 0,
        }
    }

    /// Attach a new connection to `client_id`'s session (creating or resuming it). A connection
    /// already holding the id is kicked (0x8E) and its will handled as on an abnormal close.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &mut self,
        client_id: &str,
        version: Version,
        clean: bool,
        expiry: u32,
        slot: ConnSlot,
        now: Instant,
    ) -> Connected {
        let mut wills = Vec::new();
        if let Some(s) = self.sessions.get_mut(client_id) {
            if let Some(old) = s.conn.take() {
                old.signal
                    .reason
                    .store(super::REASON_SESSION_TAKEN_OVER, Ordering::Relaxed);
                old.signal.kick.cancel();
                self.connected -= 1;
                if let Some(w) = old.will {
                    if w.delay == 0 || clean {
                        wills.push(w.msg);
                    }
                    // A delayed will is cancelled when the session resumes.
                }
            }
            if let Some((w, _)) = s.pending_will.take() {
                if clean {
                    wills.push(w.msg);
                }
            }
        }
        if clean {
            self.remove_session(client_id);
        }
        let id: Arc<str> = Arc::from(client_id);
        let session_present = self.sessions.contains_key(client_id);
        let s = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| Session::new(id, version, expiry));
        s.version = version;
        s.expiry = expiry;
        s.disconnected_at = None;
        s.conn = Some(slot);
        let mut resend = Vec::new();
        for (pkid, inf) in &s.inflight {
            if inf.released {
                resend.push(Out::PubRel(*pkid));
            } else if inf.q.msg.expired(now) {
                continue;
            } else {
                resend.push(Out::Publish {
                    pkid: *pkid,
                    q: inf.q.clone(),
                    dup: true,
                });
            }
        }
        // Expired unacknowledged messages are forgotten (MQTT 5 §3.3.2.3.3).
        s.inflight
            .retain(|_, inf| inf.released || !inf.q.msg.expired(now));
        self.connected += 1;
        self.counters.connections_total += 1;
        for w in wills {
            self.publish(w, now);
        }
        Connected {
            session_present,
            resend,
        }
    }

    /// The connection `conn_id` of `client_id` ended. `will` says whether its will is due
    /// (abnormal close or DISCONNECT 0x04); `expiry` is the MQTT 5 DISCONNECT's update.
    pub fn disconnected(
        &mut self,
        client_id: &str,
        conn_id: u64,
        will: bool,
        expiry: Option<u32>,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.conn.as_ref().map(|c| c.id) != Some(conn_id) {
            return; // taken over: the new connection owns the session.
        }
        let slot = s.conn.take().expect("checked just above");
        self.connected -= 1;
        if let Some(e) = expiry {
            s.expiry = e;
        }
        s.disconnected_at = Some(now);
        let will = slot.will.filter(|_| will);
        if s.expiry == 0 {
            let will = will.map(|w| w.msg);
            self.remove_session(client_id);
            if let Some(w) = will {
                self.publish(w, now);
            }
            return;
        }
        match will {
            Some(w) if w.delay == 0 => self.publish(w.msg, now),
            Some(w) => {
                let delay = w.delay.min(s.expiry);
                s.pending_will = Some((w, now + Duration::from_secs(u64::from(delay))));
            }
            None => {}
        }
    }

    /// Forget a session: its subscriptions, queue and in-flight state.
    pub fn remove_session(&mut self, client_id: &str) {
        let Some(s) = self.sessions.remove(client_id) else {
            return;
        };
        if s.conn.is_some() {
            self.connected -= 1;
        }
        for raw in s.subs.keys() {
            if let Some(spec) = topic::parse_filter(raw) {
                self.tree.remove(&spec, &s.client_id);
            }
        }
    }

    /// Publish due delayed wills and end expired sessions (publishing their pending wills).
    pub fn housekeep(&mut self, now: Instant) {
        let mut wills = Vec::new();
        let mut expired = Vec::new();
        for s in self.sessions.values_mut() {
            if let Some((_, due)) = &s.pending_will {
                if *due <= now {
                    if let Some((w, _)) = s.pending_will.take() {
                        wills.push(w.msg);
                    }
                }
            }
            if s.conn.is_none() && s.expiry != NEVER_EXPIRES {
                if let Some(at) = s.disconnected_at {
                    if at + Duration::from_secs(u64::from(s.expiry)) <= now {
                        if let Some((w, _)) = s.pending_will.take() {
                            wills.push(w.msg);
                        }
                        expired.push(s.client_id.clone());
                    }
                }
            }
        }
        for id in expired {
            self.remove_session(&id);
        }
        for w in wills {
            self.publish(w, now);
        }
    }

    /// Route one message: update the retained store, queue it for every matching session (once
    /// per session, at the highest matching QoS, with every subscription identifier), and hand
    /// it to matching bridge subscribers.
    pub fn publish(&mut self, msg: Arc<Message>, now: Instant) {
        if msg.retain {
            if msg.payload.is_empty() {
                self.retained.remove(&msg.topic);
            } else {
                self.retained.insert(msg.topic.clone(), msg.clone());
            }
        }
        let sessions = &self.sessions;
        let hits = self.tree.lookup(&msg.topic, |k: &Arc<str>| {
            sessions.get(k).is_some_and(|s| s.conn.is_some())
        });
        // client → (qos, retain as published, sub ids)
        let mut targets: HashMap<Arc<str>, (u8, bool, Vec<usize>)> = HashMap::new();
        for hit in hits {
            let o = hit.value;
            if o.no_local && msg.origin.as_deref() == Some(&**hit.key) {
                continue;
            }
            let t = targets
                .entry(hit.key.clone())
                .or_insert((0, false, Vec::new()));
            t.0 = t.0.max(o.qos);
            t.1 |= o.retain_as_published;
            if let Some(id) = o.sub_id {
                t.2.push(id);
            }
        }
        for (client, (sub_qos, rap, sub_ids)) in targets {
            let q = Queued {
                msg: msg.clone(),
                qos: msg.qos.min(sub_qos),
                retain: msg.retain && rap,
                sub_ids,
            };
            self.enqueue(&client, q);
        }
        self.bridge_subs.retain(|b| !b.tx.is_closed());
        for b in &self.bridge_subs {
            if topic::matches(&b.filter, &msg.topic)
                && b.tx
                    .try_send((msg.topic.clone(), msg.payload.clone()))
                    .is_err()
            {
                self.counters.dropped_bridge += 1;
            }
        }
        let _ = now;
    }

    /// Append to one session's queue (bounded), waking its connection. Offline sessions keep
    /// only QoS 1/2 messages. Returns false when there is no such session.
    pub fn enqueue(&mut self, client: &str, q: Queued) -> bool {
        let Some(s) = self.sessions.get_mut(client) else {
            return false;
        };
        if s.conn.is_none() && q.qos == 0 {
            return true;
        }
        if s.queue.len() >= self.limits.max_queued {
            self.counters.dropped_queue_full += 1;
            return true;
        }
        s.queue.push_back(q);
        if let Some(c) = &s.conn {
            c.signal.notify.notify_one();
        }
        true
    }

    /// Take what connection `conn_id` may send now: queued messages up to its in-flight window
    /// (QoS 1/2 get a packet id and enter the in-flight map) and at most [`MAX_BATCH`] per call,
    /// so a client that stops reading holds one small batch in its task, the rest stays in its
    /// bounded queue. Expired messages are dropped. `None` when the connection no longer owns
    /// the session.
    pub fn take_deliverable(
        &mut self,
        client_id: &str,
        conn_id: u64,
        now: Instant,
    ) -> Option<Vec<Out>> {
        let s = self.sessions.get_mut(client_id)?;
        let window = match &s.conn {
            Some(c) if c.id == conn_id => c.window,
            _ => return None,
        };
        let mut out = Vec::new();
        while let Some(front) = s.queue.front() {
            if out.len() >= MAX_BATCH {
                break;
            }
            if front.msg.expired(now) {
                s.queue.pop_front();
                continue;
            }
            if front.qos > 0 && s.inflight.len() >= window {
                break;
            }
            let q = s.queue.pop_front().expect("front exists");
            if q.qos == 0 {
                out.push(Out::Publish {
                    pkid: 0,
                    q,
                    dup: false,
                });
                continue;
            }
            let Some(pkid) = s.alloc_pkid() else {
                s.queue.push_front(q);
                break;
            };
            s.inflight.insert(
                pkid,
                Inflight {
                    q: q.clone(),
                    released: false,
                },
            );
            out.push(Out::Publish {
                pkid,
                q,
                dup: false,
            });
        }
        self.counters.sent += out.len() as u64;
        Some(out)
    }

    /// A message taken for delivery could not be sent (larger than the client's Maximum Packet
    /// Size): forget it.
    pub fn forget_inflight(&mut self, client_id: &str, pkid: u16) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.inflight.remove(&pkid);
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the subscriber.
    pub fn acked(&mut self, client_id: &str, pkid: u16) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.inflight.remove(&pkid);
        }
    }

    /// PUBREC from the subscriber: the PUBLISH is done, a PUBREL follows.
    pub fn received(&mut self, client_id: &str, pkid: u16) -> bool {
        match self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.inflight.get_mut(&pkid))
        {
            Some(inf) => {
                inf.released = true;
                true
            }
            None => false,
        }
    }

    /// Inbound QoS 2: true when `pkid` is new (route the message), false for a resend.
    pub fn qos2_first(&mut self, client_id: &str, pkid: u16) -> bool {
        self.sessions
            .get_mut(client_id)
            .is_some_and(|s| s.qos2_in.insert(pkid))
    }

    /// Inbound PUBREL: release the id.
    pub fn qos2_release(&mut self, client_id: &str, pkid: u16) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.qos2_in.remove(&pkid);
        }
    }

    /// Inbound QoS 2 exchanges still open for `client_id` (counted against Receive Maximum).
    pub fn qos2_open(&self, client_id: &str) -> usize {
        self.sessions.get(client_id).map_or(0, |s| s.qos2_in.len())
    }

    /// Subscribe; returns whether the subscription already existed and queues the matching
    /// retained messages per Retain Handling.
    pub fn subscribe(
        &mut self,
        client_id: &str,
        raw: &str,
        spec: &FilterSpec<'_>,
        opts: SubOpts,
    ) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let key = s.client_id.clone();
        s.subs.insert(raw.to_owned(), opts.clone());
        let existed = self.tree.insert(spec, key, opts.clone());
        let send_retained = spec.group.is_none()
            && match opts.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
        if send_retained {
            let mut hits: Vec<Arc<Message>> = self
                .retained
                .values()
                .filter(|m| topic::matches(spec.filter, &m.topic))
                .cloned()
                .collect();
            hits.sort_by(|a, b| a.topic.cmp(&b.topic));
            for m in hits {
                let q = Queued {
                    qos: m.qos.min(opts.qos),
                    retain: true,
                    sub_ids: opts.sub_id.into_iter().collect(),
                    msg: m,
                };
                self.enqueue(client_id, q);
            }
        }
        existed
    }

    /// Unsubscribe; true when the subscription existed.
    pub fn unsubscribe(&mut self, client_id: &str, raw: &str) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        if s.subs.remove(raw).is_none() {
            return false;
        }
        let key = s.client_id.clone();
        if let Some(spec) = topic::parse_filter(raw) {
            self.tree.remove(&spec, &key);
        }
        true
    }

    /// Connected clients, for the statistics API.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut v: Vec<ClientInfo> = self
            .sessions
            .values()
            .filter_map(|s| {
                let c = s.conn.as_ref()?;
                Some(ClientInfo {
                    client_id: s.client_id.to_string(),
                    username: c.username.clone(),
                    peer: c.peer,
                    protocol: s.version.name(),
                    connected_since: c.connected_since,
                    messages_in: c.signal.messages_in.load(Ordering::Relaxed),
                    messages_out: c.signal.messages_out.load(Ordering::Relaxed),
                })
            })
            .collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        v
    }

    /// Recreate a persisted session (offline, its expiry counted from now).
    pub fn restore_session(
        &mut self,
        client_id: &str,
        version: Version,
        expiry: u32,
        now: Instant,
    ) {
        let id: Arc<str> = Arc::from(client_id);
        let mut s = Session::new(id.clone(), version, expiry);
        s.disconnected_at = Some(now);
        self.sessions.insert(id, s);
    }

    /// Recreate a persisted subscription (no retained messages are queued for it).
    pub fn restore_subscription(
        &mut self,
        client_id: &str,
        raw: &str,
        spec: &FilterSpec<'_>,
        opts: SubOpts,
    ) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.subs.insert(raw.to_owned(), opts.clone());
            self.tree.insert(spec, s.client_id.clone(), opts);
        }
    }

    /// Every session's queued message count (for `$SYS`).
    /// Counters and sizes whose change between two housekeeping ticks means activity.
    pub fn activity(&self) -> super::memory::Activity {
        super::memory::Activity {
            received: self.counters.received,
            sent: self.counters.sent,
            dropped: self.counters.dropped_queue_full + self.counters.dropped_bridge,
            connections_total: self.counters.connections_total,
            connected: self.connected,
            sessions: self.sessions.len(),
        }
    }

    pub fn queued_total(&self) -> usize {
        self.sessions
            .values()
            .map(|s| s.queue.len() + s.inflight.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(Limits { max_queued: 3 })
    }

    fn slot(id: u64, will: Option<Will>) -> ConnSlot {
        ConnSlot {
            id,
            signal: Arc::new(ConnSignal {
                notify: Notify::new(),
                kick: CancellationToken::new(),
                reason: AtomicU8::new(0),
                messages_in: AtomicU64::new(0),
                messages_out: AtomicU64::new(0),
            }),
            window: 10,
            will,
            username: None,
            peer: "127.0.0.1:1".parse().expect("literal"),
            connected_since: 0,
        }
    }

    fn msg(
        topic: &str,
        payload: &str,
        qos: u8,
        retain: bool,
        origin: Option<&str>,
    ) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_owned()),
            qos,
            retain,
            props: None,
            expires: None,
            origin: origin.map(Arc::from),
        })
    }

    fn opts(qos: u8) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            sub_id: None,
        }
    }

    fn sub(st: &mut State, client: &str, filter: &str, o: SubOpts) {
        let spec = topic::parse_filter(filter).expect("valid filter");
        st.subscribe(client, filter, &spec, o);
    }

    /// (topic, payload, delivered qos, retain flag, sub ids) of what `client` may send now.
    fn drain(
        st: &mut State,
        client: &str,
        conn: u64,
    ) -> Vec<(String, String, u8, bool, Vec<usize>)> {
        let mut all = Vec::new();
        loop {
            let batch = st
                .take_deliverable(client, conn, Instant::now())
                .expect("owner");
            assert!(batch.len() <= MAX_BATCH);
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        all.into_iter()
            .filter_map(|o| match o {
                Out::Publish { q, .. } => Some((
                    q.msg.topic.clone(),
                    String::from_utf8_lossy(&q.msg.payload).into_owned(),
                    q.qos,
                    q.retain,
                    q.sub_ids,
                )),
                Out::PubRel(_) => None,
            })
            .collect()
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_min_of_publish_and_max_subscription() {
        let mut st = state();
        let now = Instant::now();
        st.connect("s", Version::V5, true, 0, slot(1, None), now);
        let mut a = opts(1);
        a.sub_id = Some(1);
        let mut b = opts(2);
        b.sub_id = Some(2);
        sub(&mut st, "s", "a/#", a);
        sub(&mut st, "s", "a/+", b);
        st.publish(msg("a/b", "x", 2, false, None), now);
        st.publish(msg("a/b", "y", 0, false, None), now);
        let got = drain(&mut st, "s", 1);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].2, 2);
        let mut ids = got[0].4.clone();
        ids.sort();
        assert_eq!(ids, [1, 2]);
        assert_eq!(got[1].2, 0, "a QoS 0 publish stays QoS 0");
    }

    #[test]
    fn retained_store_cleared_only_by_retained_empty_payload() {
        let mut st = state();
        let now = Instant::now();
        st.publish(msg("r", "v1", 1, true, None), now);
        st.publish(msg("r", "", 0, false, None), now);
        assert!(st.retained.contains_key("r"), "non-retained empty keeps it");
        st.publish(msg("r", "", 0, true, None), now);
        assert!(!st.retained.contains_key("r"));
    }

    #[test]
    fn every_matching_retained_message_reaches_a_new_subscriber_flagged_retained() {
        let mut st = State::new(Limits { max_queued: 1000 });
        let now = Instant::now();
        for i in 0..300 {
            st.publish(msg(&format!("t/{i}"), "v", 1, true, None), now);
        }
        st.connect("late", Version::V311, true, 0, slot(1, None), now);
        sub(&mut st, "late", "t/#", opts(0));
        let got = drain(&mut st, "late", 1);
        assert_eq!(got.len(), 300);
        assert!(got.iter().all(|g| g.3 && g.2 == 0));
    }

    #[test]
    fn no_local_and_retain_as_published() {
        let mut st = state();
        let now = Instant::now();
        st.connect("me", Version::V5, true, 0, slot(1, None), now);
        let mut o = opts(1);
        o.no_local = true;
        o.retain_as_published = true;
        sub(&mut st, "me", "x", o);
        st.publish(msg("x", "mine", 1, true, Some("me")), now);
        st.publish(msg("x", "theirs", 1, true, Some("other")), now);
        let got = drain(&mut st, "me", 1);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].1.as_str(), got[0].3), ("theirs", true));
    }

    #[test]
    fn offline_session_queues_qos1_only_and_the_queue_is_bounded() {
        let mut st = state();
        let now = Instant::now();
        st.connect("p", Version::V311, false, NEVER_EXPIRES, slot(1, None), now);
        sub(&mut st, "p", "q", opts(2));
        st.disconnected("p", 1, true, None, now);
        st.publish(msg("q", "zero", 0, false, None), now);
        for i in 0..5 {
            st.publish(msg("q", &i.to_string(), 1, false, None), now);
        }
        assert_eq!(st.counters.dropped_queue_full, 2);
        let c = st.connect("p", Version::V311, false, NEVER_EXPIRES, slot(2, None), now);
        assert!(c.session_present);
        let got: Vec<String> = drain(&mut st, "p", 2).into_iter().map(|g| g.1).collect();
        assert_eq!(got, ["0", "1", "2"]);
    }

    #[test]
    fn unacked_messages_are_resent_with_dup_after_reconnect() {
        let mut st = state();
        let now = Instant::now();
        st.connect("p", Version::V311, false, NEVER_EXPIRES, slot(1, None), now);
        sub(&mut st, "p", "q", opts(1));
        st.publish(msg("q", "m", 1, false, None), now);
        assert_eq!(drain(&mut st, "p", 1).len(), 1);
        let c = st.connect("p", Version::V311, false, NEVER_EXPIRES, slot(2, None), now);
        assert!(matches!(
            c.resend.as_slice(),
            [Out::Publish { dup: true, .. }]
        ));
        // The old connection can no longer take anything.
        assert!(st.take_deliverable("p", 1, now).is_none());
    }

    #[test]
    fn takeover_publishes_the_old_will_and_kicks_the_old_connection() {
        let mut st = state();
        let now = Instant::now();
        st.connect("w", Version::V311, true, 0, slot(9, None), now);
        sub(&mut st, "w", "wills/#", opts(0));
        let will = Will {
            msg: msg("wills/a", "gone", 0, false, Some("a")),
            delay: 0,
        };
        let old = slot(1, Some(will));
        let old_signal = old.signal.clone();
        st.connect("a", Version::V311, true, 0, old, now);
        st.connect("a", Version::V311, true, 0, slot(2, None), now);
        assert!(old_signal.kick.is_cancelled());
        assert_eq!(
            old_signal.reason.load(Ordering::Relaxed),
            super::super::REASON_SESSION_TAKEN_OVER
        );
        assert_eq!(drain(&mut st, "w", 9)[0].1, "gone");
        // The old task's late deregistration does not detach the new connection.
        st.disconnected("a", 1, true, None, now);
        assert_eq!(st.connected, 2);
    }

    #[test]
    fn delayed_will_is_cancelled_by_resume_and_published_when_due() {
        let mut st = state();
        let now = Instant::now();
        st.connect("w", Version::V5, true, 0, slot(9, None), now);
        sub(&mut st, "w", "wills/#", opts(0));
        let will = || Will {
            msg: msg("wills/a", "gone", 0, false, Some("a")),
            delay: 5,
        };
        st.connect("a", Version::V5, false, 60, slot(1, Some(will())), now);
        st.disconnected("a", 1, true, None, now);
        st.connect(
            "a",
            Version::V5,
            false,
            60,
            slot(2, Some(will())),
            now + Duration::from_secs(1),
        );
        st.housekeep(now + Duration::from_secs(10));
        assert!(
            drain(&mut st, "w", 9).is_empty(),
            "resumed within the delay"
        );
        st.disconnected("a", 2, true, None, now + Duration::from_secs(10));
        st.housekeep(now + Duration::from_secs(14));
        assert!(drain(&mut st, "w", 9).is_empty(), "delay not over");
        st.housekeep(now + Duration::from_secs(15));
        assert_eq!(drain(&mut st, "w", 9).len(), 1);
    }

    #[test]
    fn session_expires_after_its_interval() {
        let mut st = state();
        let now = Instant::now();
        st.connect("e", Version::V5, false, 30, slot(1, None), now);
        sub(&mut st, "e", "t", opts(1));
        st.disconnected("e", 1, false, Some(10), now);
        st.housekeep(now + Duration::from_secs(9));
        assert!(st.sessions.contains_key("e"));
        st.housekeep(now + Duration::from_secs(10));
        assert!(!st.sessions.contains_key("e"));
        assert!(st.tree.is_empty());
    }

    #[test]
    fn expired_messages_are_dropped_from_queues() {
        let mut st = state();
        let now = Instant::now();
        st.connect("x", Version::V5, true, 0, slot(1, None), now);
        sub(&mut st, "x", "t", opts(1));
        let mut m = Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"old"),
            qos: 1,
            retain: false,
            props: None,
            expires: Some(now + Duration::from_secs(1)),
            origin: None,
        };
        st.publish(Arc::new(m), now);
        m = Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"new"),
            qos: 1,
            retain: false,
            props: None,
            expires: None,
            origin: None,
        };
        st.publish(Arc::new(m), now);
        let got = st
            .take_deliverable("x", 1, now + Duration::from_secs(2))
            .expect("owner");
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn inbound_qos2_ids_survive_reconnects_until_released() {
        let mut st = state();
        let now = Instant::now();
        st.connect("q", Version::V311, false, NEVER_EXPIRES, slot(1, None), now);
        assert!(st.qos2_first("q", 7));
        st.disconnected("q", 1, true, None, now);
        st.connect("q", Version::V311, false, NEVER_EXPIRES, slot(2, None), now);
        assert!(
            !st.qos2_first("q", 7),
            "resend after reconnect is not routed again"
        );
        st.qos2_release("q", 7);
        assert!(st.qos2_first("q", 7));
    }
}
