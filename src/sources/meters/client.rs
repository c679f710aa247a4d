//! DLMS/COSEM client session over an established link: association (AARQ/AARE), GET (normal,
//! with-list packed to the negotiated PDU, block transfer), SET, ACTION and release, plus the
//! register helper that applies each register's cached scaler and unit.
//!
//! With [`Security`] (HLS-GMAC, security suite 0) the association is the four-pass one: AARQ with
//! our system title, CtoS and a glo-initiate-request; AARE with the meter's system title, StoC
//! and glo-initiate-response; pass 3, ACTION reply_to_HLS_authentication on the Association LN
//! object with f(StoC); pass 4, the meter's f(CtoS) checked. Afterwards every request goes out
//! glo-ciphered (authenticated and encrypted) under a fresh invocation counter value, every
//! answer must be ciphered, open under the global key and carry a counter above the meter's
//! previous one in this association (replay). With `dedicated_key`, a random dedicated key goes
//! in the ciphered initiate-request, and once pass 4 verified, requests are ded-ciphered under
//! it; ded- answers open under it. A ciphered request is never sent twice: a lost answer ends
//! the association instead (its counter value would be refused as a replay).
//!
//! It drives a [`Link`] (HDLC or wrapper, provided by `link.rs`) and never opens sockets, never
//! reconnects and never sleeps: retry policy belongs to the poller. Every exchange is bounded by
//! the per-request timeout given in [`ClientSettings`].

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

pub use super::link::Recovery;

use super::counter::{self, SharedCounter};
use crate::dlms::apdu::{
    self, Aare, AarqParams, ActionResponse, AttrRef, Conformance, Data, DataAccessResult,
    GetDataResult, GetResponse, MethodRef,
};
use crate::dlms::ciphering::{self, Keys};
use crate::dlms::obis::ObisCode;

/// Error type links report; the client only needs to display and chain it.
pub type LinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Largest reassembled block-transfer response we accept (a register read is tens of bytes; a
/// load profile may be large, but a meter streaming forever must not exhaust memory).
pub const MAX_BLOCK_TRANSFER_BYTES: usize = 1 << 20;

/// Default max-receive-pdu-size we propose (what typical meters and Gurux use).
pub const DEFAULT_MAX_RECEIVE_PDU: u16 = 1024;

/// The Association LN object's reply_to_HLS_authentication (HLS pass 3).
pub const REPLY_TO_HLS_AUTHENTICATION: MethodRef = MethodRef {
    class_id: 15,
    obis: ObisCode::new(0, 0, 40, 0, 0, 255),
    method: 1,
};

/// Length of our HLS challenge CtoS (the Green Book allows 8 to 64 bytes).
pub const CTOS_LEN: usize = 16;

/// What the hint of every HLS failure says.
const CHECK_KEYS: &str = "check authentication_key, block_cipher_key and system_title";

/// What went wrong in a client operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The link below (HDLC or wrapper over TCP) failed.
    #[error("link failed")]
    Link(#[source] LinkError),
    /// The meter did not answer within the per-request timeout.
    #[error("meter did not answer within {0:?}")]
    Timeout(Duration),
    /// The meter's answer could not be decoded, or it was an error APDU or a rejection.
    #[error("meter answered with an unusable apdu")]
    Apdu(#[source] apdu::Error),
    /// A block transfer that broke its own rules (wrong block number, too large, aborted).
    #[error("block transfer failed: {0}")]
    BlockTransfer(String),
    /// The association is not open (call `associate` first).
    #[error("no association with the meter")]
    NotAssociated,
    /// HLS: the meter refused the AARQ (its ciphered initiate-request did not open, or it does
    /// not accept our system title or mechanism).
    #[error(
        "HLS authentication failed: the meter refused our association request ({0}); {CHECK_KEYS}"
    )]
    HlsRejected(String),
    /// HLS pass 3: the meter refused our f(StoC).
    #[error("HLS authentication failed: the meter refused our response to its challenge ({0}); {CHECK_KEYS}")]
    HlsRefused(String),
    /// HLS: the meter's AARE or its pass-4 f(CtoS) does not verify under our keys.
    #[error("HLS authentication failed: the meter's response does not verify ({0}); {CHECK_KEYS}")]
    HlsVerify(String),
    /// A ciphered answer that does not open, is not ciphered, or replays a counter.
    #[error("ciphered answer refused: {0}")]
    Ciphered(String),
    /// No invocation counter value could be reserved.
    #[error("invocation counter unavailable")]
    Counter(#[source] counter::Error),
}

impl Error {
    /// True when retrying cannot help: the meter refused our credentials or application context.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::Apdu(apdu::Error::AssociationRejected {
                result: apdu::AssociationResult::RejectedPermanent,
                ..
            }) | Error::HlsRejected(_)
                | Error::HlsRefused(_)
                | Error::HlsVerify(_)
                | Error::Counter(_)
        )
    }

    /// True for an HLS authentication failure (wrong keys or system title).
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            Error::HlsRejected(_) | Error::HlsRefused(_) | Error::HlsVerify(_)
        )
    }

    /// True when the link or association state is unknown after this error, so the caller must
    /// drop the connection and associate again. An exception or data-access error leaves the
    /// association usable.
    pub fn needs_reconnect(&self) -> bool {
        !matches!(
            self,
            Error::Apdu(apdu::Error::Exception { .. } | apdu::Error::ServiceError { .. })
        )
    }
}

type Result<T> = std::result::Result<T, Error>;

/// One APDU exchange path to a meter: the seam between this session and the link driver.
pub trait Link: Send {
    /// Bring the link up (HDLC SNRM/UA; nothing for the wrapper).
    fn open(&mut self) -> impl Future<Output = std::result::Result<(), LinkError>> + Send;
    /// Send one APDU and return the meter's complete answer APDU, recovering lost or damaged
    /// answers as `rec` allows.
    fn exchange(
        &mut self,
        apdu: &[u8],
        rec: Recovery,
    ) -> impl Future<Output = std::result::Result<Vec<u8>, LinkError>> + Send;
    /// Recovery attempts the link has made so far (health telemetry).
    fn recoveries(&self) -> u64 {
        0
    }
    /// Take the link down (HDLC DISC/UA); best effort.
    fn close(&mut self) -> impl Future<Output = std::result::Result<(), LinkError>> + Send;
}

impl<S> Link for super::link::ClientLink<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    async fn open(&mut self) -> std::result::Result<(), LinkError> {
        super::link::ClientLink::open(self).await?;
        Ok(())
    }
    async fn exchange(
        &mut self,
        apdu: &[u8],
        rec: Recovery,
    ) -> std::result::Result<Vec<u8>, LinkError> {
        Ok(super::link::ClientLink::exchange_recovering(self, apdu, rec).await?)
    }
    fn recoveries(&self) -> u64 {
        super::link::ClientLink::recoveries(self)
    }
    async fn close(&mut self) -> std::result::Result<(), LinkError> {
        Ok(super::link::ClientLink::close(self).await?)
    }
}

/// HLS-GMAC (security suite 0) parameters of a meter's associations.
#[derive(Clone)]
pub struct Security {
    /// Authentication key and global unicast block cipher key.
    pub keys: Keys,
    /// Our system title: calling-AP-title, and the IV prefix of everything we cipher.
    pub system_title: [u8; 8],
    /// Our invocation counter, shared by the meter's successive associations.
    pub counter: SharedCounter,
    /// Propose a fresh random dedicated key with each association; once it is complete,
    /// requests go out ded-ciphered under it and the meter answers ded- APDUs.
    pub dedicated_key: bool,
}

impl Security {
    /// The next invocation counter value (reserved on disk before it is used).
    async fn next_invocation(&self) -> Result<u32> {
        self.counter
            .lock()
            .await
            .take()
            .await
            .map_err(Error::Counter)
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("keys", &self.keys)
            .field("system_title", &hex(&self.system_title))
            .field("dedicated_key", &self.dedicated_key)
            .finish()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02X}")).collect()
}

/// Association parameters.
#[derive(Clone)]
pub struct ClientSettings {
    /// LLS password; `None` associates without authentication (or with `security`).
    pub password: Option<Vec<u8>>,
    /// HLS-GMAC with ciphered APDUs; takes precedence over `password`.
    pub security: Option<Security>,
    /// Largest APDU we accept; smaller values force the meter into block transfer.
    pub max_receive_pdu: u16,
    /// Bound on every wait for an answer (and on opening the link).
    pub timeout: Duration,
    /// Recovery attempts per request before the association is declared dead.
    pub retries: u32,
}

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSettings")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("security", &self.security)
            .field("max_receive_pdu", &self.max_receive_pdu)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// A register to read: the telemetry key and the value attribute (class 3/4/5, attribute 2,
/// or any other attribute, which is then reported raw).
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    pub key: String,
    pub attr: AttrRef,
}

/// A value as delivered to the uplink.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadingValue {
    /// A number with the register's scaler applied.
    Number(f64),
    /// Anything that is not a number (strings, clocks, structures).
    Raw(Data),
}

/// One register's reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub key: String,
    pub value: ReadingValue,
    /// Unit symbol from the register's scaler_unit, when it has one.
    pub unit: Option<&'static str>,
}

/// Why one register could not be read while the others could.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    /// The meter refused this attribute.
    #[error("meter refused {attr}: {result}")]
    Access {
        attr: AttrRef,
        result: DataAccessResult,
    },
    /// The scaler_unit attribute was malformed.
    #[error("bad scaler_unit for {attr}")]
    ScalerUnit {
        attr: AttrRef,
        #[source]
        source: apdu::Error,
    },
}

/// Classes whose attribute 2 is scaled by attribute 3 (Register, Extended register, Demand
/// register).
fn has_scaler_unit(attr: &AttrRef) -> bool {
    matches!(attr.class_id, 3..=5) && attr.attribute == 2
}

/// A DLMS client session over one link.
pub struct DlmsClient<L> {
    link: L,
    settings: ClientSettings,
    /// The accepted association, or `None` before `associate` / after an error.
    assoc: Option<Aare>,
    /// Last invoke id used (1..=15, cycling).
    invoke: u8,
    /// scaler_unit per value attribute, read once per association.
    scalers: HashMap<AttrRef, (i8, u8)>,
    /// Set when the meter advertised multiple-references but failed a with-list request.
    list_broken: bool,
    /// The ciphered association's state (HLS-GMAC), once the AARE is in.
    ciphered: Option<Ciphered>,
}

/// A ciphered association: who the meter is, the last invocation counter it used, and the
/// dedicated key, if one was agreed. No `Debug`: it holds a key.
#[derive(Clone, Copy)]
struct Ciphered {
    /// The meter's system title (responding-AP-title): the IV prefix of its APDUs.
    server_title: [u8; 8],
    /// The meter's last invocation counter in this association; a lower or equal one is a replay.
    server_ic: Option<u32>,
    /// The dedicated key we proposed in the (ciphered) initiate-request.
    dedicated: Option<[u8; 16]>,
    /// Whether requests go out ded-ciphered (after the association is complete).
    use_dedicated: bool,
}

impl<L: Link> DlmsClient<L> {
    pub fn new(link: L, settings: ClientSettings) -> Self {
        DlmsClient {
            link,
            settings,
            assoc: None,
            invoke: 0,
            scalers: HashMap::new(),
            list_broken: false,
            ciphered: None,
        }
    }

    /// What the meter granted, when associated.
    pub fn association(&self) -> Option<&Aare> {
        self.assoc.as_ref()
    }

    /// Give the link back (e.g. to drop the TCP connection).
    pub fn into_link(self) -> L {
        self.link
    }

    /// Recovery attempts the link has made so far.
    pub fn recoveries(&self) -> u64 {
        self.link.recoveries()
    }

    /// One request/response round trip that may be repeated on a lost answer.
    async fn exchange(&mut self, req: &[u8]) -> Result<Vec<u8>> {
        self.exchange_as(req, true).await
    }

    /// One request/response round trip, the link recovering lost answers; on any failure the
    /// association is considered lost unless the error says otherwise.
    async fn exchange_as(&mut self, req: &[u8], repeatable: bool) -> Result<Vec<u8>> {
        if self.ciphered.is_none() {
            return self.exchange_raw(req, repeatable).await;
        }
        let sealed = match ciphering::glo_tag(req.first().copied().unwrap_or(0)) {
            Some(_) => self.seal(req).await?,
            // RLRQ and other ACSE APDUs have no ciphered form.
            None => req.to_vec(),
        };
        // A re-sent ciphered request would repeat its invocation counter: never repeat it.
        let resp = self.exchange_raw(&sealed, false).await?;
        match self.open(&resp) {
            Ok(plain) => Ok(plain),
            Err(e) => {
                self.assoc = None;
                Err(e)
            }
        }
    }

    /// Cipher a plain xDLMS request under the next invocation counter value.
    async fn seal(&mut self, req: &[u8]) -> Result<Vec<u8>> {
        let Some(sec) = self.settings.security.clone() else {
            return Ok(req.to_vec());
        };
        let ic = sec
            .next_invocation()
            .await
            .inspect_err(|_| self.assoc = None)?;
        let plain = req.first().copied().unwrap_or(0);
        match self
            .ciphered
            .and_then(|c| c.dedicated.filter(|_| c.use_dedicated))
        {
            Some(key) => {
                let tag = ciphering::ded_tag(plain).ok_or_else(|| {
                    Error::Ciphered(format!("apdu 0x{plain:02x} has no ded form"))
                })?;
                Ok(ciphering::encrypt(
                    &key,
                    &sec.keys.authentication,
                    tag,
                    &sec.system_title,
                    ic,
                    req,
                ))
            }
            None => ciphering::encrypt_glo(&sec.keys, &sec.system_title, ic, req)
                .map_err(|e| Error::Ciphered(e.to_string())),
        }
    }

    /// Open a ciphered answer of the meter and check its invocation counter; plain answers are
    /// accepted only for error APDUs and the release.
    fn open(&mut self, resp: &[u8]) -> Result<Vec<u8>> {
        let (Some(sec), Some(state)) = (self.settings.security.as_ref(), self.ciphered.as_mut())
        else {
            return Ok(resp.to_vec());
        };
        let tag = resp.first().copied().unwrap_or(0);
        if !ciphering::is_ciphered(tag) {
            return match tag {
                0x63 | 0xD8 | 0x0E => Ok(resp.to_vec()),
                _ => Err(Error::Ciphered(format!(
                    "plain apdu 0x{tag:02x} in a ciphered association"
                ))),
            };
        }
        let key = if (0xD0..=0xD7).contains(&tag) {
            state.dedicated.ok_or_else(|| {
                Error::Ciphered("ded-ciphered answer, but no dedicated key was agreed".into())
            })?
        } else {
            sec.keys.block_cipher
        };
        let (ic, plain) =
            ciphering::decrypt(&key, &sec.keys.authentication, &state.server_title, resp)
                .map_err(|e| Error::Ciphered(e.to_string()))?;
        if let Some(last) = state.server_ic {
            if ic <= last {
                return Err(Error::Ciphered(format!(
                    "replayed invocation counter {ic} (meter's last {last})"
                )));
            }
        }
        state.server_ic = Some(ic);
        Ok(plain)
    }

    /// One exchange of the APDU as given (already ciphered, when the association is).
    async fn exchange_raw(&mut self, req: &[u8], repeatable: bool) -> Result<Vec<u8>> {
        let rec = Recovery {
            timeout: self.settings.timeout,
            retries: self.settings.retries,
            repeatable,
        };
        // The link bounds each wait; this bounds the whole recovery (each attempt is a poll and
        // possibly a re-sent request), in case a link does not.
        let timeout = self
            .settings
            .timeout
            .saturating_mul(2 * self.settings.retries + 2);
        let r = match tokio::time::timeout(timeout, self.link.exchange(req, rec)).await {
            Ok(r) => r.map_err(Error::Link),
            Err(_) => Err(Error::Timeout(timeout)),
        };
        if r.is_err() {
            self.assoc = None;
        }
        r
    }

    /// Open the link and associate. Clears the scaler cache: a new association may be a
    /// different meter behind the same address.
    pub async fn associate(&mut self) -> Result<Aare> {
        self.assoc = None;
        self.ciphered = None;
        self.scalers.clear();
        self.list_broken = false;
        timed(self.settings.timeout, self.link.open()).await?;
        if let Some(sec) = self.settings.security.clone() {
            return self.associate_hls(&sec).await;
        }
        let aarq = apdu::encode_aarq(&AarqParams {
            password: self.settings.password.as_deref(),
            conformance: Conformance::CLIENT_PROPOSED,
            max_receive_pdu: self.settings.max_receive_pdu,
        });
        let resp = self.exchange(&aarq).await?;
        let aare = apdu::parse_aare(&resp).map_err(Error::Apdu)?;
        self.assoc = Some(aare);
        Ok(aare)
    }

    /// The four-pass HLS-GMAC association (see the module documentation).
    async fn associate_hls(&mut self, sec: &Security) -> Result<Aare> {
        let mut ctos = [0u8; CTOS_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut ctos[..]);
        let ic = sec.next_invocation().await?;
        let dedicated = sec.dedicated_key.then(|| {
            let mut k = [0u8; 16];
            rand::Rng::fill(&mut rand::rng(), &mut k[..]);
            k
        });
        let initiate = apdu::encode_initiate_request_with(
            Conformance::CLIENT_PROPOSED,
            self.settings.max_receive_pdu,
            dedicated.as_ref(),
        );
        let ciphered_initiate = ciphering::encrypt_glo(&sec.keys, &sec.system_title, ic, &initiate)
            .map_err(|e| Error::Ciphered(e.to_string()))?;
        let aarq = apdu::encode_aarq_hls(&apdu::HlsAarq {
            system_title: sec.system_title,
            ctos: &ctos,
            ciphered_initiate: &ciphered_initiate,
        });
        // Not re-sent either: its initiate-request carries a counter value.
        let resp = self.exchange_raw(&aarq, false).await?;
        let parts = match apdu::parse_aare_parts(&resp) {
            Ok(p) => p,
            // An exception-response or service error instead of an AARE: the meter could not
            // even open our request.
            Err(e @ (apdu::Error::Exception { .. } | apdu::Error::ServiceError { .. })) => {
                return Err(Error::HlsRejected(e.to_string()))
            }
            Err(e) => return Err(Error::Apdu(e)),
        };
        if parts.result != apdu::AssociationResult::Accepted {
            return Err(Error::HlsRejected(format!(
                "association rejected ({}): {}",
                parts.result, parts.diagnostic
            )));
        }
        let server_title: [u8; 8] = parts
            .responding_ap_title
            .as_deref()
            .and_then(|t| t.try_into().ok())
            .ok_or_else(|| {
                Error::Apdu(apdu::Error::Invalid(
                    "HLS aare without an 8-byte responding-AP-title".into(),
                ))
            })?;
        let stoc = parts.responding_authentication.clone().ok_or_else(|| {
            Error::Apdu(apdu::Error::Invalid(
                "HLS aare without the meter's challenge".into(),
            ))
        })?;
        let ui = parts.user_information.as_deref().ok_or_else(|| {
            Error::Apdu(apdu::Error::Invalid(
                "aare without initiate-response".into(),
            ))
        })?;
        self.ciphered = Some(Ciphered {
            server_title,
            server_ic: None,
            dedicated,
            use_dedicated: false,
        });
        let initiate = if ciphering::is_ciphered(ui.first().copied().unwrap_or(0)) {
            self.open(ui)
                .map_err(|e| Error::HlsVerify(format!("initiate-response: {e}")))?
        } else {
            ui.to_vec()
        };
        let aare = apdu::parse_initiate_response(&initiate).map_err(Error::Apdu)?;
        self.assoc = Some(aare);

        // Pass 3: f(StoC) = SC ‖ IC ‖ GMAC(StoC), under our title and a fresh counter value.
        let ic = sec.next_invocation().await?;
        let f_stoc = ciphering::hls_response(&sec.keys, &sec.system_title, ic, &stoc);
        let r = self
            .action(
                &REPLY_TO_HLS_AUTHENTICATION,
                Some(&Data::OctetString(f_stoc)),
            )
            .await
            .map_err(|e| match e {
                Error::Apdu(e) => Error::HlsRefused(e.to_string()),
                Error::Ciphered(e) => Error::HlsVerify(e),
                other => other,
            })?;
        if r.result != DataAccessResult::Success {
            self.assoc = None;
            return Err(Error::HlsRefused(r.result.to_string()));
        }
        // Pass 4: the meter's f(CtoS), under its title.
        let answer = match r.returned {
            Some(Ok(Data::OctetString(a))) => a,
            other => {
                self.assoc = None;
                return Err(Error::HlsVerify(format!(
                    "pass 4 answer missing or not an octet string ({other:?})"
                )));
            }
        };
        if let Err(e) = ciphering::verify_hls(&sec.keys, &server_title, &ctos, &answer) {
            self.assoc = None;
            return Err(Error::HlsVerify(format!("pass 4: {e}")));
        }
        if let Some(c) = self.ciphered.as_mut() {
            c.use_dedicated = c.dedicated.is_some();
        }
        Ok(aare)
    }

    /// Release the association (RLRQ) and close the link. Best effort: a meter that does not
    /// answer the release is closed anyway.
    pub async fn release(&mut self) -> Result<()> {
        if self.assoc.take().is_some() {
            if let Ok(resp) = self.exchange(&apdu::encode_rlrq()).await {
                if let Err(error) = apdu::parse_rlre(&resp) {
                    tracing::debug!(%error, "Meter answered the release oddly; closing anyway.");
                }
            }
        }
        timed(self.settings.timeout, self.link.close()).await
    }

    fn next_invoke(&mut self) -> u8 {
        self.invoke = self.invoke % 15 + 1;
        // High priority, confirmed service, invoke id in the low nibble.
        0xC0 | self.invoke
    }

    /// Compare the response's invoke id with the request's. A mismatch cannot be a stale answer
    /// (after any timeout the connection is dropped, so one request is ever outstanding), and
    /// some stacks (Gurux's error path among them) echo a wrong id: log it and go on.
    fn check_invoke(&mut self, want: u8, got: u8) -> Result<()> {
        if apdu::invoke_id(want) != apdu::invoke_id(got) {
            tracing::debug!(
                want = apdu::invoke_id(want),
                got = apdu::invoke_id(got),
                "Response carries another invoke id; accepted."
            );
        }
        Ok(())
    }

    fn granted(&self) -> Result<Aare> {
        self.assoc.ok_or(Error::NotAssociated)
    }

    /// Send a GET request and collect its answer, following block transfer to the end.
    /// Returns either one result (normal) or the list (with-list).
    async fn get_request(&mut self, invoke: u8, req: Vec<u8>) -> Result<GetAnswer> {
        let resp = self.exchange(&req).await?;
        let mut parsed = apdu::parse_get_response(&resp).map_err(Error::Apdu)?;
        let mut raw = Vec::new();
        let mut expected_block = 1u32;
        loop {
            match parsed {
                GetResponse::Normal {
                    invoke: got,
                    result,
                } => {
                    self.check_invoke(invoke, got)?;
                    return Ok(GetAnswer::One(result));
                }
                GetResponse::List {
                    invoke: got,
                    results,
                } => {
                    self.check_invoke(invoke, got)?;
                    return Ok(GetAnswer::List(results));
                }
                GetResponse::Block {
                    invoke: got,
                    last,
                    block,
                    raw: data,
                } => {
                    self.check_invoke(invoke, got)?;
                    if block != expected_block {
                        self.assoc = None;
                        return Err(Error::BlockTransfer(format!(
                            "got block {block}, expected {expected_block}"
                        )));
                    }
                    let data = match data {
                        Ok(d) => d,
                        Err(dar) => {
                            return Err(Error::BlockTransfer(format!(
                                "meter aborted at block {block}: {dar}"
                            )))
                        }
                    };
                    if raw.len() + data.len() > MAX_BLOCK_TRANSFER_BYTES {
                        self.assoc = None;
                        return Err(Error::BlockTransfer(format!(
                            "response larger than {MAX_BLOCK_TRANSFER_BYTES} bytes"
                        )));
                    }
                    raw.extend_from_slice(&data);
                    if last {
                        return Ok(GetAnswer::Raw(raw));
                    }
                    expected_block = block.wrapping_add(1);
                    let resp = self.exchange(&apdu::encode_get_next(invoke, block)).await?;
                    parsed = apdu::parse_get_response(&resp).map_err(Error::Apdu)?;
                }
            }
        }
    }

    /// Read one attribute.
    pub async fn get_one(&mut self, attr: &AttrRef) -> Result<GetDataResult> {
        self.granted()?;
        let invoke = self.next_invoke();
        self.get_single(invoke, apdu::encode_get_normal(invoke, attr))
            .await
    }

    /// Read one attribute with selective access (`selector` and its parameters), e.g. a
    /// profile buffer by range or by entry. Long answers come by block transfer.
    pub async fn get_selective(
        &mut self,
        attr: &AttrRef,
        selector: u8,
        params: &Data,
    ) -> Result<GetDataResult> {
        self.granted()?;
        let invoke = self.next_invoke();
        self.get_single(
            invoke,
            apdu::encode_get_selective(invoke, attr, selector, params),
        )
        .await
    }

    async fn get_single(&mut self, invoke: u8, req: Vec<u8>) -> Result<GetDataResult> {
        match self.get_request(invoke, req).await? {
            GetAnswer::One(r) => Ok(r),
            GetAnswer::Raw(raw) => {
                Ok(Ok(apdu::parse_block_data_normal(&raw).map_err(Error::Apdu)?))
            }
            GetAnswer::List(_) => {
                self.assoc = None;
                Err(Error::Apdu(apdu::Error::Invalid(
                    "with-list answer to a normal get".into(),
                )))
            }
        }
    }

    /// The scaler and unit of a register value attribute (class 3/4/5, attribute 2), read once
    /// per association; `None` for other attributes or when the meter refuses it.
    pub async fn scaler_unit(&mut self, attr: &AttrRef) -> Result<Option<(i8, u8)>> {
        if !has_scaler_unit(attr) {
            return Ok(None);
        }
        if let Some(su) = self.scalers.get(attr) {
            return Ok(Some(*su));
        }
        let su = AttrRef {
            attribute: 3,
            ..*attr
        };
        match self.get_one(&su).await? {
            Ok(d) => match apdu::parse_scaler_unit(&d) {
                Ok(v) => {
                    self.scalers.insert(*attr, v);
                    Ok(Some(v))
                }
                Err(_) => Ok(None),
            },
            Err(_) => Ok(None),
        }
    }

    /// How many attributes fit one GET-Request-With-List within the meter's receive PDU.
    fn list_capacity(&self, aare: &Aare) -> usize {
        let max = aare.server_max_receive_pdu as usize;
        let mut n = 1;
        while n < 255 && apdu::get_with_list_len(n + 1) <= max {
            n += 1;
        }
        n
    }

    /// Read several attributes in as few requests as the association allows: GET-with-list
    /// packed to the meter's PDU when it grants multiple-references, single GETs otherwise.
    /// The outer error is a request failure; inner errors are per attribute.
    pub async fn get(&mut self, attrs: &[AttrRef]) -> Result<Vec<GetDataResult>> {
        let aare = self.granted()?;
        let mut out = Vec::with_capacity(attrs.len());
        let use_list = attrs.len() > 1
            && !self.list_broken
            && aare.conformance.has(Conformance::MULTIPLE_REFERENCES);
        if !use_list {
            for a in attrs {
                out.push(self.get_one(a).await?);
            }
            return Ok(out);
        }
        for chunk in attrs.chunks(self.list_capacity(&aare)) {
            if chunk.len() == 1 {
                out.push(self.get_one(&chunk[0]).await?);
                continue;
            }
            let invoke = self.next_invoke();
            let answer = self
                .get_request(invoke, apdu::encode_get_with_list(invoke, chunk))
                .await;
            let results = match answer {
                Ok(GetAnswer::List(r)) => r,
                Ok(GetAnswer::Raw(raw)) => {
                    apdu::parse_block_data_list(&raw).map_err(Error::Apdu)?
                }
                Ok(GetAnswer::One(_)) => {
                    self.assoc = None;
                    return Err(Error::Apdu(apdu::Error::Invalid(
                        "normal answer to a get-with-list".into(),
                    )));
                }
                Err(Error::Apdu(e)) => {
                    // The link delivered a whole answer, so the association is intact: either
                    // the meter refused with-list (exception / service error: stop using it)
                    // or it mis-encoded the list (Gurux does when an entry fails): read this
                    // chunk one by one.
                    if matches!(
                        e,
                        apdu::Error::Exception { .. } | apdu::Error::ServiceError { .. }
                    ) {
                        self.list_broken = true;
                    }
                    tracing::debug!(error = %e, "Get-with-list answer unusable; using single gets.");
                    for a in chunk {
                        out.push(self.get_one(a).await?);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if results.len() != chunk.len() {
                self.assoc = None;
                return Err(Error::Apdu(apdu::Error::Invalid(format!(
                    "{} results for {} attributes",
                    results.len(),
                    chunk.len()
                ))));
            }
            out.extend(results);
        }
        Ok(out)
    }

    /// Write one attribute.
    pub async fn set(&mut self, attr: &AttrRef, value: &Data) -> Result<DataAccessResult> {
        self.granted()?;
        let invoke = self.next_invoke();
        let resp = self
            .exchange(&apdu::encode_set_normal(invoke, attr, value))
            .await?;
        let (got, result) = apdu::parse_set_response(&resp).map_err(Error::Apdu)?;
        self.check_invoke(invoke, got)?;
        Ok(result)
    }

    /// Invoke one method.
    pub async fn action(
        &mut self,
        method: &MethodRef,
        params: Option<&Data>,
    ) -> Result<ActionResponse> {
        self.granted()?;
        let invoke = self.next_invoke();
        let resp = self
            .exchange_as(&apdu::encode_action_normal(invoke, method, params), false)
            .await?;
        let r = apdu::parse_action_response(&resp).map_err(Error::Apdu)?;
        self.check_invoke(invoke, r.invoke)?;
        Ok(r)
    }

    /// Read registers: the values, plus (once per association) their scaler_unit, in the same
    /// packed requests. Returns one result per register, in order.
    pub async fn read_registers(
        &mut self,
        regs: &[Register],
    ) -> Result<Vec<std::result::Result<Reading, ReadError>>> {
        let mut attrs: Vec<AttrRef> = regs.iter().map(|r| r.attr).collect();
        let missing: Vec<AttrRef> = regs
            .iter()
            .filter(|r| has_scaler_unit(&r.attr) && !self.scalers.contains_key(&r.attr))
            .map(|r| r.attr)
            .collect();
        attrs.extend(missing.iter().map(|a| AttrRef { attribute: 3, ..*a }));
        let results = self.get(&attrs).await?;
        let (values, su) = results.split_at(regs.len());
        let mut su_errors: HashMap<AttrRef, ReadError> = HashMap::new();
        for (attr, r) in missing.iter().zip(su) {
            match r {
                Ok(d) => match apdu::parse_scaler_unit(d) {
                    Ok(v) => {
                        self.scalers.insert(*attr, v);
                    }
                    Err(source) => {
                        su_errors.insert(
                            *attr,
                            ReadError::ScalerUnit {
                                attr: *attr,
                                source,
                            },
                        );
                    }
                },
                Err(result) => {
                    su_errors.insert(
                        *attr,
                        ReadError::Access {
                            attr: AttrRef {
                                attribute: 3,
                                ..*attr
                            },
                            result: *result,
                        },
                    );
                }
            }
        }
        Ok(regs
            .iter()
            .zip(values)
            .map(|(reg, v)| {
                if let Some(e) = su_errors.remove(&reg.attr) {
                    return Err(e);
                }
                let data = v.clone().map_err(|result| ReadError::Access {
                    attr: reg.attr,
                    result,
                })?;
                Ok(self.to_reading(reg, data))
            })
            .collect())
    }

    fn to_reading(&self, reg: &Register, data: Data) -> Reading {
        let su = self.scalers.get(&reg.attr).copied();
        let unit = su.and_then(|(_, u)| apdu::unit_symbol(u));
        let value = match (data.as_f64(), su) {
            (Some(v), Some((scaler, _))) => ReadingValue::Number(scale(v, scaler)),
            (Some(v), None) if !matches!(data, Data::Enum(_)) => ReadingValue::Number(v),
            _ => ReadingValue::Raw(data),
        };
        Reading {
            key: reg.key.clone(),
            value,
            unit,
        }
    }
}

/// Bound a link operation by the request timeout.
async fn timed<T, F>(timeout: Duration, fut: F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, LinkError>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(Error::Link),
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

/// Apply a decimal scaler. Dividing by an exact power of ten keeps `23012 * 10^-2` at `230.12`
/// instead of `230.12000000000003`.
pub fn scale(v: f64, scaler: i8) -> f64 {
    if scaler >= 0 {
        v * 10f64.powi(scaler as i32)
    } else {
        v / 10f64.powi(-(scaler as i32))
    }
}

/// What a GET produced before interpretation.
enum GetAnswer {
    One(GetDataResult),
    List(Vec<GetDataResult>),
    /// Reassembled block-transfer payload (normal: a Data; with-list: the result list).
    Raw(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlms::obis::ObisCode;
    use std::collections::VecDeque;

    /// A scripted link: checks each request against an expectation and plays back an answer.
    struct Script {
        steps: VecDeque<Step>,
    }

    impl Link for Script {
        async fn open(&mut self) -> std::result::Result<(), LinkError> {
            Ok(())
        }
        async fn exchange(
            &mut self,
            apdu: &[u8],
            _rec: Recovery,
        ) -> std::result::Result<Vec<u8>, LinkError> {
            let (check, answer) = self.steps.pop_front().ok_or("script exhausted")?;
            assert!(check(apdu), "unexpected request {apdu:02x?}");
            Ok(answer)
        }
        async fn close(&mut self) -> std::result::Result<(), LinkError> {
            Ok(())
        }
    }

    fn aare(conformance: [u8; 3], pdu: u16) -> Vec<u8> {
        let p = pdu.to_be_bytes();
        let mut v = vec![
            0x61, 0x29, 0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01, 0xA2,
            0x03, 0x02, 0x01, 0x00, 0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, 0x00, 0xBE, 0x10, 0x04,
            0x0E, 0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00,
        ];
        v.extend_from_slice(&conformance);
        v.extend_from_slice(&[p[0], p[1], 0x00, 0x07]);
        v
    }

    fn settings() -> ClientSettings {
        ClientSettings {
            password: None,
            security: None,
            max_receive_pdu: 1024,
            timeout: Duration::from_secs(1),
            retries: 3,
        }
    }

    fn regs() -> Vec<Register> {
        vec![
            Register {
                key: "voltage_l1".into(),
                attr: AttrRef::new(3, ObisCode::new(1, 0, 32, 7, 0, 255), 2),
            },
            Register {
                key: "frequency".into(),
                attr: AttrRef::new(3, ObisCode::new(1, 0, 14, 7, 0, 255), 2),
            },
        ]
    }

    type Step = (Box<dyn Fn(&[u8]) -> bool + Send>, Vec<u8>);

    fn step(prefix: &'static [u8], answer: Vec<u8>) -> Step {
        (Box::new(move |req: &[u8]| req.starts_with(prefix)), answer)
    }

    #[tokio::test]
    async fn with_list_reads_values_and_scalers_once() {
        let su = |s: u8, u: u8| [0x00, 0x02, 0x02, 0x0F, s, 0x16, u];
        let mut first = vec![
            0xC4, 0x03, 0xC2, 0x04, 0x00, 0x12, 0x59, 0xE4, 0x00, 0x12, 0x13, 0x88,
        ];
        first.extend_from_slice(&su(0xFE, 35));
        first.extend_from_slice(&su(0xFE, 44));
        let link = Script {
            steps: VecDeque::from([
                step(&[0x60], aare([0x00, 0x1A, 0x1F], 1024)),
                step(&[0xC0, 0x03, 0xC2, 0x04], first),
                step(
                    &[0xC0, 0x03, 0xC3, 0x02],
                    vec![0xC4, 0x03, 0xC3, 0x02, 0x00, 0x12, 0x59, 0xE5, 0x01, 0x04],
                ),
            ]),
        };
        let mut c = DlmsClient::new(link, settings());
        c.associate().await.expect("associate");
        // The first GET is invoke 1 (the AARQ uses none); consume it so ids line up with C2.
        let _ = c.next_invoke();
        let r = c.read_registers(&regs()).await.expect("read");
        assert_eq!(
            r[0],
            Ok(Reading {
                key: "voltage_l1".into(),
                value: ReadingValue::Number(230.12),
                unit: Some("V")
            })
        );
        assert_eq!(
            r[1].as_ref().expect("freq").value,
            ReadingValue::Number(50.0)
        );
        assert_eq!(r[1].as_ref().expect("freq").unit, Some("Hz"));
        let r = c.read_registers(&regs()).await.expect("read 2");
        assert_eq!(
            r[0].as_ref().expect("v").value,
            ReadingValue::Number(230.13)
        );
        assert!(matches!(
            r[1],
            Err(ReadError::Access {
                result: DataAccessResult::ObjectUndefined,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn single_gets_without_multiple_references_and_block_transfer() {
        let link = Script {
            steps: VecDeque::from([
                step(&[0x60], aare([0x00, 0x10, 0x1F], 1024)),
                // Value of voltage split into two blocks.
                step(
                    &[0xC0, 0x01, 0xC1],
                    vec![0xC4, 0x02, 0xC1, 0x00, 0, 0, 0, 1, 0x00, 0x02, 0x12, 0x59],
                ),
                step(
                    &[0xC0, 0x02, 0xC1, 0, 0, 0, 1],
                    vec![0xC4, 0x02, 0xC1, 0x01, 0, 0, 0, 2, 0x00, 0x01, 0xE4],
                ),
                step(
                    &[0xC0, 0x01, 0xC2],
                    vec![0xC4, 0x01, 0xC2, 0x00, 0x12, 0x13, 0x88],
                ),
            ]),
        };
        let mut c = DlmsClient::new(link, settings());
        c.associate().await.expect("associate");
        let attrs: Vec<AttrRef> = regs().iter().map(|r| r.attr).collect();
        let r = c.get(&attrs).await.expect("get");
        assert_eq!(r, vec![Ok(Data::U16(23012)), Ok(Data::U16(5000))]);
    }

    #[tokio::test]
    async fn invoke_mismatch_is_tolerated() {
        let link = Script {
            steps: VecDeque::from([
                step(&[0x60], aare([0x00, 0x1A, 0x1F], 1024)),
                step(&[0xC0, 0x01], vec![0xC4, 0x01, 0xC5, 0x00, 0x11, 0x01]),
            ]),
        };
        let mut c = DlmsClient::new(link, settings());
        c.associate().await.expect("associate");
        let r = c.get_one(&regs()[0].attr).await.expect("accepted");
        assert_eq!(r, Ok(Data::U8(1)));
        assert!(c.association().is_some());
    }

    /// A meter side of HLS-GMAC built from our own ciphering, for the session's rules (the
    /// interop with an independent meter is `tests/dlms_hls.rs`).
    struct FakeHlsMeter {
        keys: Keys,
        title: [u8; 8],
        client_title: [u8; 8],
        ctos: Vec<u8>,
        ic: u32,
        /// What to break.
        fault: Fault,
        /// Requests seen (plain), for assertions.
        seen: Vec<Vec<u8>>,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        /// Every answer after the association reuses the previous counter.
        Replay,
        /// The GET answer comes plain.
        PlainAnswer,
        /// Pass 4 is computed over a wrong challenge.
        BadPass4,
        /// Pass 3 is refused.
        RefusePass3,
    }

    const STOC: [u8; 8] = *b"StoC1234";

    impl FakeHlsMeter {
        fn new(fault: Fault) -> Self {
            FakeHlsMeter {
                keys: Keys {
                    block_cipher: [7; 16],
                    authentication: [9; 16],
                },
                title: *b"METER001",
                client_title: *b"CLIENT01",
                ctos: Vec::new(),
                ic: 100,
                fault,
                seen: Vec::new(),
            }
        }

        fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
            if self.fault != Fault::Replay || self.ic == 100 {
                self.ic += 1;
            }
            ciphering::encrypt_glo(&self.keys, &self.title, self.ic, plain).expect("cipher")
        }

        fn answer(&mut self, req: &[u8]) -> Vec<u8> {
            if req[0] == 0x60 {
                let at = req
                    .windows(4)
                    .position(|w| w == [0xAC, 0x12, 0x80, 0x10])
                    .expect("CtoS in the AARQ")
                    + 4;
                self.ctos = req[at..at + CTOS_LEN].to_vec();
                let init = self.seal(&[
                    0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00, 0x00, 0x18, 0x1D, 0x04, 0x00, 0x00,
                    0x07,
                ]);
                let mut body = vec![0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01];
                body.extend_from_slice(&[0x03, 0xA2, 0x03, 0x02, 0x01, 0x00]);
                body.extend_from_slice(&[0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, 0x0E]);
                body.extend_from_slice(&[0xA4, 0x0A, 0x04, 0x08]);
                body.extend_from_slice(&self.title);
                body.extend_from_slice(&[0xAA, 0x0A, 0x80, 0x08]);
                body.extend_from_slice(&STOC);
                body.extend_from_slice(&[0xBE, init.len() as u8 + 2, 0x04, init.len() as u8]);
                body.extend_from_slice(&init);
                let mut out = vec![0x61, body.len() as u8];
                out.extend_from_slice(&body);
                return out;
            }
            let (_, plain) = ciphering::decrypt(
                &self.keys.block_cipher,
                &self.keys.authentication,
                &self.client_title,
                req,
            )
            .expect("the client's request opens");
            self.seen.push(plain.clone());
            match plain[0] {
                0xC3 => {
                    let f_stoc = &plain[plain.len() - 17..];
                    ciphering::verify_hls(&self.keys, &self.client_title, &STOC, f_stoc)
                        .expect("pass 3 verifies");
                    if self.fault == Fault::RefusePass3 {
                        return self.seal(&[0xC7, 0x01, plain[2], 0x03, 0x00]);
                    }
                    let challenge = if self.fault == Fault::BadPass4 {
                        b"other".to_vec()
                    } else {
                        self.ctos.clone()
                    };
                    let f = ciphering::hls_response(&self.keys, &self.title, 5, &challenge);
                    let mut a = vec![0xC7, 0x01, plain[2], 0x00, 0x01, 0x00, 0x09, 0x11];
                    a.extend_from_slice(&f);
                    self.seal(&a)
                }
                _ => {
                    let a = [0xC4, 0x01, plain[2], 0x00, 0x12, 0x59, 0xE4];
                    if self.fault == Fault::PlainAnswer {
                        a.to_vec()
                    } else {
                        self.seal(&a)
                    }
                }
            }
        }
    }

    impl Link for FakeHlsMeter {
        async fn open(&mut self) -> std::result::Result<(), LinkError> {
            Ok(())
        }
        async fn exchange(
            &mut self,
            apdu: &[u8],
            rec: Recovery,
        ) -> std::result::Result<Vec<u8>, LinkError> {
            assert!(!rec.repeatable, "a ciphered request must never be re-sent");
            Ok(self.answer(apdu))
        }
        async fn close(&mut self) -> std::result::Result<(), LinkError> {
            Ok(())
        }
    }

    async fn hls_client(fault: Fault) -> DlmsClient<FakeHlsMeter> {
        let meter = FakeHlsMeter::new(fault);
        let security = Security {
            keys: meter.keys.clone(),
            system_title: meter.client_title,
            counter: counter::InvocationCounter::shared(None, 1)
                .await
                .expect("counter"),
            dedicated_key: false,
        };
        DlmsClient::new(
            meter,
            ClientSettings {
                security: Some(security),
                ..settings()
            },
        )
    }

    #[tokio::test]
    async fn hls_association_ciphers_every_request_and_checks_every_answer() {
        let attr = regs()[0].attr;
        let mut c = hls_client(Fault::None).await;
        let aare = c.associate().await.expect("associate");
        assert_eq!(aare.server_max_receive_pdu, 1024);
        assert_eq!(c.get_one(&attr).await.expect("get"), Ok(Data::U16(23012)));
        assert_eq!(c.get_one(&attr).await.expect("get"), Ok(Data::U16(23012)));
        // pass 3 and two GETs reached the meter as plain APDUs inside ciphered ones.
        let tags: Vec<u8> = c.link.seen.iter().map(|p| p[0]).collect();
        assert_eq!(tags, [0xC3, 0xC0, 0xC0]);
        let shown = format!("{:?}", c.settings);
        assert!(!shown.contains("7, 7") && shown.contains("***"), "{shown}");

        let mut c = hls_client(Fault::Replay).await;
        let e = c.associate().await.expect_err("replayed counter in pass 4");
        assert!(e.to_string().contains("replayed invocation counter"), "{e}");
        assert!(e.is_permanent() && e.is_authentication());

        let mut c = hls_client(Fault::PlainAnswer).await;
        c.associate().await.expect("associate");
        let e = c.get_one(&attr).await.expect_err("plain answer refused");
        assert!(matches!(e, Error::Ciphered(_)), "{e}");
        assert!(c.association().is_none(), "association dropped");

        let mut c = hls_client(Fault::BadPass4).await;
        let e = c.associate().await.expect_err("pass 4 must verify");
        assert!(matches!(e, Error::HlsVerify(_)), "{e}");
        assert!(e.to_string().contains("does not verify"), "{e}");
        assert!(c.association().is_none());

        let mut c = hls_client(Fault::RefusePass3).await;
        let e = c.associate().await.expect_err("pass 3 refused");
        assert!(matches!(e, Error::HlsRefused(_)), "{e}");
        assert!(e.to_string().contains("refused our response"), "{e}");
    }

    #[test]
    fn list_capacity_follows_pdu() {
        let c = DlmsClient::new(
            Script {
                steps: VecDeque::new(),
            },
            settings(),
        );
        let aare = |pdu| Aare {
            conformance: Conformance(0),
            server_max_receive_pdu: pdu,
            dlms_version: 6,
        };
        assert_eq!(c.list_capacity(&aare(100)), 9);
        assert_eq!(c.list_capacity(&aare(1024)), 102);
        assert_eq!(c.list_capacity(&aare(10)), 1);
    }

    #[test]
    fn scaling_is_exact_for_decimal_scalers() {
        assert_eq!(scale(23012.0, -2), 230.12);
        assert_eq!(scale(4512.0, -3), 4.512);
        assert_eq!(scale(7.0, 3), 7000.0);
    }
}
