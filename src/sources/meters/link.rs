//! Async DLMS link drivers: HDLC (IEC 62056-46) and the IEC 62056-47 wrapper over any
//! `AsyncRead + AsyncWrite + Unpin` stream, for the client (poller) and the server (simulator).
//!
//! A link moves whole APDUs: it opens and closes the HDLC connection (SNRM/UA, DISC/UA),
//! segments requests to the negotiated information field, reassembles responses, acknowledges
//! segments and adds or strips the LLC header. It must not open sockets, apply timeouts (callers
//! wrap `exchange` in `tokio::time::timeout`) or understand APDU contents.
//!
//! Link recovery (`exchange_recovering`): a lost or damaged answer is recovered inside the
//! association the way each framing allows, up to [`Recovery::retries`] times, before the
//! exchange fails and the caller must associate again. HDLC polls with RR: the meter either
//! re-transmits its answer, or says by its N(R) whether it got the request (then the request is
//! sent again as a new I-frame, its lost answer's sequence number skipped) or not (then the
//! unacknowledged I-frame is re-sent with the same sequence numbers). Repeated I-frames are
//! acknowledged and dropped. The wrapper has no sequence numbers: the request is sent again.
//!
//! Cancelling a call mid-way leaves the HDLC sequence numbers in an unknown state: drop the link
//! and reconnect.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::dlms::hdlc::{self, Address, AddressSizes, Control, Frame, Parameters};
use crate::dlms::wrapper::{self, WrapperCodec};
use tokio_util::codec::Decoder;

/// Bytes reserved in the read buffer before each read.
const READ_CHUNK: usize = 4096;

/// Largest information field we agree to: the 11-bit frame length minus the largest header.
pub const MAX_INFO_LEN: usize = hdlc::MAX_FRAME_LEN - 16;

/// Errors of the link layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the stream failed.
    #[error("link i/o error")]
    Io(#[from] std::io::Error),
    /// An HDLC frame could not be encoded, or the peer sent malformed negotiation parameters.
    #[error("hdlc error")]
    Hdlc(#[from] hdlc::Error),
    /// The wrapper stream is corrupt or an APDU is too long for it.
    #[error("wrapper error")]
    Wrapper(#[from] wrapper::Error),
    /// The peer closed the stream.
    #[error("connection closed by peer")]
    Closed,
    /// The meter answered DM: it is disconnected or refuses the connection.
    #[error("meter is in disconnected mode (dm)")]
    Dm,
    /// The meter answered RNR: it is busy.
    #[error("meter is not ready (rnr)")]
    Rnr,
    /// The peer rejected one of our frames (FRMR).
    #[error("peer rejected a frame (frmr)")]
    Frmr,
    /// A frame arrived out of sequence or of a kind not allowed at this point.
    #[error("unexpected hdlc frame: {0}")]
    Unexpected(String),
    /// `exchange` or `respond` was called before the link was opened.
    #[error("link is not open")]
    NotOpen,
    /// The HDLC server address size is not 1, 2 or 4.
    #[error("invalid hdlc server address size {0}")]
    AddressSize(u8),
    /// No usable answer after every recovery attempt: the association is dead.
    #[error("no usable answer after {attempts} recovery attempts ({last})")]
    NoAnswer {
        /// Recovery attempts made.
        attempts: u32,
        /// What went wrong last: `timeout` or `damaged frame`.
        last: &'static str,
    },
    /// The meter took the request but its answer is lost, and the request must not be executed
    /// twice (an ACTION).
    #[error("the answer to a non-repeatable request was lost")]
    AnswerLost,
}

/// How one exchange recovers from lost or damaged answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Wait for each answer frame (and for each answer to a poll).
    pub timeout: Duration,
    /// Recovery attempts (polls or re-sends) before the exchange fails.
    pub retries: u32,
    /// Whether the request may be executed again when the meter took it but its answer is lost
    /// (GET and SET: yes; ACTION: no).
    pub repeatable: bool,
}

/// Why an answer did not arrive, for the recovery loop.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Nothing within the timeout.
    Silence,
    /// A frame arrived with a bad check sequence.
    Damaged,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Silence => "timeout",
            Fault::Damaged => "damaged frame",
        }
    }
}

/// Negotiated link limits, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    /// Largest information field (bytes) we send in one frame.
    pub max_info_tx: usize,
    /// Largest information field (bytes) the peer sends us in one frame.
    pub max_info_rx: usize,
    /// Frames we send before waiting for an acknowledgement.
    pub window_tx: u8,
    /// Frames the peer sends before waiting for our acknowledgement.
    pub window_rx: u8,
}

impl Default for LinkParams {
    fn default() -> Self {
        Parameters::default().into()
    }
}

impl From<Parameters> for LinkParams {
    fn from(p: Parameters) -> Self {
        Self {
            max_info_tx: usize::from(p.max_info_tx),
            max_info_rx: usize::from(p.max_info_rx),
            window_tx: p.window_tx,
            window_rx: p.window_rx,
        }
    }
}

impl From<LinkParams> for Parameters {
    fn from(p: LinkParams) -> Self {
        let info = |v: usize| u16::try_from(v.clamp(1, MAX_INFO_LEN)).expect("clamped");
        Self {
            max_info_tx: info(p.max_info_tx),
            max_info_rx: info(p.max_info_rx),
            window_tx: p.window_tx.clamp(1, 7),
            window_rx: p.window_rx.clamp(1, 7),
        }
    }
}

/// Who talks to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddress {
    /// Client SAP (16 = public client). Wrapper: source wPort.
    pub client: u16,
    /// Server logical device (upper HDLC address). Wrapper: destination wPort.
    pub logical: u16,
    /// Server physical device (lower HDLC address); unused with a 1-byte address.
    pub physical: u16,
    /// HDLC server address size in bytes: 1, 2 or 4.
    pub address_size: u8,
}

impl LinkAddress {
    fn server_address(&self) -> Result<Address, Error> {
        match self.address_size {
            1 => Ok(Address::single(self.logical)),
            2 | 4 => Ok(Address::server(self.logical, self.physical)),
            other => Err(Error::AddressSize(other)),
        }
    }
}

/// HDLC frame I/O shared by client and server: a buffered reader and a write buffer.
#[derive(Debug)]
struct FrameIo<S> {
    /// The byte stream to the peer.
    stream: S,
    /// Bytes read but not yet decoded.
    rbuf: BytesMut,
    /// Frames encoded but not yet written; flushed in one write per poll.
    wbuf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(READ_CHUNK),
        }
    }

    fn queue(&mut self, frame: &Frame, sizes: AddressSizes) -> Result<(), Error> {
        frame.encode(sizes, &mut self.wbuf)?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    async fn send(&mut self, frame: &Frame, sizes: AddressSizes) -> Result<(), Error> {
        self.queue(frame, sizes)?;
        self.flush().await
    }

    /// Next frame, or the news that a damaged one arrived (its bytes, and anything buffered
    /// after them, are discarded: recovery asks for what is needed again).
    async fn read_event(&mut self) -> Result<Result<Frame, hdlc::Error>, Error> {
        loop {
            match hdlc::decode_sized(&mut self.rbuf) {
                Ok(Some((frame, _))) => return Ok(Ok(frame)),
                Ok(None) => {}
                Err(error) => {
                    self.rbuf.clear();
                    return Ok(Err(error));
                }
            }
            self.rbuf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }

    /// Next well-formed frame. Corrupted frames and garbage are logged and skipped.
    async fn read_frame(&mut self) -> Result<(Frame, AddressSizes), Error> {
        loop {
            match hdlc::decode_sized(&mut self.rbuf) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "Dropped a corrupted HDLC frame.");
                    continue;
                }
            }
            self.rbuf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }
}

/// Removes the response LLC header (E6 E7 00) from a reassembled APDU, tolerating its absence.
fn strip_llc(mut data: Vec<u8>) -> Vec<u8> {
    if data.starts_with(&hdlc::LLC_RESPONSE) {
        data.drain(..hdlc::LLC_RESPONSE.len());
    } else {
        tracing::debug!("Response without LLC header.");
    }
    data
}

fn next_seq(n: u8) -> u8 {
    (n + 1) & 7
}

fn unexpected(what: &str, frame: &Frame) -> Error {
    Error::Unexpected(format!("{what}: {:?}", frame.control))
}

/// HDLC client: the poller's side of an HDLC-over-TCP link.
#[derive(Debug)]
pub struct HdlcClient<S> {
    /// Frame reader/writer over the meter stream.
    io: FrameIo<S>,
    /// Our (client) address.
    client: Address,
    /// The meter's address.
    server: Address,
    /// Wire sizes of destination (server) and source (client) addresses for frames we send.
    sizes: AddressSizes,
    /// What we propose in SNRM.
    proposal: Parameters,
    /// What was negotiated in UA; valid when `open`.
    params: Parameters,
    /// N(S) of our next I-frame.
    ns: u8,
    /// N(R): the next N(S) we expect from the meter.
    nr: u8,
    /// Whether SNRM/UA succeeded and no DISC was sent since.
    open: bool,
    /// Recovery attempts made on this link, ever (health telemetry).
    recoveries: u64,
    /// Repeated I-frames dropped on this link, ever (health telemetry).
    duplicates: u64,
    /// The meter answered an RR poll with an N(R) outside the send window once: its N(R) is
    /// not used to tell a missed request from a lost answer any more.
    rr_unreliable: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HdlcClient<S> {
    /// A client for `address` proposing `proposal` in SNRM. Does no I/O.
    pub fn new(stream: S, address: LinkAddress, proposal: LinkParams) -> Result<Self, Error> {
        let server = address.server_address()?;
        Ok(Self {
            io: FrameIo::new(stream),
            client: Address::single(address.client),
            server,
            sizes: AddressSizes {
                dest: address.address_size,
                src: 1,
            },
            proposal: proposal.into(),
            params: Parameters::default(),
            ns: 0,
            nr: 0,
            open: false,
            recoveries: 0,
            duplicates: 0,
            rr_unreliable: false,
        })
    }

    /// Recovery attempts made on this link so far.
    pub fn recoveries(&self) -> u64 {
        self.recoveries
    }

    /// Repeated I-frames dropped on this link so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Like `read_own`, but reports a damaged frame instead of skipping it.
    async fn read_own_event(&mut self) -> Result<Result<Frame, hdlc::Error>, Error> {
        loop {
            match self.io.read_event().await? {
                Ok(frame) if frame.dest.upper != self.client.upper => {
                    tracing::debug!(dest = ?frame.dest, "Ignored a frame for another station.");
                }
                other => return Ok(other),
            }
        }
    }

    /// `read_own_event` bounded by `timeout`: `Ok(Err(fault))` when nothing usable came.
    async fn read_timed(&mut self, timeout: Duration) -> Result<Result<Frame, Fault>, Error> {
        match tokio::time::timeout(timeout, self.read_own_event()).await {
            Err(_) => Ok(Err(Fault::Silence)),
            Ok(Ok(Ok(frame))) => Ok(Ok(frame)),
            Ok(Ok(Err(error))) => {
                tracing::debug!(%error, "Damaged HDLC frame.");
                Ok(Err(Fault::Damaged))
            }
            Ok(Err(e)) => Err(e),
        }
    }

    /// Sends a whole APDU and returns its answer, recovering lost or damaged answers inside the
    /// link as the module documentation describes. Every wait is bounded by
    /// `rec.timeout`; after `rec.retries` failed attempts the link is marked closed.
    pub async fn exchange_recovering(
        &mut self,
        apdu: &[u8],
        rec: Recovery,
    ) -> Result<Vec<u8>, Error> {
        if !self.open {
            return Err(Error::NotOpen);
        }
        let mut last_window = self.send_apdu_timed(apdu, rec.timeout).await?;
        let mut data: Vec<u8> = Vec::new();
        let mut since_ack = 0u8;
        let mut attempts = 0u32;
        let mut fault: Option<Fault> = None;
        loop {
            if let Some(f) = fault.take() {
                if attempts >= rec.retries {
                    self.open = false;
                    return Err(Error::NoAnswer {
                        attempts,
                        last: f.name(),
                    });
                }
                attempts += 1;
                self.recoveries += 1;
                tracing::debug!(
                    fault = f.name(),
                    attempt = attempts,
                    "Polling the meter with RR."
                );
                let rr = self.frame(
                    Control::Rr {
                        nr: self.nr,
                        pf: true,
                    },
                    false,
                    Vec::new(),
                );
                self.io.send(&rr, self.sizes).await?;
                // The poll's answer decides how to go on.
                match self.read_timed(rec.timeout).await? {
                    Err(f) => fault = Some(f),
                    Ok(frame) => match frame.control {
                        // Busy: poll again, within the same budget.
                        Control::Rnr { .. } => fault = Some(Fault::Silence),
                        Control::Rr { nr, .. } => {
                            let first_unacked = last_window.first().and_then(|f| match f.control {
                                Control::I { ns, .. } => Some(ns),
                                _ => None,
                            });
                            let in_window = Some(nr) == first_unacked || nr == self.ns;
                            if !in_window && !self.rr_unreliable {
                                // Some meters (Gurux among them) count N(R) up on every RR
                                // they answer: from now on their N(R) says nothing.
                                tracing::debug!(
                                    nr,
                                    next = self.ns,
                                    "Meter's RR N(R) is outside the window; not trusting it."
                                );
                                self.rr_unreliable = true;
                            }
                            // A damaged answer proves the meter got the request, whatever it
                            // says; otherwise trust an in-window N(R).
                            let missed = Some(nr) == first_unacked
                                && !self.rr_unreliable
                                && !matches!(f, Fault::Damaged);
                            if missed {
                                // The meter never got the request: same frames, same numbers.
                                tracing::debug!(nr, "Meter missed the request; re-sending it.");
                                for f in &last_window {
                                    self.io.queue(f, self.sizes)?;
                                }
                                self.io.flush().await?;
                            } else if !data.is_empty() {
                                // Part of a segmented answer is lost for good.
                                self.open = false;
                                return Err(Error::Unexpected(format!(
                                    "segmented answer broken off (rr {nr})"
                                )));
                            } else if !rec.repeatable {
                                self.open = false;
                                return Err(Error::AnswerLost);
                            } else {
                                // The meter took the request and will not repeat its answer:
                                // skip the lost answer's sequence number and ask again.
                                tracing::debug!(nr, "Meter lost its answer; asking again.");
                                self.nr = next_seq(self.nr);
                                last_window = self.send_apdu_timed(apdu, rec.timeout).await?;
                            }
                        }
                        Control::I { .. } => {
                            // The re-transmitted answer (or a duplicate): handle it as any.
                            if let Some(done) = self
                                .on_answer_frame(frame, &mut data, &mut since_ack)
                                .await?
                            {
                                return Ok(done);
                            }
                        }
                        Control::Frmr => return Err(Error::Frmr),
                        Control::Dm | Control::Disc => {
                            self.open = false;
                            return Err(Error::Dm);
                        }
                        _ => fault = Some(Fault::Silence),
                    },
                }
                if fault.is_some() {
                    continue;
                }
            }
            match self.read_timed(rec.timeout).await? {
                Err(f) => fault = Some(f),
                Ok(frame) => match frame.control {
                    Control::I { .. } => {
                        if let Some(done) = self
                            .on_answer_frame(frame, &mut data, &mut since_ack)
                            .await?
                        {
                            return Ok(done);
                        }
                    }
                    Control::Rnr { .. } => return Err(Error::Rnr),
                    Control::Frmr => return Err(Error::Frmr),
                    Control::Dm | Control::Disc => {
                        self.open = false;
                        return Err(Error::Dm);
                    }
                    _ => {
                        tracing::debug!(control = ?frame.control, "Ignored a frame while receiving.")
                    }
                },
            }
        }
    }

    /// One I-frame of an answer: the complete APDU when it was the last segment. Repeats are
    /// acknowledged and dropped; a gap is an error.
    async fn on_answer_frame(
        &mut self,
        frame: Frame,
        data: &mut Vec<u8>,
        since_ack: &mut u8,
    ) -> Result<Option<Vec<u8>>, Error> {
        let Control::I { ns, pf, .. } = frame.control else {
            return Ok(None);
        };
        if ns != self.nr {
            if next_seq(ns) == self.nr {
                tracing::debug!(ns, "Dropped a repeated I-frame.");
                self.duplicates += 1;
                let rr = self.frame(
                    Control::Rr {
                        nr: self.nr,
                        pf: true,
                    },
                    false,
                    Vec::new(),
                );
                self.io.send(&rr, self.sizes).await?;
                return Ok(None);
            }
            self.open = false;
            return Err(Error::Unexpected(format!(
                "i-frame {ns} out of sequence, expected {}",
                self.nr
            )));
        }
        self.nr = next_seq(self.nr);
        *since_ack += 1;
        data.extend_from_slice(&frame.info);
        if !frame.segmented {
            return Ok(Some(strip_llc(std::mem::take(data))));
        }
        if pf || *since_ack >= self.params.window_rx {
            *since_ack = 0;
            let rr = self.frame(
                Control::Rr {
                    nr: self.nr,
                    pf: true,
                },
                false,
                Vec::new(),
            );
            self.io.send(&rr, self.sizes).await?;
        }
        Ok(None)
    }

    /// Sends a whole APDU, waiting (bounded) for the meter's RR between windows; returns the
    /// frames of the last window, which recovery may have to send again.
    async fn send_apdu_timed(
        &mut self,
        apdu: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Frame>, Error> {
        let max = usize::from(self.params.max_info_tx);
        let window = self.params.window_tx;
        let mut data = Vec::with_capacity(apdu.len() + 3);
        data.extend_from_slice(&hdlc::LLC_REQUEST);
        data.extend_from_slice(apdu);
        let mut pending = Vec::new();
        for seg in hdlc::segments(&data, max, window) {
            let control = Control::I {
                ns: self.ns,
                nr: self.nr,
                pf: seg.poll,
            };
            let frame = self.frame(control, seg.more, seg.info.to_vec());
            self.io.queue(&frame, self.sizes)?;
            pending.push(frame);
            self.ns = next_seq(self.ns);
            if seg.poll {
                self.io.flush().await?;
                if seg.more {
                    match tokio::time::timeout(timeout, self.wait_rr()).await {
                        Ok(r) => r?,
                        Err(_) => {
                            self.open = false;
                            return Err(Error::NoAnswer {
                                attempts: 0,
                                last: "timeout",
                            });
                        }
                    }
                    pending.clear();
                }
            }
        }
        Ok(pending)
    }

    fn frame(&self, control: Control, segmented: bool, info: Vec<u8>) -> Frame {
        Frame {
            segmented,
            dest: self.server,
            src: self.client,
            control,
            info,
        }
    }

    /// Reads the next frame addressed to us; frames for other clients (and echoes of our own
    /// frames on half-duplex converters) are skipped. The source address is not checked: some
    /// meters answer from a different address form than the one they were called with.
    async fn read_own(&mut self) -> Result<Frame, Error> {
        loop {
            let (frame, _) = self.io.read_frame().await?;
            if frame.dest.upper == self.client.upper {
                if frame.src.upper != self.server.upper {
                    tracing::debug!(src = ?frame.src, "Frame from an unexpected server address.");
                }
                return Ok(frame);
            }
            tracing::debug!(dest = ?frame.dest, src = ?frame.src, "Ignored a frame for another station.");
        }
    }

    /// SNRM/UA: connects the link and negotiates its limits.
    pub async fn open(&mut self) -> Result<LinkParams, Error> {
        self.open = false;
        // Default parameters are implied by an empty SNRM; some older meters refuse an SNRM that
        // carries an information field, so only send one when it says something.
        let info = if self.proposal == Parameters::default() {
            Vec::new()
        } else {
            self.proposal.encode()
        };
        let snrm = self.frame(Control::Snrm, false, info);
        self.io.send(&snrm, self.sizes).await?;
        loop {
            let frame = self.read_own().await?;
            match frame.control {
                Control::Ua => {
                    let theirs = Parameters::parse(&frame.info)?;
                    self.params = Parameters::negotiate(&self.proposal, &theirs);
                    self.ns = 0;
                    self.nr = 0;
                    self.open = true;
                    tracing::debug!(params = ?self.params, "HDLC link open.");
                    return Ok(self.params.into());
                }
                Control::Dm => return Err(Error::Dm),
                Control::Frmr => return Err(Error::Frmr),
                _ => tracing::debug!(control = ?frame.control, "Ignored a frame while opening."),
            }
        }
    }

    /// Sends a whole APDU and returns the whole response APDU.
    pub async fn exchange(&mut self, apdu: &[u8]) -> Result<Vec<u8>, Error> {
        if !self.open {
            return Err(Error::NotOpen);
        }
        self.send_apdu(apdu).await?;
        self.receive_apdu().await
    }

    async fn send_apdu(&mut self, apdu: &[u8]) -> Result<(), Error> {
        let max = usize::from(self.params.max_info_tx);
        let window = self.params.window_tx;
        let mut data = Vec::with_capacity(apdu.len() + 3);
        data.extend_from_slice(&hdlc::LLC_REQUEST);
        data.extend_from_slice(apdu);
        for seg in hdlc::segments(&data, max, window) {
            let control = Control::I {
                ns: self.ns,
                nr: self.nr,
                pf: seg.poll,
            };
            let frame = self.frame(control, seg.more, seg.info.to_vec());
            self.io.queue(&frame, self.sizes)?;
            self.ns = next_seq(self.ns);
            if seg.poll {
                self.io.flush().await?;
                if seg.more {
                    self.wait_rr().await?;
                }
            }
        }
        Ok(())
    }

    /// Waits for the meter's RR acknowledging every frame sent so far.
    async fn wait_rr(&mut self) -> Result<(), Error> {
        loop {
            let frame = self.read_own().await?;
            match frame.control {
                Control::Rr { nr, .. } if nr == self.ns => return Ok(()),
                Control::Rr { nr, .. } => {
                    return Err(Error::Unexpected(format!(
                        "rr asks for frame {nr}, next is {}",
                        self.ns
                    )))
                }
                Control::Rnr { .. } => return Err(Error::Rnr),
                Control::Frmr => return Err(Error::Frmr),
                Control::Dm | Control::Disc => {
                    self.open = false;
                    return Err(Error::Dm);
                }
                Control::I { .. } => return Err(unexpected("i-frame while sending", &frame)),
                _ => tracing::debug!(control = ?frame.control, "Ignored a frame while sending."),
            }
        }
    }

    async fn receive_apdu(&mut self) -> Result<Vec<u8>, Error> {
        let mut data: Vec<u8> = Vec::new();
        let mut since_ack = 0u8;
        loop {
            let frame = self.read_own().await?;
            match frame.control {
                Control::I { ns, pf, .. } => {
                    if ns != self.nr {
                        if next_seq(ns) == self.nr {
                            // A repeat of the frame we already have: re-acknowledge it.
                            tracing::debug!(ns, "Dropped a repeated I-frame.");
                            let rr = self.frame(
                                Control::Rr {
                                    nr: self.nr,
                                    pf: true,
                                },
                                false,
                                Vec::new(),
                            );
                            self.io.send(&rr, self.sizes).await?;
                            continue;
                        }
                        return Err(Error::Unexpected(format!(
                            "i-frame {ns} out of sequence, expected {}",
                            self.nr
                        )));
                    }
                    self.nr = next_seq(self.nr);
                    since_ack += 1;
                    if data.is_empty() && !frame.segmented {
                        // Fast path: the whole response in one frame.
                        return Ok(strip_llc(frame.info));
                    }
                    // The LLC header may itself be split over tiny frames: strip it only once the
                    // APDU is complete.
                    data.extend_from_slice(&frame.info);
                    if !frame.segmented {
                        return Ok(strip_llc(data));
                    }
                    if pf || since_ack >= self.params.window_rx {
                        since_ack = 0;
                        let rr = self.frame(
                            Control::Rr {
                                nr: self.nr,
                                pf: true,
                            },
                            false,
                            Vec::new(),
                        );
                        self.io.send(&rr, self.sizes).await?;
                    }
                }
                Control::Rnr { .. } => return Err(Error::Rnr),
                Control::Frmr => return Err(Error::Frmr),
                Control::Dm | Control::Disc => {
                    self.open = false;
                    return Err(Error::Dm);
                }
                _ => tracing::debug!(control = ?frame.control, "Ignored a frame while receiving."),
            }
        }
    }

    /// DISC: releases the link. A UA or a DM both end it.
    pub async fn close(&mut self) -> Result<(), Error> {
        self.open = false;
        let disc = self.frame(Control::Disc, false, Vec::new());
        self.io.send(&disc, self.sizes).await?;
        loop {
            let frame = self.read_own().await?;
            match frame.control {
                Control::Ua | Control::Dm => return Ok(()),
                Control::Frmr => return Err(Error::Frmr),
                _ => tracing::debug!(control = ?frame.control, "Ignored a frame while closing."),
            }
        }
    }

    /// The stream, e.g. to shut it down.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io.stream
    }
}

/// Wrapper client: the poller's side of an IEC 62056-47 link.
#[derive(Debug)]
pub struct WrapperClient<S> {
    /// The meter stream.
    stream: S,
    /// Bytes read but not yet decoded.
    rbuf: BytesMut,
    /// Encoded request, reused between calls.
    wbuf: BytesMut,
    /// Our wPort (client SAP).
    client: u16,
    /// The meter's wPort (logical device).
    logical: u16,
    /// Requests sent again after a lost answer, ever (health telemetry).
    recoveries: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WrapperClient<S> {
    /// A client for `address` (client SAP and logical device are the wPorts). Does no I/O.
    pub fn new(stream: S, address: LinkAddress) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            client: address.client,
            logical: address.logical,
            recoveries: 0,
        }
    }

    /// Requests sent again so far.
    pub fn recoveries(&self) -> u64 {
        self.recoveries
    }

    /// Sends one APDU and returns its answer; when none comes within `rec.timeout`, sends the
    /// request again, up to `rec.retries` times. (The wrapper has no sequence numbers, so a
    /// non-repeatable request is not sent again.)
    pub async fn exchange_recovering(
        &mut self,
        apdu: &[u8],
        rec: Recovery,
    ) -> Result<Vec<u8>, Error> {
        let mut attempts = 0u32;
        loop {
            match tokio::time::timeout(rec.timeout, self.exchange(apdu)).await {
                Ok(r) => return r,
                Err(_) if !rec.repeatable => return Err(Error::AnswerLost),
                Err(_) if attempts >= rec.retries => {
                    return Err(Error::NoAnswer {
                        attempts,
                        last: "timeout",
                    })
                }
                Err(_) => {
                    attempts += 1;
                    self.recoveries += 1;
                    tracing::debug!(attempt = attempts, "No answer; sending the request again.");
                }
            }
        }
    }

    /// Sends one APDU and returns the answer addressed to us.
    pub async fn exchange(&mut self, apdu: &[u8]) -> Result<Vec<u8>, Error> {
        self.wbuf.clear();
        wrapper::encode_parts(self.client, self.logical, apdu, &mut self.wbuf)?;
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        loop {
            let frame = read_wrapper(&mut self.stream, &mut self.rbuf).await?;
            if frame.destination == self.client && frame.source == self.logical {
                return Ok(frame.payload);
            }
            tracing::debug!(
                source = frame.source,
                destination = frame.destination,
                "Ignored a wrapper frame for another station."
            );
        }
    }

    /// The stream, e.g. to shut it down.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

async fn read_wrapper<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Result<wrapper::WrapperFrame, Error> {
    loop {
        if let Some(frame) = WrapperCodec.decode(rbuf)? {
            return Ok(frame);
        }
        rbuf.reserve(READ_CHUNK);
        if stream.read_buf(rbuf).await? == 0 {
            return Err(Error::Closed);
        }
    }
}

/// The client side of a meter link, HDLC or wrapper.
#[derive(Debug)]
pub enum ClientLink<S> {
    /// HDLC over a byte stream (serial converters, port 3333 style).
    Hdlc(HdlcClient<S>),
    /// IEC 62056-47 wrapper (TCP port 4059 style).
    Wrapper(WrapperClient<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientLink<S> {
    /// An HDLC client link proposing `proposal` in SNRM.
    pub fn hdlc(stream: S, address: LinkAddress, proposal: LinkParams) -> Result<Self, Error> {
        Ok(Self::Hdlc(HdlcClient::new(stream, address, proposal)?))
    }

    /// A wrapper client link.
    pub fn wrapper(stream: S, address: LinkAddress) -> Self {
        Self::Wrapper(WrapperClient::new(stream, address))
    }

    /// HDLC: SNRM/UA and parameter negotiation. Wrapper: no-op returning the wrapper's limits.
    pub async fn open(&mut self) -> Result<LinkParams, Error> {
        match self {
            ClientLink::Hdlc(c) => c.open().await,
            ClientLink::Wrapper(_) => Ok(LinkParams {
                max_info_tx: wrapper::MAX_PAYLOAD,
                max_info_rx: wrapper::MAX_PAYLOAD,
                window_tx: 1,
                window_rx: 1,
            }),
        }
    }

    /// Sends a whole APDU and returns the whole response APDU.
    pub async fn exchange(&mut self, apdu: &[u8]) -> Result<Vec<u8>, Error> {
        match self {
            ClientLink::Hdlc(c) => c.exchange(apdu).await,
            ClientLink::Wrapper(c) => c.exchange(apdu).await,
        }
    }

    /// Sends a whole APDU and returns its answer, recovering lost or damaged answers (see the
    /// module documentation). Every wait is bounded by `rec.timeout`.
    pub async fn exchange_recovering(
        &mut self,
        apdu: &[u8],
        rec: Recovery,
    ) -> Result<Vec<u8>, Error> {
        match self {
            ClientLink::Hdlc(c) => c.exchange_recovering(apdu, rec).await,
            ClientLink::Wrapper(c) => c.exchange_recovering(apdu, rec).await,
        }
    }

    /// Recovery attempts (polls, re-sent requests) made on this link so far.
    pub fn recoveries(&self) -> u64 {
        match self {
            ClientLink::Hdlc(c) => c.recoveries(),
            ClientLink::Wrapper(c) => c.recoveries(),
        }
    }

    /// HDLC: DISC, accepting UA or DM. Wrapper: no-op.
    pub async fn close(&mut self) -> Result<(), Error> {
        match self {
            ClientLink::Hdlc(c) => c.close().await,
            ClientLink::Wrapper(_) => Ok(()),
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut S {
        match self {
            ClientLink::Hdlc(c) => c.get_mut(),
            ClientLink::Wrapper(c) => c.get_mut(),
        }
    }
}

/// Server-side HDLC link settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HdlcServerConfig {
    /// Our logical device (upper address).
    pub logical: u16,
    /// Our physical device (lower address).
    pub physical: u16,
    /// The most we accept in negotiation, from our (server) point of view.
    pub limits: LinkParams,
    /// Answer frames whatever server address they carry.
    pub any_address: bool,
}

impl Default for HdlcServerConfig {
    fn default() -> Self {
        Self {
            logical: 1,
            physical: 17,
            limits: LinkParams::default(),
            any_address: false,
        }
    }
}

/// HDLC server: the meter's side of an HDLC link.
#[derive(Debug)]
pub struct HdlcServer<S> {
    /// Frame reader/writer over the client stream.
    io: FrameIo<S>,
    /// Our settings.
    config: HdlcServerConfig,
    /// Our address as the client addresses us; we answer with the same address and size.
    me: Address,
    /// The connected client's address.
    peer: Address,
    /// Wire sizes of frames we send (dest = client, src = us).
    sizes: AddressSizes,
    /// Negotiated limits from our point of view.
    params: Parameters,
    /// N(S) of our next I-frame.
    ns: u8,
    /// N(R): next N(S) expected from the client.
    nr: u8,
    /// SNRM accepted and no DISC since.
    connected: bool,
    /// The client closed the stream.
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HdlcServer<S> {
    /// A server link with `config`. Does no I/O.
    pub fn new(stream: S, config: HdlcServerConfig) -> Self {
        Self {
            io: FrameIo::new(stream),
            config,
            me: Address::server(config.logical, config.physical),
            peer: Address::single(16),
            sizes: AddressSizes { dest: 1, src: 2 },
            params: Parameters::default(),
            ns: 0,
            nr: 0,
            connected: false,
            eof: false,
        }
    }

    fn for_me(&self, dest: Address) -> bool {
        self.config.any_address
            || (dest.upper == self.config.logical
                && dest.lower.is_none_or(|l| l == self.config.physical))
    }

    fn frame(&self, control: Control, segmented: bool, info: Vec<u8>) -> Frame {
        Frame {
            segmented,
            dest: self.peer,
            src: self.me,
            control,
            info,
        }
    }

    async fn reply(&mut self, control: Control, info: Vec<u8>) -> Result<(), Error> {
        let frame = self.frame(control, false, info);
        self.io.send(&frame, self.sizes).await
    }

    async fn read_own(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let (frame, sizes) = match self.io.read_frame().await {
                Ok(found) => found,
                Err(Error::Closed) => {
                    self.eof = true;
                    self.connected = false;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if !self.for_me(frame.dest) {
                tracing::debug!(dest = ?frame.dest, "Ignored a frame for another server address.");
                continue;
            }
            if frame.control == Control::Snrm || !self.connected {
                self.me = frame.dest;
                self.peer = frame.src;
                self.sizes = AddressSizes {
                    dest: sizes.src,
                    src: sizes.dest,
                };
            }
            return Ok(Some(frame));
        }
    }

    async fn accept_snrm(&mut self, frame: &Frame) -> Result<(), Error> {
        let theirs = match Parameters::parse(&frame.info) {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, "Refused an SNRM with bad parameters.");
                return self.reply(Control::Frmr, Vec::new()).await;
            }
        };
        let limits = Parameters::from(self.config.limits);
        self.params = Parameters::negotiate(&limits, &theirs);
        self.ns = 0;
        self.nr = 0;
        self.connected = true;
        let ua_info = self.params.encode();
        self.reply(Control::Ua, ua_info).await
    }

    /// The next complete request APDU (LLC header stripped). Answers SNRM and DISC itself.
    /// `None` when the client closed the stream or sent DISC; see [`HdlcServer::is_closed`].
    pub async fn next_request(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let mut data: Vec<u8> = Vec::new();
        let mut since_ack = 0u8;
        loop {
            let Some(frame) = self.read_own().await? else {
                return Ok(None);
            };
            match frame.control {
                Control::Snrm => {
                    data.clear();
                    self.accept_snrm(&frame).await?;
                }
                Control::Disc => {
                    let answer = if self.connected {
                        Control::Ua
                    } else {
                        Control::Dm
                    };
                    self.connected = false;
                    self.reply(answer, Vec::new()).await?;
                    return Ok(None);
                }
                Control::I { .. } if !self.connected => {
                    self.reply(Control::Dm, Vec::new()).await?;
                }
                Control::I { ns, pf, .. } => {
                    if ns != self.nr {
                        // Repeat or gap: ask for the frame we expect.
                        tracing::debug!(ns, expected = self.nr, "I-frame out of sequence.");
                        self.reply(
                            Control::Rr {
                                nr: self.nr,
                                pf: true,
                            },
                            Vec::new(),
                        )
                        .await?;
                        continue;
                    }
                    self.nr = next_seq(self.nr);
                    since_ack += 1;
                    data.extend_from_slice(&frame.info);
                    if !frame.segmented {
                        if let Some(rest) = data.strip_prefix(&hdlc::LLC_REQUEST) {
                            return Ok(Some(rest.to_vec()));
                        }
                        tracing::debug!("Request without LLC header.");
                        return Ok(Some(data));
                    }
                    if pf || since_ack >= self.params.window_rx {
                        since_ack = 0;
                        self.reply(
                            Control::Rr {
                                nr: self.nr,
                                pf: true,
                            },
                            Vec::new(),
                        )
                        .await?;
                    }
                }
                Control::Rr { .. } if self.connected => {
                    // Nothing pending: answer the poll with an empty acknowledgement.
                    self.reply(
                        Control::Rr {
                            nr: self.nr,
                            pf: true,
                        },
                        Vec::new(),
                    )
                    .await?;
                }
                _ => tracing::debug!(control = ?frame.control, "Ignored a frame."),
            }
        }
    }

    /// Sends a whole response APDU, segmented to the negotiated limits.
    pub async fn respond(&mut self, apdu: &[u8]) -> Result<(), Error> {
        if !self.connected {
            return Err(Error::NotOpen);
        }
        let max = usize::from(self.params.max_info_tx);
        let window = self.params.window_tx;
        let mut data = Vec::with_capacity(apdu.len() + 3);
        data.extend_from_slice(&hdlc::LLC_RESPONSE);
        data.extend_from_slice(apdu);
        for seg in hdlc::segments(&data, max, window) {
            let control = Control::I {
                ns: self.ns,
                nr: self.nr,
                pf: seg.poll,
            };
            let frame = self.frame(control, seg.more, seg.info.to_vec());
            self.io.queue(&frame, self.sizes)?;
            self.ns = next_seq(self.ns);
            if seg.poll {
                self.io.flush().await?;
                if seg.more {
                    self.wait_rr().await?;
                }
            }
        }
        Ok(())
    }

    async fn wait_rr(&mut self) -> Result<(), Error> {
        loop {
            let Some(frame) = self.read_own().await? else {
                return Err(Error::Closed);
            };
            match frame.control {
                Control::Rr { nr, .. } if nr == self.ns => return Ok(()),
                Control::Rr { nr, .. } => {
                    return Err(Error::Unexpected(format!(
                        "rr asks for frame {nr}, next is {}",
                        self.ns
                    )))
                }
                Control::Rnr { .. } => return Err(Error::Rnr),
                Control::Disc => {
                    self.connected = false;
                    self.reply(Control::Ua, Vec::new()).await?;
                    return Err(Error::Closed);
                }
                Control::Ui => tracing::debug!("Ignored a UI frame while sending."),
                _ => return Err(unexpected("waiting for rr", &frame)),
            }
        }
    }

    /// Whether the client closed the stream (as opposed to only sending DISC).
    pub fn is_closed(&self) -> bool {
        self.eof
    }
}

/// Server-side wrapper link settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrapperServerConfig {
    /// Our wPort (logical device).
    pub logical: u16,
    /// Answer frames whatever destination wPort they carry.
    pub any_address: bool,
}

/// Wrapper server: the meter's side of an IEC 62056-47 link.
#[derive(Debug)]
pub struct WrapperServer<S> {
    /// The client stream.
    stream: S,
    /// Bytes read but not yet decoded.
    rbuf: BytesMut,
    /// Encoded response, reused.
    wbuf: BytesMut,
    /// Our settings.
    config: WrapperServerConfig,
    /// wPort we answer from (the one the client addressed).
    me: u16,
    /// The client's wPort of the last request.
    peer: u16,
    /// The client closed the stream.
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WrapperServer<S> {
    /// A server link with `config`. Does no I/O.
    pub fn new(stream: S, config: WrapperServerConfig) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            config,
            me: config.logical,
            peer: 16,
            eof: false,
        }
    }

    /// The next request APDU; `None` when the client closed the stream.
    pub async fn next_request(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            let frame = match read_wrapper(&mut self.stream, &mut self.rbuf).await {
                Ok(f) => f,
                Err(Error::Closed) => {
                    self.eof = true;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if !self.config.any_address && frame.destination != self.config.logical {
                tracing::debug!(
                    destination = frame.destination,
                    "Ignored a wrapper frame for another logical device."
                );
                continue;
            }
            self.me = frame.destination;
            self.peer = frame.source;
            return Ok(Some(frame.payload));
        }
    }

    /// Sends one response APDU to the client of the last request.
    pub async fn respond(&mut self, apdu: &[u8]) -> Result<(), Error> {
        self.wbuf.clear();
        wrapper::encode_parts(self.me, self.peer, apdu, &mut self.wbuf)?;
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// The server side of a meter link, HDLC or wrapper (used by the simulator).
#[derive(Debug)]
pub enum ServerLink<S> {
    /// HDLC over a byte stream.
    Hdlc(HdlcServer<S>),
    /// IEC 62056-47 wrapper.
    Wrapper(WrapperServer<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerLink<S> {
    /// The next complete request APDU; `None` when the peer closed the stream or (HDLC) sent
    /// DISC, which was answered. After `None`, [`ServerLink::is_closed`] tells whether the
    /// stream is still usable for a new SNRM.
    pub async fn next_request(&mut self) -> Result<Option<Vec<u8>>, Error> {
        match self {
            ServerLink::Hdlc(s) => s.next_request().await,
            ServerLink::Wrapper(s) => s.next_request().await,
        }
    }

    /// Sends a whole response APDU.
    pub async fn respond(&mut self, apdu: &[u8]) -> Result<(), Error> {
        match self {
            ServerLink::Hdlc(s) => s.respond(apdu).await,
            ServerLink::Wrapper(s) => s.respond(apdu).await,
        }
    }

    /// Whether the client closed the stream.
    pub fn is_closed(&self) -> bool {
        match self {
            ServerLink::Hdlc(s) => s.is_closed(),
            ServerLink::Wrapper(s) => s.eof,
        }
    }

    /// SAP of the client that sent the last SNRM (HDLC) or request (wrapper).
    pub fn client_sap(&self) -> u16 {
        match self {
            ServerLink::Hdlc(s) => s.peer.upper,
            ServerLink::Wrapper(s) => s.peer,
        }
    }

    /// Negotiated information field the server sends, for sizing responses (wrapper: unlimited).
    pub fn params(&self) -> LinkParams {
        match self {
            ServerLink::Hdlc(s) => s.params.into(),
            ServerLink::Wrapper(_) => LinkParams {
                max_info_tx: wrapper::MAX_PAYLOAD,
                max_info_rx: wrapper::MAX_PAYLOAD,
                window_tx: 1,
                window_rx: 1,
            },
        }
    }
}
