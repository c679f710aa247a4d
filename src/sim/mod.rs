//! The built-in DLMS/COSEM meter simulator (`dlms-bridge simulate`, tests, benchmarks).
//!
//! Each simulated meter listens on one TCP port and serves, over HDLC or the IEC 62056-47
//! wrapper, a small LN-referencing meter: the five default registers with realistic, changing
//! values, a clock, a relay Data object (settable, for RPC tests), the logical device name and
//! the association's object list (large enough to need GET block transfer with small PDUs).
//! Public client 16 associates without authentication; other clients need the LLS password when
//! one is configured. Optional fault injection (reply delay, dropped connections, swallowed
//! requests) lets poller tests exercise timeouts and reconnects without a third-party meter.
//!
//! One task per connection, no thread per meter: a thousand meters fit in one process. The
//! request handling ([`Session::handle`]) is synchronous and I/O-free; only [`serve`] touches
//! sockets. It must not block the runtime or share state between meters.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{DlmsTransport, Secret};
use crate::dlms::apdu::{Conformance, Data, DataAccessResult};
pub mod profile;

use crate::sources::meters::link::{
    HdlcServer, HdlcServerConfig, LinkParams, ServerLink, WrapperServer, WrapperServerConfig,
};

/// The public client SAP: may always associate without authentication.
pub const PUBLIC_CLIENT: u16 = 16;

/// Default largest APDU the simulator sends or accepts (bytes).
pub const DEFAULT_MAX_PDU: u16 = 1024;

/// Services the simulator grants (intersected with what the client proposes).
const SERVER_CONFORMANCE: u32 = Conformance::BLOCK_TRANSFER_WITH_GET
    | Conformance::MULTIPLE_REFERENCES
    | Conformance::GET
    | Conformance::SET
    | Conformance::ACTION;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address we tried.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("accept failed")]
    Accept(#[source] std::io::Error),
    /// A port number past 65535 was asked for.
    #[error("port range starting at {base} does not fit {count} meters")]
    PortRange {
        /// First port.
        base: u16,
        /// Number of meters.
        count: usize,
    },
}

/// How one simulated meter behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// HDLC or wrapper framing.
    pub transport: DlmsTransport,
    /// Logical device (HDLC upper address, wrapper destination wPort).
    pub logical: u16,
    /// Physical device (HDLC lower address).
    pub physical: u16,
    /// Answer whatever server address a client uses.
    pub any_address: bool,
    /// LLS password required from every client but the public one; `None` = no authentication.
    pub password: Option<Vec<u8>>,
    /// HDLC limits offered in UA (max information field, window).
    pub hdlc: LinkParams,
    /// Largest APDU the meter sends; longer GET responses use block transfer.
    pub max_pdu: u16,
    /// Scaler of the active energy register (Wh).
    pub energy_scaler: i8,
    /// Makes values differ between meters (start energy, phase of the swings).
    pub seed: u64,
    /// Fault injection: wait this long before every response.
    pub reply_delay: Duration,
    /// Fault injection: close the connection instead of answering every K-th request of this
    /// meter (all connections counted); 0 = never.
    pub drop_every: u64,
    /// Fault injection: silently swallow every K-th request of this meter; 0 = never.
    pub no_reply_every: u64,
    /// The load profile 1.0.99.1.0.255 the meter serves; `None` = no such object.
    pub profile: Option<profile::LoadProfile>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            transport: DlmsTransport::Hdlc,
            logical: 1,
            physical: 17,
            any_address: false,
            password: None,
            hdlc: LinkParams::default(),
            max_pdu: DEFAULT_MAX_PDU,
            energy_scaler: 0,
            seed: 0,
            reply_delay: Duration::ZERO,
            drop_every: 0,
            no_reply_every: 0,
            profile: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Object model
// ---------------------------------------------------------------------------------------------

/// The default registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    /// 1.0.32.7.0.255, V, scaler -1.
    Voltage,
    /// 1.0.31.7.0.255, A, scaler -2.
    Current,
    /// 1.0.14.7.0.255, Hz, scaler -2.
    Frequency,
    /// 1.0.1.7.0.255, W, scaler 0.
    Power,
    /// 1.0.1.8.0.255, Wh, configurable scaler.
    Energy,
}

/// The COSEM objects a simulated meter has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    /// A class-3 register.
    Register(Reg),
    /// Class 8 clock, 0.0.1.0.0.255.
    Clock,
    /// Class 1 Data 0.0.96.3.10.255: relay state, settable.
    Relay,
    /// Class 1 Data 0.0.42.0.0.255: logical device name.
    DeviceName,
    /// Class 15 Association LN 0.0.40.0.0.255.
    Association,
}

/// Every object: logical name, class id, version, object.
const OBJECTS: [([u8; 6], u16, u8, Object); 9] = [
    ([1, 0, 32, 7, 0, 255], 3, 0, Object::Register(Reg::Voltage)),
    ([1, 0, 31, 7, 0, 255], 3, 0, Object::Register(Reg::Current)),
    (
        [1, 0, 14, 7, 0, 255],
        3,
        0,
        Object::Register(Reg::Frequency),
    ),
    ([1, 0, 1, 7, 0, 255], 3, 0, Object::Register(Reg::Power)),
    ([1, 0, 1, 8, 0, 255], 3, 0, Object::Register(Reg::Energy)),
    ([0, 0, 1, 0, 0, 255], 8, 0, Object::Clock),
    ([0, 0, 96, 3, 10, 255], 1, 0, Object::Relay),
    ([0, 0, 42, 0, 0, 255], 1, 0, Object::DeviceName),
    ([0, 0, 40, 0, 0, 255], 15, 1, Object::Association),
];

/// Physical unit codes (Blue Book).
const UNIT_V: u8 = 35;
const UNIT_A: u8 = 33;
const UNIT_HZ: u8 = 44;
const UNIT_W: u8 = 27;
const UNIT_WH: u8 = 30;

fn find(class_id: u16, obis: &[u8; 6]) -> Result<Object, DataAccessResult> {
    match OBJECTS.iter().find(|(ln, ..)| ln == obis) {
        None => Err(DataAccessResult::ObjectUndefined),
        Some((_, class, ..)) if *class != class_id => {
            Err(DataAccessResult::ObjectClassInconsistent)
        }
        Some((.., object)) => Ok(*object),
    }
}

/// State one meter shares between its connections.
#[derive(Debug)]
pub struct MeterState {
    /// When the meter started; values are functions of the time since.
    start: Instant,
    /// Energy register at start-up (Wh).
    energy_start_wh: f64,
    /// Phase offset of the value swings, from the seed.
    phase: f64,
    /// Energy register scaler.
    energy_scaler: i8,
    /// Current relay value (SET by RPC tests).
    relay: Mutex<Data>,
    /// Seed for per-connection jitter.
    seed: u64,
    /// Requests received on all connections, for the fault-injection counters.
    requests: AtomicU64,
}

/// Mean active power the energy register integrates (W).
const MEAN_POWER_W: f64 = 1100.0;
/// Relative swing of the active power.
const POWER_SWING: f64 = 0.15;
/// Period-ish of the power swing (s): `sin(t / POWER_SWING_TAU_S)`.
const POWER_SWING_TAU_S: f64 = 60.0;

impl MeterState {
    /// A meter starting now.
    pub fn new(opts: &SimOptions) -> Self {
        let s = opts.seed;
        Self {
            start: Instant::now(),
            energy_start_wh: 1_250_000.0 + (s % 1000) as f64 * 3_517.0,
            phase: (s % 628) as f64 / 100.0,
            energy_scaler: opts.energy_scaler,
            relay: Mutex::new(Data::Bool(true)),
            seed: s,
            requests: AtomicU64::new(0),
        }
    }

    fn power_w(&self, t: f64) -> f64 {
        MEAN_POWER_W * (1.0 + POWER_SWING * (t / POWER_SWING_TAU_S + self.phase).sin())
    }

    /// Energy in Wh: the exact integral of [`MeterState::power_w`], so it never decreases.
    fn energy_wh(&self, t: f64) -> f64 {
        let tau = POWER_SWING_TAU_S;
        let integral = MEAN_POWER_W
            * (t - POWER_SWING * tau * ((t / tau + self.phase).cos() - self.phase.cos()));
        self.energy_start_wh + integral / 3600.0
    }

    fn register(&self, reg: Reg, jitter: f64) -> (Data, i8, u8) {
        let t = self.start.elapsed().as_secs_f64();
        let p = self.power_w(t) * (1.0 + 0.01 * jitter);
        match reg {
            Reg::Voltage => {
                let v = 230.0 + 3.0 * (t / 20.0 + self.phase).sin() + 0.4 * jitter;
                (Data::U16(to_u16(v * 10.0)), -1, UNIT_V)
            }
            Reg::Current => {
                let v = 230.0 + 3.0 * (t / 20.0 + self.phase).sin();
                (Data::U16(to_u16(p / (v * 0.95) * 100.0)), -2, UNIT_A)
            }
            Reg::Frequency => {
                let f = 50.0 + 0.03 * (t / 7.0 + self.phase).sin() + 0.01 * jitter;
                (Data::U16(to_u16(f * 100.0)), -2, UNIT_HZ)
            }
            Reg::Power => (Data::I32(p.round() as i32), 0, UNIT_W),
            Reg::Energy => {
                let scaled = self.energy_wh(t) / 10f64.powi(i32::from(self.energy_scaler));
                (
                    Data::U32(scaled.floor().clamp(0.0, f64::from(u32::MAX)) as u32),
                    self.energy_scaler,
                    UNIT_WH,
                )
            }
        }
    }

    fn device_name(&self) -> Vec<u8> {
        format!("DLB{:013}", self.seed % 10_000_000_000_000).into_bytes()
    }
}

fn to_u16(v: f64) -> u16 {
    v.round().clamp(0.0, f64::from(u16::MAX)) as u16
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Current UTC time as a COSEM date-time (deviation 0, status ok).
fn now_date_time() -> [u8; 12] {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) + 1; // 1970-01-01 was a Thursday; Monday = 1
    let year = u16::try_from(y).unwrap_or(0xFFFF).to_be_bytes();
    [
        year[0],
        year[1],
        m as u8,
        d as u8,
        weekday as u8,
        (tod / 3600) as u8,
        (tod / 60 % 60) as u8,
        (tod % 60) as u8,
        (since.subsec_millis() / 10) as u8,
        0x00,
        0x00,
        0x00,
    ]
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------
// APDU handling (server side)
// ---------------------------------------------------------------------------------------------

/// Bounds-checked cursor over a request.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn len(&mut self) -> Option<usize> {
        let first = self.u8()?;
        if first < 0x80 {
            return Some(usize::from(first));
        }
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return None;
        }
        Some(
            self.take(n)?
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
        )
    }
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
    fn data(&mut self) -> Option<Data> {
        let (d, used) = Data::decode(self.rest()).ok()?;
        self.pos += used;
        Some(d)
    }
    /// class id, logical name, attribute or method id.
    fn descriptor(&mut self) -> Option<(u16, [u8; 6], u8)> {
        let class = self.u16()?;
        let ln: [u8; 6] = self.take(6)?.try_into().ok()?;
        Some((class, ln, self.u8()?))
    }
    /// An optional selective access: `Some(None)` when absent, `Some(Some((selector,
    /// parameters)))` when present, `None` when malformed.
    fn access_selection(&mut self) -> Option<Option<(u8, Data)>> {
        match self.u8()? {
            0 => Some(None),
            _ => {
                let selector = self.u8()?;
                Some(Some((selector, self.data()?)))
            }
        }
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xFF {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&(n.min(0xFFFF) as u16).to_be_bytes());
    }
}

fn dar_code(r: DataAccessResult) -> u8 {
    match r {
        DataAccessResult::Success => 0,
        DataAccessResult::HardwareFault => 1,
        DataAccessResult::TemporaryFailure => 2,
        DataAccessResult::ReadWriteDenied => 3,
        DataAccessResult::ObjectUndefined => 4,
        DataAccessResult::ObjectClassInconsistent => 9,
        DataAccessResult::ObjectUnavailable => 11,
        DataAccessResult::TypeUnmatched => 12,
        DataAccessResult::ScopeOfAccessViolated => 13,
        DataAccessResult::DataBlockUnavailable => 14,
        DataAccessResult::LongGetAborted => 15,
        DataAccessResult::NoLongGetInProgress => 16,
        DataAccessResult::LongSetAborted => 17,
        DataAccessResult::NoLongSetInProgress => 18,
        DataAccessResult::DataBlockNumberInvalid => 19,
        DataAccessResult::OtherReason => 250,
        DataAccessResult::Unknown(v) => v,
    }
}

/// exception-response: state-error service-not-allowed (1), service-error operation-not-possible (1).
const EXCEPTION_NOT_ASSOCIATED: [u8; 3] = [0xD8, 0x01, 0x01];
/// exception-response: state-error service-unknown (2), service-error service-not-supported (2).
const EXCEPTION_UNSUPPORTED: [u8; 3] = [0xD8, 0x02, 0x02];
/// exception-response: state-error service-not-allowed (1), service-error other-reason (3).
const EXCEPTION_MALFORMED: [u8; 3] = [0xD8, 0x01, 0x03];

/// RLRE, reason normal.
const RLRE: [u8; 5] = [0x63, 0x03, 0x80, 0x01, 0x00];

/// An open application association.
#[derive(Debug, Clone, Copy)]
struct Association {
    /// Largest APDU we may send.
    max_pdu: usize,
    /// Granted services.
    conformance: u32,
}

/// A GET block transfer in progress.
#[derive(Debug)]
struct Transfer {
    /// Invoke-id-and-priority byte of the request.
    invoke: u8,
    /// The complete encoded result being sent in blocks.
    raw: Vec<u8>,
    /// Bytes of `raw` already sent.
    sent: usize,
    /// Number of the last block sent.
    block: u32,
}

/// One connection's DLMS state: association, block transfer, jitter source.
#[derive(Debug)]
pub struct Session {
    /// The meter this session talks to.
    meter: Arc<MeterState>,
    /// Our options (password, PDU limit).
    opts: Arc<SimOptions>,
    /// Open association, if any.
    association: Option<Association>,
    /// GET block transfer in progress, if any.
    transfer: Option<Transfer>,
    /// xorshift state for measurement jitter.
    rng: u64,
}

impl Session {
    /// A session with no association yet.
    pub fn new(meter: Arc<MeterState>, opts: Arc<SimOptions>) -> Self {
        let rng = meter.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Self {
            meter,
            opts,
            association: None,
            transfer: None,
            rng,
        }
    }

    /// Drops the association (HDLC DISC or a new connection).
    pub fn reset(&mut self) {
        self.association = None;
        self.transfer = None;
    }

    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// Answers one request APDU from client `client_sap`.
    pub fn handle(&mut self, client_sap: u16, req: &[u8]) -> Vec<u8> {
        match req.first() {
            Some(0x60) => self.aarq(client_sap, req),
            Some(0x62) => {
                self.reset();
                RLRE.to_vec()
            }
            Some(0xC0 | 0xC1 | 0xC3) if self.association.is_none() => {
                EXCEPTION_NOT_ASSOCIATED.to_vec()
            }
            Some(0xC0) => self
                .get(req)
                .unwrap_or_else(|| EXCEPTION_MALFORMED.to_vec()),
            Some(0xC1) => self
                .set(req)
                .unwrap_or_else(|| EXCEPTION_MALFORMED.to_vec()),
            Some(0xC3) => self
                .action(req)
                .unwrap_or_else(|| EXCEPTION_MALFORMED.to_vec()),
            _ => EXCEPTION_UNSUPPORTED.to_vec(),
        }
    }

    fn aarq(&mut self, client_sap: u16, req: &[u8]) -> Vec<u8> {
        self.reset();
        let Some(aarq) = parse_aarq(req) else {
            return aare_reject(1, 1);
        };
        if !aarq.ln_context {
            return aare_reject(1, 2);
        }
        let lls = aarq.mechanism_lls;
        if let Some(expected) = &self.opts.password {
            if client_sap != PUBLIC_CLIENT || lls {
                if !lls {
                    return aare_reject(1, 14); // authentication-required
                }
                if aarq.password.as_deref() != Some(expected.as_slice()) {
                    return aare_reject(1, 13); // authentication-failure
                }
            }
        }
        let Some(initiate) = aarq.initiate else {
            return aare_reject(1, 1);
        };
        let max_pdu = match initiate.max_receive_pdu {
            0 => usize::from(self.opts.max_pdu),
            n => usize::from(n.min(self.opts.max_pdu)),
        }
        .max(32);
        let offered = if self.opts.profile.is_some() {
            SERVER_CONFORMANCE | Conformance::SELECTIVE_ACCESS
        } else {
            SERVER_CONFORMANCE
        };
        let conformance = initiate.conformance & offered;
        self.association = Some(Association {
            max_pdu,
            conformance,
        });
        aare_accept(conformance, self.opts.max_pdu, lls)
    }

    fn get(&mut self, req: &[u8]) -> Option<Vec<u8>> {
        let mut c = Cursor::new(req);
        c.u8()?;
        let choice = c.u8()?;
        let invoke = c.u8()?;
        match choice {
            1 => {
                let (class, ln, attr) = c.descriptor()?;
                let selection = c.access_selection()?;
                self.transfer = None;
                let mut raw = Vec::with_capacity(16);
                self.read(class, &ln, attr, selection.as_ref(), &mut raw);
                // raw = get-data-result; block transfer carries the bare data
                let mut out = vec![0xC4, 0x01, invoke];
                out.extend_from_slice(&raw);
                if out.len() <= self.max_pdu() || raw[0] != 0 {
                    return Some(out);
                }
                raw.remove(0);
                Some(self.start_transfer(invoke, raw))
            }
            2 => {
                let block = c.u32()?;
                Some(self.next_block(invoke, block))
            }
            3 => {
                let n = c.len()?;
                if n > c.rest().len() {
                    return None;
                }
                self.transfer = None;
                let mut raw = Vec::with_capacity(2 + n * 8);
                put_len(&mut raw, n);
                for _ in 0..n {
                    let (class, ln, attr) = c.descriptor()?;
                    let selection = c.access_selection()?;
                    self.read(class, &ln, attr, selection.as_ref(), &mut raw);
                }
                let mut out = vec![0xC4, 0x03, invoke];
                out.extend_from_slice(&raw);
                if out.len() <= self.max_pdu() {
                    return Some(out);
                }
                Some(self.start_transfer(invoke, raw))
            }
            _ => Some(EXCEPTION_UNSUPPORTED.to_vec()),
        }
    }

    fn max_pdu(&self) -> usize {
        self.association
            .map_or(usize::from(DEFAULT_MAX_PDU), |a| a.max_pdu)
    }

    fn start_transfer(&mut self, invoke: u8, raw: Vec<u8>) -> Vec<u8> {
        let granted = self
            .association
            .is_some_and(|a| a.conformance & Conformance::BLOCK_TRANSFER_WITH_GET != 0);
        if !granted {
            // Without block transfer the answer cannot be delivered.
            return vec![0xC4, 0x01, invoke, 0x01, 15]; // long-get-aborted
        }
        self.transfer = Some(Transfer {
            invoke,
            raw,
            sent: 0,
            block: 0,
        });
        self.next_block(invoke, 0)
    }

    fn next_block(&mut self, invoke: u8, acked: u32) -> Vec<u8> {
        let max_pdu = self.max_pdu();
        let Some(t) = self.transfer.as_mut() else {
            return block_error(invoke, acked, DataAccessResult::NoLongGetInProgress);
        };
        if acked != t.block || invoke & 0x0F != t.invoke & 0x0F {
            let block = t.block;
            self.transfer = None;
            return block_error(invoke, block, DataAccessResult::DataBlockNumberInvalid);
        }
        // C4 02 invoke last block(4) 00 len(<=3)
        let room = max_pdu.saturating_sub(12).max(1);
        let end = (t.sent + room).min(t.raw.len());
        let last = end == t.raw.len();
        t.block += 1;
        let mut out = Vec::with_capacity(12 + end - t.sent);
        out.extend_from_slice(&[0xC4, 0x02, invoke, u8::from(last)]);
        out.extend_from_slice(&t.block.to_be_bytes());
        out.push(0x00);
        put_len(&mut out, end - t.sent);
        out.extend_from_slice(&t.raw[t.sent..end]);
        t.sent = end;
        if last {
            self.transfer = None;
        }
        out
    }

    /// Appends a Get-Data-Result for one attribute (read with `selection`, if any).
    fn read(
        &mut self,
        class: u16,
        ln: &[u8; 6],
        attr: u8,
        selection: Option<&(u8, Data)>,
        out: &mut Vec<u8>,
    ) {
        let value = match self.opts.profile {
            Some(p) if *ln == profile::LN => {
                if class == profile::CLASS {
                    p.attribute(attr, selection, unix_ms_now())
                } else {
                    Err(DataAccessResult::ObjectClassInconsistent)
                }
            }
            _ => self.value(class, ln, attr),
        };
        match value {
            Ok(data) => {
                out.push(0x00);
                data.encode(out);
            }
            Err(e) => out.extend_from_slice(&[0x01, dar_code(e)]),
        }
    }

    fn value(&mut self, class: u16, ln: &[u8; 6], attr: u8) -> Result<Data, DataAccessResult> {
        let object = find(class, ln)?;
        if attr == 1 {
            return Ok(Data::OctetString(ln.to_vec()));
        }
        match (object, attr) {
            (Object::Register(reg), 2) => {
                let jitter = self.jitter();
                Ok(self.meter.register(reg, jitter).0)
            }
            (Object::Register(reg), 3) => {
                let (_, scaler, unit) = self.meter.register(reg, 0.0);
                Ok(Data::Structure(vec![Data::I8(scaler), Data::Enum(unit)]))
            }
            (Object::Clock, 2) => Ok(Data::OctetString(now_date_time().to_vec())),
            (Object::Clock, 3) => Ok(Data::I16(0)),
            (Object::Clock, 4) => Ok(Data::U8(0)),
            (Object::Relay, 2) => Ok(self
                .meter
                .relay
                .lock()
                .map(|v| v.clone())
                .unwrap_or(Data::Null)),
            (Object::DeviceName, 2) => Ok(Data::OctetString(self.meter.device_name())),
            (Object::Association, 2) => Ok(object_list(self.opts.profile.is_some())),
            _ => Err(DataAccessResult::ReadWriteDenied),
        }
    }

    fn set(&mut self, req: &[u8]) -> Option<Vec<u8>> {
        let mut c = Cursor::new(req);
        c.u8()?;
        if c.u8()? != 1 {
            return Some(EXCEPTION_UNSUPPORTED.to_vec());
        }
        let invoke = c.u8()?;
        let (class, ln, attr) = c.descriptor()?;
        c.access_selection()?;
        let value = c.data()?;
        let result = match find(class, &ln) {
            Err(e) => e,
            Ok(Object::Relay) if attr == 2 => match self.meter.relay.lock() {
                Ok(mut relay) => {
                    tracing::debug!(value = %value, "Relay set.");
                    *relay = value;
                    DataAccessResult::Success
                }
                Err(_) => DataAccessResult::HardwareFault,
            },
            // Accepted and ignored: the simulated clock follows the host.
            Ok(Object::Clock) if attr == 2 => DataAccessResult::Success,
            Ok(_) => DataAccessResult::ReadWriteDenied,
        };
        Some(vec![0xC5, 0x01, invoke, dar_code(result)])
    }

    fn action(&mut self, req: &[u8]) -> Option<Vec<u8>> {
        let mut c = Cursor::new(req);
        c.u8()?;
        if c.u8()? != 1 {
            return Some(EXCEPTION_UNSUPPORTED.to_vec());
        }
        let invoke = c.u8()?;
        let (class, ln, method) = c.descriptor()?;
        if c.u8()? != 0 {
            c.data()?;
        }
        let result = match find(class, &ln) {
            Err(e) => e,
            Ok(_) => {
                tracing::debug!(class, method, "Action accepted.");
                DataAccessResult::Success
            }
        };
        // action-response-normal, no return parameters
        Some(vec![0xC7, 0x01, invoke, dar_code(result), 0x00])
    }
}

fn block_error(invoke: u8, block: u32, e: DataAccessResult) -> Vec<u8> {
    let mut out = vec![0xC4, 0x02, invoke, 0x01];
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(&[0x01, dar_code(e)]);
    out
}

/// The Association LN object list (attribute 2): one structure per object, the load profile
/// included when the meter has one.
fn object_list(with_profile: bool) -> Data {
    let profile = with_profile.then_some((profile::LN, profile::CLASS, 1));
    let mut items = Vec::with_capacity(OBJECTS.len() + 1);
    let objects = OBJECTS
        .iter()
        .map(|(ln, class, version, _)| (*ln, *class, *version));
    for (ln, class, version) in objects.chain(profile) {
        let attrs = match class {
            3 => 3,
            7 => 8,
            8 => 4,
            15 => 2,
            _ => 2,
        };
        let attr_access = (1..=attrs)
            .map(|a| {
                let writable = (class == 1 && ln == [0, 0, 96, 3, 10, 255] && a == 2)
                    || (class == 8 && a == 2);
                Data::Structure(vec![
                    Data::I8(a),
                    Data::Enum(if writable { 3 } else { 1 }),
                    Data::Null,
                ])
            })
            .collect();
        items.push(Data::Structure(vec![
            Data::U16(class),
            Data::U8(version),
            Data::OctetString(ln.to_vec()),
            Data::Structure(vec![Data::Array(attr_access), Data::Array(Vec::new())]),
        ]));
    }
    Data::Array(items)
}

/// What we need from an AARQ.
#[derive(Debug, Default)]
struct Aarq {
    /// Application context is LN without ciphering.
    ln_context: bool,
    /// Mechanism name is low-level security.
    mechanism_lls: bool,
    /// calling-authentication-value (LLS password).
    password: Option<Vec<u8>>,
    /// The xDLMS initiate-request.
    initiate: Option<Initiate>,
}

/// What we need from an xDLMS InitiateRequest.
#[derive(Debug, Clone, Copy)]
struct Initiate {
    /// Proposed conformance block (24 bits).
    conformance: u32,
    /// client-max-receive-pdu-size.
    max_receive_pdu: u16,
}

fn parse_aarq(req: &[u8]) -> Option<Aarq> {
    let mut c = Cursor::new(req);
    c.u8()?;
    let len = c.len()?;
    let mut body = Cursor::new(c.take(len)?);
    let mut aarq = Aarq::default();
    while !body.rest().is_empty() {
        let tag = body.u8()?;
        let len = body.len()?;
        let v = body.take(len)?;
        match tag {
            0xA1 => aarq.ln_context = v == [0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01],
            0x8B => aarq.mechanism_lls = v == [0x60, 0x85, 0x74, 0x05, 0x08, 0x02, 0x01],
            0xAC => {
                let mut f = Cursor::new(v);
                if f.u8()? == 0x80 {
                    let n = f.len()?;
                    aarq.password = Some(f.take(n)?.to_vec());
                }
            }
            0xBE => {
                let mut f = Cursor::new(v);
                if f.u8()? != 0x04 {
                    return None;
                }
                let n = f.len()?;
                aarq.initiate = parse_initiate(f.take(n)?);
            }
            _ => {}
        }
    }
    Some(aarq)
}

fn parse_initiate(buf: &[u8]) -> Option<Initiate> {
    let mut c = Cursor::new(buf);
    if c.u8()? != 0x01 {
        return None;
    }
    if c.u8()? != 0 {
        let n = c.len()?; // dedicated-key
        c.take(n)?;
    }
    if c.u8()? != 0 {
        c.u8()?; // response-allowed
    }
    if c.u8()? != 0 {
        c.u8()?; // proposed-quality-of-service
    }
    let _version = c.u8()?;
    if c.take(2)? != [0x5F, 0x1F] {
        return None;
    }
    let n = c.len()?;
    let bits = c.take(n)?;
    let conformance = bits
        .iter()
        .skip(1)
        .take(3)
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    let max_receive_pdu = c.u16()?;
    Some(Initiate {
        conformance,
        max_receive_pdu,
    })
}

const CONTEXT_LN: [u8; 11] = [
    0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01,
];

fn aare_accept(conformance: u32, max_pdu: u16, lls: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&CONTEXT_LN);
    body.extend_from_slice(&[0xA2, 0x03, 0x02, 0x01, 0x00]);
    body.extend_from_slice(&[0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, 0x00]);
    if lls {
        body.extend_from_slice(&[0x88, 0x02, 0x07, 0x80]);
        body.extend_from_slice(&[0x89, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x02, 0x01]);
    }
    let c = conformance.to_be_bytes();
    let pdu = max_pdu.to_be_bytes();
    let initiate = [
        0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00, c[1], c[2], c[3], pdu[0], pdu[1], 0x00, 0x07,
    ];
    body.extend_from_slice(&[0xBE, initiate.len() as u8 + 2, 0x04, initiate.len() as u8]);
    body.extend_from_slice(&initiate);
    let mut out = vec![0x61];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn aare_reject(result: u8, diagnostic: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(&CONTEXT_LN);
    body.extend_from_slice(&[0xA2, 0x03, 0x02, 0x01, result]);
    body.extend_from_slice(&[0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, diagnostic]);
    let mut out = vec![0x61];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// Serves one simulated meter on `listener` until `cancel` fires; one task per connection.
pub async fn serve(
    listener: TcpListener,
    opts: SimOptions,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let opts = Arc::new(opts);
    let meter = Arc::new(MeterState::new(&opts));
    let connections = TaskTracker::new();
    let result = loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_transient_accept_error(&e) => {
                tracing::warn!(error = %e, "Accept failed; continuing.");
                continue;
            }
            Err(e) => break Err(Error::Accept(e)),
        };
        let span = tracing::debug_span!("sim_conn", %peer);
        connections.spawn(
            serve_connection(stream, meter.clone(), opts.clone(), cancel.clone()).instrument(span),
        );
    };
    connections.close();
    connections.wait().await;
    result
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE: out of descriptors, retry later
}

async fn serve_connection(
    stream: TcpStream,
    meter: Arc<MeterState>,
    opts: Arc<SimOptions>,
    cancel: CancellationToken,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "Could not disable Nagle.");
    }
    let mut link = match opts.transport {
        DlmsTransport::Hdlc => ServerLink::Hdlc(HdlcServer::new(
            stream,
            HdlcServerConfig {
                logical: opts.logical,
                physical: opts.physical,
                limits: opts.hdlc,
                any_address: opts.any_address,
            },
        )),
        DlmsTransport::Wrapper => ServerLink::Wrapper(WrapperServer::new(
            stream,
            WrapperServerConfig {
                logical: opts.logical,
                any_address: opts.any_address,
            },
        )),
    };
    let faults = opts.clone();
    let counter = meter.clone();
    let mut session = Session::new(meter, opts);
    tracing::debug!("Simulated meter connection opened.");
    loop {
        let request = tokio::select! {
            () = cancel.cancelled() => break,
            r = link.next_request() => r,
        };
        match request {
            Ok(Some(req)) => {
                let n = counter.requests.fetch_add(1, Ordering::Relaxed) + 1;
                if faults.drop_every > 0 && n % faults.drop_every == 0 {
                    tracing::debug!(request = n, "Dropping the connection (fault injection).");
                    break;
                }
                if faults.no_reply_every > 0 && n % faults.no_reply_every == 0 {
                    tracing::debug!(request = n, "Swallowing a request (fault injection).");
                    continue;
                }
                let resp = session.handle(link.client_sap(), &req);
                if !faults.reply_delay.is_zero() {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(faults.reply_delay) => {}
                    }
                }
                if let Err(e) = link.respond(&resp).await {
                    tracing::debug!(error = %e, "Response failed; closing.");
                    break;
                }
            }
            Ok(None) if link.is_closed() => break,
            Ok(None) => session.reset(), // DISC: the stream stays for a new SNRM
            Err(e) => {
                tracing::debug!(error = %e, "Link failed; closing.");
                break;
            }
        }
    }
    tracing::debug!("Simulated meter connection closed.");
}

/// Starts `count` simulated meters on `host`, on consecutive ports from `base_port`, or on
/// ephemeral ports when `base_port` is 0. Meter `i` gets `opts.seed + i`. Returns the bound
/// addresses in order; the meters run on `tracker` until `cancel` fires.
pub async fn spawn_meters(
    host: IpAddr,
    base_port: u16,
    count: usize,
    opts: &SimOptions,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Vec<SocketAddr>, Error> {
    if base_port != 0 && usize::from(base_port) + count > usize::from(u16::MAX) + 1 {
        return Err(Error::PortRange {
            base: base_port,
            count,
        });
    }
    let mut addrs = Vec::with_capacity(count);
    let mut listeners = Vec::with_capacity(count);
    for i in 0..count {
        let port = if base_port == 0 {
            0
        } else {
            base_port + u16::try_from(i).expect("range checked above")
        };
        let addr = SocketAddr::new(host, port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        addrs.push(
            listener
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?,
        );
        listeners.push(listener);
    }
    for (i, listener) in listeners.into_iter().enumerate() {
        let opts = SimOptions {
            seed: opts.seed.wrapping_add(i as u64),
            ..opts.clone()
        };
        let cancel = cancel.clone();
        let addr = addrs[i];
        tracker.spawn(async move {
            if let Err(e) = serve(listener, opts, cancel).await {
                tracing::error!(%addr, error = %e, "Simulated meter stopped.");
            }
        });
    }
    Ok(addrs)
}

/// Arguments of `dlms-bridge simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on (loopback by default; a LAN address exposes the meters).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// First TCP port; meter i listens on port + i. 0 = ephemeral ports (printed at start).
    #[arg(long, default_value_t = 4059)]
    pub port: u16,
    /// Number of meters.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Link layer: `hdlc` or `wrapper`.
    #[arg(long, default_value = "hdlc", value_parser = parse_transport)]
    pub transport: DlmsTransport,
    /// Server logical device address (HDLC upper address; wrapper destination port).
    #[arg(long, default_value_t = 1)]
    pub logical_address: u16,
    /// Server physical device address (HDLC lower address).
    #[arg(long, default_value_t = 17)]
    pub physical_address: u16,
    /// Answer any server address.
    #[arg(long)]
    pub any_address: bool,
    /// LLS password required from every client except the public client 16.
    #[arg(long, env = "DLMS_BRIDGE_SIM_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub password: Option<Secret>,
    /// Largest HDLC information field the meters accept and send.
    #[arg(long, default_value_t = 128)]
    pub max_info: usize,
    /// HDLC window size the meters offer (1..=7).
    #[arg(long, default_value_t = 1)]
    pub window: u8,
    /// Largest APDU the meters send; longer GET responses use block transfer.
    #[arg(long, default_value_t = DEFAULT_MAX_PDU)]
    pub pdu_size: u16,
    /// Scaler of the active energy register.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub energy_scaler: i8,
    /// Seed that makes values differ between runs and meters.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fault injection: delay before every response, e.g. `50ms`.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration, default_value = "0s")]
    pub delay: Duration,
    /// Fault injection: close the connection instead of answering every K-th request (0 = never).
    #[arg(long, default_value_t = 0)]
    pub drop_every: u64,
    /// Fault injection: swallow every K-th request (0 = never).
    #[arg(long, default_value_t = 0)]
    pub no_reply_every: u64,
    /// Serve a load profile 1.0.99.1.0.255 (clock and active energy) of N entries ending at the
    /// last whole capture period (0 = none); read whole, by range or by entry.
    #[arg(long, default_value_t = 0)]
    pub profile_rows: u32,
    /// Capture period of the load profile in seconds.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u32).range(1..))]
    pub profile_period: u32,
}

fn parse_transport(s: &str) -> Result<DlmsTransport, String> {
    match s {
        "hdlc" => Ok(DlmsTransport::Hdlc),
        "wrapper" => Ok(DlmsTransport::Wrapper),
        other => Err(format!("`{other}` is not `hdlc` or `wrapper`")),
    }
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

impl SimulateArgs {
    /// The per-meter options these arguments describe.
    pub fn options(&self) -> SimOptions {
        SimOptions {
            transport: self.transport,
            logical: self.logical_address,
            physical: self.physical_address,
            any_address: self.any_address,
            password: self
                .password
                .as_ref()
                .filter(|p| !p.is_empty())
                .map(|p| p.expose().as_bytes().to_vec()),
            hdlc: LinkParams {
                max_info_tx: self.max_info,
                max_info_rx: self.max_info,
                window_tx: self.window,
                window_rx: self.window,
            },
            max_pdu: self.pdu_size,
            energy_scaler: self.energy_scaler,
            seed: self.seed,
            reply_delay: self.delay,
            drop_every: self.drop_every,
            no_reply_every: self.no_reply_every,
            profile: (self.profile_rows > 0).then_some(profile::LoadProfile {
                rows: self.profile_rows,
                period_s: self.profile_period,
            }),
        }
    }
}

/// `dlms-bridge simulate`: serves the meters until `cancel` fires (the binary cancels on
/// SIGINT/SIGTERM), printing where they listen.
pub async fn simulate(args: SimulateArgs, cancel: CancellationToken) -> Result<(), Error> {
    let tracker = TaskTracker::new();
    let opts = args.options();
    let addrs = spawn_meters(
        args.host,
        args.port,
        args.count,
        &opts,
        &tracker,
        cancel.clone(),
    )
    .await;
    let addrs = match addrs {
        Ok(a) => a,
        Err(e) => {
            cancel.cancel();
            tracker.close();
            tracker.wait().await;
            return Err(e);
        }
    };
    let transport = match args.transport {
        DlmsTransport::Hdlc => "hdlc",
        DlmsTransport::Wrapper => "wrapper",
    };
    match (addrs.first(), addrs.last()) {
        (Some(first), Some(last)) if addrs.len() > 1 && args.port != 0 => println!(
            "Simulating {} {transport} meters on {}:{}-{}.",
            addrs.len(),
            first.ip(),
            first.port(),
            last.port()
        ),
        _ => {
            for addr in &addrs {
                println!("Simulating a {transport} meter on {addr}.");
            }
        }
    }
    tracker.close();
    cancel.cancelled().await;
    tracker.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlms::apdu::{self, AarqParams, AttrRef, GetResponse, MethodRef};
    use crate::dlms::obis::ObisCode;

    const VOLTAGE: ObisCode = ObisCode::new(1, 0, 32, 7, 0, 255);
    const ENERGY: ObisCode = ObisCode::new(1, 0, 1, 8, 0, 255);
    const RELAY: ObisCode = ObisCode::new(0, 0, 96, 3, 10, 255);
    const OBJECT_LIST: ObisCode = ObisCode::new(0, 0, 40, 0, 0, 255);

    fn session(opts: SimOptions) -> Session {
        let meter = Arc::new(MeterState::new(&opts));
        Session::new(meter, Arc::new(opts))
    }

    fn associate(s: &mut Session, client: u16, password: Option<&[u8]>, pdu: u16) -> apdu::Aare {
        let aarq = apdu::encode_aarq(&AarqParams {
            password,
            conformance: Conformance::CLIENT_PROPOSED,
            max_receive_pdu: pdu,
        });
        apdu::parse_aare(&s.handle(client, &aarq)).expect("accepted")
    }

    #[test]
    fn public_client_associates_and_reads_registers() {
        let mut s = session(SimOptions::default());
        let aare = associate(&mut s, 16, None, 1200);
        assert!(aare.conformance.has(Conformance::GET));
        assert!(!aare.conformance.has(Conformance::SELECTIVE_ACCESS));
        let resp = s.handle(
            16,
            &apdu::encode_get_normal(0xC1, &AttrRef::new(3, VOLTAGE, 2)),
        );
        let GetResponse::Normal {
            result: Ok(Data::U16(v)),
            ..
        } = apdu::parse_get_response(&resp).expect("parses")
        else {
            panic!("unexpected {resp:02x?}");
        };
        assert!((2200..=2400).contains(&v), "{v}");
        let resp = s.handle(
            16,
            &apdu::encode_get_normal(0xC2, &AttrRef::new(3, VOLTAGE, 3)),
        );
        assert_eq!(
            apdu::parse_get_response(&resp).expect("parses"),
            GetResponse::Normal {
                invoke: 0xC2,
                result: Ok(Data::Structure(vec![Data::I8(-1), Data::Enum(35)]))
            }
        );
    }

    #[test]
    fn requests_before_association_are_refused() {
        let mut s = session(SimOptions::default());
        let resp = s.handle(
            16,
            &apdu::encode_get_normal(0xC1, &AttrRef::new(3, VOLTAGE, 2)),
        );
        assert!(matches!(
            apdu::parse_get_response(&resp),
            Err(apdu::Error::Exception { .. })
        ));
    }

    #[test]
    fn lls_password_is_checked_for_non_public_clients() {
        let opts = SimOptions {
            password: Some(b"12345678".to_vec()),
            ..SimOptions::default()
        };
        let mut s = session(opts);
        associate(&mut s, 16, None, 512);
        associate(&mut s, 32, Some(b"12345678"), 512);
        for pw in [None, Some(&b"wrong"[..])] {
            let aarq = apdu::encode_aarq(&AarqParams {
                password: pw,
                conformance: Conformance::CLIENT_PROPOSED,
                max_receive_pdu: 512,
            });
            let err = apdu::parse_aare(&s.handle(32, &aarq)).expect_err("rejected");
            assert!(
                matches!(err, apdu::Error::AssociationRejected { diagnostic, .. } if diagnostic.is_authentication()),
                "{err:?}"
            );
        }
    }

    #[test]
    fn unknown_objects_and_wrong_classes_are_errors() {
        let mut s = session(SimOptions::default());
        associate(&mut s, 16, None, 512);
        let list = [
            AttrRef::new(3, ObisCode::new(1, 0, 99, 99, 0, 255), 2),
            AttrRef::new(1, VOLTAGE, 2),
            AttrRef::new(3, VOLTAGE, 9),
            AttrRef::new(3, ENERGY, 2),
        ];
        let resp = s.handle(16, &apdu::encode_get_with_list(0xC3, &list));
        let GetResponse::List { results, .. } = apdu::parse_get_response(&resp).expect("parses")
        else {
            panic!("not a list: {resp:02x?}");
        };
        assert_eq!(results[0], Err(DataAccessResult::ObjectUndefined));
        assert_eq!(results[1], Err(DataAccessResult::ObjectClassInconsistent));
        assert_eq!(results[2], Err(DataAccessResult::ReadWriteDenied));
        assert!(matches!(results[3], Ok(Data::U32(_))));
    }

    #[test]
    fn set_relay_then_read_back_and_action_succeeds() {
        let mut s = session(SimOptions::default());
        associate(&mut s, 16, None, 512);
        let attr = AttrRef::new(1, RELAY, 2);
        let resp = s.handle(
            16,
            &apdu::encode_set_normal(0xC1, &attr, &Data::Bool(false)),
        );
        assert_eq!(
            apdu::parse_set_response(&resp).expect("parses"),
            (0xC1, DataAccessResult::Success)
        );
        let resp = s.handle(16, &apdu::encode_get_normal(0xC2, &attr));
        assert_eq!(
            apdu::parse_get_response(&resp).expect("parses"),
            GetResponse::Normal {
                invoke: 0xC2,
                result: Ok(Data::Bool(false))
            }
        );
        let resp = s.handle(
            16,
            &apdu::encode_set_normal(0xC3, &AttrRef::new(3, VOLTAGE, 2), &Data::U16(1)),
        );
        assert_eq!(
            apdu::parse_set_response(&resp).expect("parses").1,
            DataAccessResult::ReadWriteDenied
        );
        let method = MethodRef {
            class_id: 70,
            obis: RELAY,
            method: 1,
        };
        let resp = s.handle(
            16,
            &apdu::encode_action_normal(0xC4, &method, Some(&Data::I8(0))),
        );
        // class 70 does not match the Data object: class inconsistent
        assert_eq!(
            apdu::parse_action_response(&resp).expect("parses").result,
            DataAccessResult::ObjectClassInconsistent
        );
        let method = MethodRef {
            class_id: 1,
            obis: RELAY,
            method: 1,
        };
        let resp = s.handle(16, &apdu::encode_action_normal(0xC5, &method, None));
        assert_eq!(
            apdu::parse_action_response(&resp).expect("parses").result,
            DataAccessResult::Success
        );
    }

    #[test]
    fn load_profile_is_read_by_range_in_blocks() {
        const PROFILE: ObisCode = ObisCode::new(1, 0, 99, 1, 0, 255);
        let mut s = session(SimOptions {
            profile: Some(profile::LoadProfile {
                rows: 96,
                period_s: 900,
            }),
            ..SimOptions::default()
        });
        let aare = associate(&mut s, 16, None, 1024);
        assert!(aare.conformance.has(Conformance::SELECTIVE_ACCESS));
        let clock = apdu::CaptureObject {
            attr: AttrRef::new(8, ObisCode::new(0, 0, 1, 0, 0, 255), 2),
            data_index: 0,
        };
        let now = unix_ms_now();
        let params = apdu::range_descriptor(
            &clock,
            crate::dlms::clock::encode_utc(now - 86_400_000 + 1000),
            crate::dlms::clock::encode_utc(now),
        );
        let attr = AttrRef::new(7, PROFILE, 2);
        let mut resp = s.handle(16, &apdu::encode_get_selective(0xC1, &attr, 1, &params));
        let mut raw = Vec::new();
        loop {
            let GetResponse::Block {
                last,
                block,
                raw: Ok(part),
                ..
            } = apdu::parse_get_response(&resp).expect("parses")
            else {
                panic!("not a block: {resp:02x?}");
            };
            raw.extend_from_slice(&part);
            if last {
                break;
            }
            resp = s.handle(16, &apdu::encode_get_next(0xC1, block));
        }
        let Data::Array(rows) = apdu::parse_block_data_normal(&raw).expect("decodes") else {
            panic!("buffer is not an array");
        };
        assert_eq!(rows.len(), 96, "one day of quarter hours");
        // The object is listed, and absent from a meter without a profile.
        assert!(object_list(true).to_bytes().len() > object_list(false).to_bytes().len());
        let mut plain = session(SimOptions::default());
        associate(&mut plain, 16, None, 1024);
        let resp = plain.handle(16, &apdu::encode_get_normal(0xC1, &attr));
        let GetResponse::Normal { result, .. } = apdu::parse_get_response(&resp).expect("parses")
        else {
            panic!("unexpected {resp:02x?}");
        };
        assert_eq!(result, Err(DataAccessResult::ObjectUndefined));
    }

    #[test]
    fn large_object_list_uses_block_transfer() {
        let mut s = session(SimOptions::default());
        associate(&mut s, 16, None, 64);
        let full = object_list(false).to_bytes();
        let mut resp = s.handle(
            16,
            &apdu::encode_get_normal(0xC1, &AttrRef::new(15, OBJECT_LIST, 2)),
        );
        let mut raw = Vec::new();
        let mut blocks = 0;
        loop {
            assert!(resp.len() <= 64, "block of {} bytes", resp.len());
            let GetResponse::Block {
                last,
                block,
                raw: Ok(part),
                ..
            } = apdu::parse_get_response(&resp).expect("parses")
            else {
                panic!("not a block: {resp:02x?}");
            };
            blocks += 1;
            assert_eq!(block, blocks);
            raw.extend_from_slice(&part);
            if last {
                break;
            }
            resp = s.handle(16, &apdu::encode_get_next(0xC1, block));
        }
        assert!(blocks > 3);
        assert_eq!(raw, full);
        assert_eq!(
            apdu::parse_block_data_normal(&raw).expect("decodes"),
            object_list(false)
        );
    }

    #[test]
    fn wrong_block_number_aborts_the_transfer() {
        let mut s = session(SimOptions::default());
        associate(&mut s, 16, None, 64);
        s.handle(
            16,
            &apdu::encode_get_normal(0xC1, &AttrRef::new(15, OBJECT_LIST, 2)),
        );
        let resp = s.handle(16, &apdu::encode_get_next(0xC1, 7));
        assert!(matches!(
            apdu::parse_get_response(&resp).expect("parses"),
            GetResponse::Block {
                raw: Err(DataAccessResult::DataBlockNumberInvalid),
                ..
            }
        ));
    }

    #[test]
    fn energy_never_decreases_and_values_move() {
        let meter = MeterState::new(&SimOptions {
            seed: 42,
            ..SimOptions::default()
        });
        let mut last = 0.0;
        for i in 0..10_000 {
            let e = meter.energy_wh(f64::from(i) * 0.7);
            assert!(e >= last, "energy went back at step {i}");
            last = e;
        }
        assert!(meter.energy_wh(3600.0) - meter.energy_wh(0.0) > 900.0);
    }

    #[test]
    fn garbage_requests_get_exceptions_not_panics() {
        let mut s = session(SimOptions::default());
        associate(&mut s, 16, None, 512);
        for req in [
            &[][..],
            &[0xC0],
            &[0xC0, 0x01],
            &[0xC0, 0x03, 0xC1, 0x7F],
            &[0xC1, 0x01, 0xC1, 0x00, 0x01],
            &[0x60, 0x80],
            &[0x60, 0x05, 0xBE, 0x03, 0x04, 0x01, 0x01],
            &[0xFF, 0x00],
        ] {
            let resp = s.handle(16, req);
            assert!(!resp.is_empty());
        }
    }

    #[test]
    fn simulate_args_parse_and_hide_the_password() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SimulateArgs,
        }
        let cli = Cli::try_parse_from([
            "simulate",
            "--count",
            "3",
            "--transport",
            "wrapper",
            "--energy-scaler",
            "-1",
            "--password",
            "s3cret",
            "--max-info",
            "64",
        ])
        .expect("parses");
        let opts = cli.args.options();
        assert_eq!(opts.transport, DlmsTransport::Wrapper);
        assert_eq!(opts.energy_scaler, -1);
        assert_eq!(opts.password.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(opts.hdlc.max_info_rx, 64);
        assert_eq!(cli.args.count, 3);
        assert!(!format!("{cli:?}").contains("s3cret"));
        assert!(Cli::try_parse_from(["simulate", "--transport", "serial"]).is_err());
    }

    #[test]
    fn date_conversion() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let dt = now_date_time();
        assert!(u16::from_be_bytes([dt[0], dt[1]]) >= 2024);
        assert!((1..=7).contains(&dt[4]));
    }
}
