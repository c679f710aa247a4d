//! Link-layer integration tests: our HDLC client against our HDLC server over an in-memory
//! duplex (segmentation, window-1 poll/RR sequencing checked frame by frame), against scripted
//! misbehaving meters, and against the independent Gurux meter (`shared/meter-sim`) over
//! loopback TCP, for HDLC with 1-, 2- and 4-byte server addresses and for the wrapper.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use dlms_bridge::dlms::hdlc::{self, Address, AddressSizes, Control, Frame};
use dlms_bridge::sources::meters::link::{
    ClientLink, Error, HdlcServer, HdlcServerConfig, LinkAddress, LinkParams, Recovery,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::timeout;

/// Upper bound for any single step of a test; generous for a loaded CI box.
const STEP: Duration = Duration::from_secs(20);

/// A fixed AARQ: LN referencing, no security, conformance 0x007E1F, max PDU 1200.
const AARQ: [u8; 31] = [
    0x60, 0x1D, 0xA1, 0x09, 0x06, 0x07, 0x60, 0x85, 0x74, 0x05, 0x08, 0x01, 0x01, 0xBE, 0x10, 0x04,
    0x0E, 0x01, 0x00, 0x00, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00, 0x00, 0x7E, 0x1F, 0x04, 0xB0,
];

/// GET-Request-Normal of 3/1.0.32.7.0.255/2 (voltage L1 value), invoke id 1.
const GET_VOLTAGE: [u8; 13] = [
    0xC0, 0x01, 0xC1, 0x00, 0x03, 0x01, 0x00, 0x20, 0x07, 0x00, 0xFF, 0x02, 0x00,
];

fn address(size: u8, physical: u16) -> LinkAddress {
    LinkAddress {
        client: 16,
        logical: 1,
        physical,
        address_size: size,
    }
}

fn params(max_info: usize, window: u8) -> LinkParams {
    LinkParams {
        max_info_tx: max_info,
        max_info_rx: max_info,
        window_tx: window,
        window_rx: window,
    }
}

// ---------------------------------------------------------------------------------------------
// A stream tap that records every write, so frame order can be checked.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

type Log = Arc<Mutex<Vec<(Side, Vec<u8>)>>>;

struct Tap<S> {
    inner: S,
    side: Side,
    log: Log,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.log
                .lock()
                .expect("log lock")
                .push((this.side, buf[..*n].to_vec()));
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Every frame in the log, in write order, with the side that wrote it.
fn frames(log: &Log) -> Vec<(Side, Frame)> {
    let log = log.lock().expect("log lock");
    let mut out = Vec::new();
    let mut bufs = [BytesMut::new(), BytesMut::new()];
    for (side, bytes) in log.iter() {
        let buf = &mut bufs[usize::from(*side == Side::Server)];
        buf.extend_from_slice(bytes);
        while let Some(f) = hdlc::decode(buf).expect("our own frames are valid") {
            out.push((*side, f));
        }
    }
    out
}

/// Runs an echo server: answers each request with `respond(request)`, until DISC or EOF.
fn spawn_server<S>(mut server: HdlcServer<S>, respond: fn(&[u8]) -> Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(Some(req)) = server.next_request().await {
            if server.respond(&respond(&req)).await.is_err() {
                break;
            }
        }
    });
}

fn long_answer(req: &[u8]) -> Vec<u8> {
    // 0x7E bytes inside on purpose: HDLC-over-TCP does not escape them.
    let mut v: Vec<u8> = req.iter().rev().copied().collect();
    v.extend((0..200u16).map(|i| (i % 256) as u8));
    v.extend_from_slice(&[0x7E; 10]);
    v
}

/// Checks that a run of I-frames from `sender` is sent one at a time with the poll bit, each
/// segment acknowledged by an RR from the other side before the next one.
fn assert_window_one(frames: &[(Side, Frame)], sender: Side) {
    let mut i = 0;
    let mut segments = 0;
    while i < frames.len() {
        let (side, f) = &frames[i];
        if *side == sender {
            if let Control::I { ns, pf, .. } = f.control {
                assert!(pf, "frame {i}: I-frame without poll/final bit");
                if f.segmented {
                    segments += 1;
                    let (next_side, next) = &frames[i + 1];
                    assert_ne!(*next_side, sender, "frame {i}: next frame sent before RR");
                    assert_eq!(
                        next.control,
                        Control::Rr {
                            nr: (ns + 1) & 7,
                            pf: true
                        },
                        "frame {i}: not acknowledged by RR"
                    );
                }
            }
        }
        i += 1;
    }
    assert!(
        segments >= 2,
        "expected a segmented transfer, saw {segments} segments"
    );
}

#[tokio::test]
async fn hdlc_duplex_segments_both_ways_with_window_one() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let log: Log = Arc::default();
    let client_io = Tap {
        inner: a,
        side: Side::Client,
        log: log.clone(),
    };
    let server_io = Tap {
        inner: b,
        side: Side::Server,
        log: log.clone(),
    };
    let server = HdlcServer::new(
        server_io,
        HdlcServerConfig {
            limits: params(24, 1),
            ..HdlcServerConfig::default()
        },
    );
    spawn_server(server, long_answer);

    let mut link = ClientLink::hdlc(client_io, address(2, 17), params(16, 1)).expect("address");
    let negotiated = timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(negotiated, params(16, 1));

    let request: Vec<u8> = (0..100u8).chain([0x7E, 0x7E]).collect();
    let response = timeout(STEP, link.exchange(&request))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(response, long_answer(&request));

    // a second exchange continues the sequence numbers across the modulo-8 wrap
    let response = timeout(STEP, link.exchange(&AARQ))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(response, long_answer(&AARQ));
    timeout(STEP, link.close())
        .await
        .expect("in time")
        .expect("close");

    let frames = frames(&log);
    assert_window_one(&frames, Side::Client);
    assert_window_one(&frames, Side::Server);
    // both directions negotiated down to the client's 16 bytes
    for (side, f) in &frames {
        if let Control::I { .. } = f.control {
            assert!(
                f.info.len() <= 16,
                "{side:?} frame of {} bytes",
                f.info.len()
            );
        }
    }
    // the first I-frame of each APDU carries the LLC header
    let first_client_i = frames
        .iter()
        .find(|(s, f)| *s == Side::Client && matches!(f.control, Control::I { .. }))
        .expect("client sent I-frames");
    assert_eq!(&first_client_i.1.info[..3], &hdlc::LLC_REQUEST);
    let first_server_i = frames
        .iter()
        .find(|(s, f)| *s == Side::Server && matches!(f.control, Control::I { .. }))
        .expect("server sent I-frames");
    assert_eq!(&first_server_i.1.info[..3], &hdlc::LLC_RESPONSE);
    assert_eq!(frames.last().map(|(_, f)| f.control), Some(Control::Ua));
}

#[tokio::test]
async fn hdlc_duplex_window_three_polls_every_third_frame() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let log: Log = Arc::default();
    let server = HdlcServer::new(
        Tap {
            inner: b,
            side: Side::Server,
            log: log.clone(),
        },
        HdlcServerConfig {
            limits: params(20, 3),
            ..HdlcServerConfig::default()
        },
    );
    spawn_server(server, long_answer);
    let client_io = Tap {
        inner: a,
        side: Side::Client,
        log: log.clone(),
    };
    let mut link = ClientLink::hdlc(client_io, address(4, 17), params(20, 3)).expect("address");
    assert_eq!(
        timeout(STEP, link.open())
            .await
            .expect("in time")
            .expect("open"),
        params(20, 3)
    );
    let request = vec![0x55; 150];
    let response = timeout(STEP, link.exchange(&request))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(response, long_answer(&request));

    let client_i: Vec<bool> = frames(&log)
        .iter()
        .filter(|(s, f)| *s == Side::Client && matches!(f.control, Control::I { .. }))
        .map(|(_, f)| f.control.poll_final())
        .collect();
    // 153 bytes in 20-byte frames = 8 frames: poll on 3rd, 6th and the last
    assert_eq!(
        client_i,
        vec![false, false, true, false, false, true, false, true]
    );
}

#[tokio::test]
async fn default_proposal_sends_an_empty_snrm_and_takes_the_servers_limits() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let log: Log = Arc::default();
    let server = HdlcServer::new(
        b,
        HdlcServerConfig {
            limits: params(40, 1),
            ..HdlcServerConfig::default()
        },
    );
    spawn_server(server, long_answer);
    let client_io = Tap {
        inner: a,
        side: Side::Client,
        log: log.clone(),
    };
    let mut link =
        ClientLink::hdlc(client_io, address(1, 0), LinkParams::default()).expect("address");
    let negotiated = timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(negotiated, params(40, 1));
    let snrm = &frames(&log)[0].1;
    assert_eq!(snrm.control, Control::Snrm);
    assert!(snrm.info.is_empty());
    let response = timeout(STEP, link.exchange(&AARQ))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(response, long_answer(&AARQ));
}

#[tokio::test]
async fn hdlc_duplex_all_sizes_windows_and_address_forms() {
    for (max_info, window, size) in [(1, 1, 1), (5, 2, 2), (17, 7, 4), (128, 1, 2), (2000, 3, 4)] {
        let (a, b) = tokio::io::duplex(4096);
        let server = HdlcServer::new(
            b,
            HdlcServerConfig {
                limits: params(max_info, window),
                ..HdlcServerConfig::default()
            },
        );
        spawn_server(server, long_answer);
        let mut link =
            ClientLink::hdlc(a, address(size, 17), params(max_info, window)).expect("address");
        let negotiated = timeout(STEP, link.open())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(negotiated, params(max_info, window));
        for len in [0usize, 1, 2, 3, 100, 3000] {
            let request: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let response = timeout(STEP, link.exchange(&request))
                .await
                .expect("in time")
                .unwrap_or_else(|e| panic!("max_info {max_info} window {window} len {len}: {e}"));
            assert_eq!(
                response,
                long_answer(&request),
                "max_info {max_info} len {len}"
            );
        }
        timeout(STEP, link.close())
            .await
            .expect("in time")
            .expect("close");
    }
}

#[tokio::test]
async fn exchange_before_open_is_refused() {
    let (a, _b) = tokio::io::duplex(64);
    let mut link = ClientLink::hdlc(a, address(2, 17), LinkParams::default()).expect("address");
    let r = link.exchange(&AARQ).await;
    assert!(matches!(r, Err(Error::NotOpen)), "{r:?}");
    let (a, _b) = tokio::io::duplex(64);
    assert!(matches!(
        ClientLink::hdlc(a, address(3, 17), LinkParams::default()),
        Err(Error::AddressSize(3))
    ));
}

// ---------------------------------------------------------------------------------------------
// Scripted meters: a task answering each client frame with canned frames.
// ---------------------------------------------------------------------------------------------

fn meter_frame(control: Control, segmented: bool, info: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    Frame {
        segmented,
        dest: Address::single(16),
        src: Address::server(1, 17),
        control,
        info,
    }
    .encode(AddressSizes { dest: 1, src: 2 }, &mut out)
    .expect("valid frame");
    out
}

/// A meter that answers the n-th frame it receives with `script[n]` (raw bytes).
fn scripted_meter(script: Vec<Vec<u8>>) -> tokio::io::DuplexStream {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut script = script.into_iter();
        loop {
            match hdlc::decode(&mut buf) {
                Ok(Some(_)) => match script.next() {
                    Some(bytes) => {
                        if b.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                Ok(None) => {
                    if b.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    a
}

fn ua() -> Vec<u8> {
    meter_frame(Control::Ua, false, Vec::new())
}

#[tokio::test]
async fn dm_on_open_is_an_error() {
    let io = scripted_meter(vec![meter_frame(Control::Dm, false, Vec::new())]);
    let mut link = ClientLink::hdlc(io, address(2, 17), LinkParams::default()).expect("address");
    let r = timeout(STEP, link.open()).await.expect("in time");
    assert!(matches!(r, Err(Error::Dm)), "{r:?}");
}

#[tokio::test]
async fn rnr_and_frmr_during_exchange_are_errors() {
    for (answer, want) in [
        (Control::Rnr { nr: 1, pf: true }, "rnr"),
        (Control::Frmr, "frmr"),
        (Control::Dm, "dm"),
    ] {
        let io = scripted_meter(vec![ua(), meter_frame(answer, false, Vec::new())]);
        let mut link =
            ClientLink::hdlc(io, address(2, 17), LinkParams::default()).expect("address");
        timeout(STEP, link.open())
            .await
            .expect("in time")
            .expect("open");
        let r = timeout(STEP, link.exchange(&AARQ)).await.expect("in time");
        let ok = matches!(
            (&r, want),
            (Err(Error::Rnr), "rnr") | (Err(Error::Frmr), "frmr") | (Err(Error::Dm), "dm")
        );
        assert!(ok, "{want}: {r:?}");
    }
}

#[tokio::test]
async fn garbage_echoes_and_corrupted_frames_are_skipped() {
    let good = meter_frame(
        Control::I {
            ns: 0,
            nr: 1,
            pf: true,
        },
        false,
        vec![0xE6, 0xE7, 0x00, 0x7E, 0x61, 0x7E],
    );
    let mut corrupted = good.clone();
    corrupted[12] ^= 0x40;
    // an echo of a client frame, as half-duplex converters produce: not for us
    let mut echo = Vec::new();
    Frame {
        segmented: false,
        dest: Address::server(1, 17),
        src: Address::single(16),
        control: Control::I {
            ns: 0,
            nr: 0,
            pf: true,
        },
        info: vec![0xE6, 0xE6, 0x00, 0x60],
    }
    .encode(AddressSizes { dest: 2, src: 1 }, &mut echo)
    .expect("valid frame");
    let mut reply = vec![0x00, 0xFF, 0x7E, 0x7E, 0x13];
    reply.extend_from_slice(&echo);
    reply.extend_from_slice(&corrupted);
    reply.extend_from_slice(&[0xA0, 0x55]);
    reply.extend_from_slice(&good);
    let io = scripted_meter(vec![ua(), reply]);
    let mut link = ClientLink::hdlc(io, address(2, 17), LinkParams::default()).expect("address");
    timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    let r = timeout(STEP, link.exchange(&AARQ))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(r, vec![0x7E, 0x61, 0x7E]);
}

#[tokio::test]
async fn peer_closing_mid_exchange_is_an_error() {
    let io = scripted_meter(vec![ua()]);
    let mut link = ClientLink::hdlc(io, address(2, 17), LinkParams::default()).expect("address");
    timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    let r = timeout(STEP, link.exchange(&AARQ)).await.expect("in time");
    assert!(matches!(r, Err(Error::Closed)), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// The independent Gurux meter.
// ---------------------------------------------------------------------------------------------

use common::meter_sim::GuruxMeter;

fn assert_aare_accepted(aare: &[u8]) {
    assert_eq!(aare.first(), Some(&0x61), "not an AARE: {aare:02x?}");
    assert!(
        aare.windows(5).any(|w| w == [0xA2, 0x03, 0x02, 0x01, 0x00]),
        "association not accepted: {aare:02x?}"
    );
}

async fn gurux_hdlc_round(meter_args: &[&str], addr: LinkAddress, proposal: LinkParams) {
    let meter = GuruxMeter::start(meter_args).await;
    let mut link = ClientLink::hdlc(meter.connect().await, addr, proposal).expect("address");
    let negotiated = timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    let aare = timeout(STEP, link.exchange(&AARQ))
        .await
        .expect("in time")
        .expect("aarq exchange");
    assert_aare_accepted(&aare);
    let value = timeout(STEP, link.exchange(&GET_VOLTAGE))
        .await
        .expect("in time")
        .expect("get exchange");
    // get-response-normal, invoke 0xC1, data, long-unsigned
    assert_eq!(&value[..5], &[0xC4, 0x01, 0xC1, 0x00, 0x12], "{value:02x?}");
    timeout(STEP, link.close())
        .await
        .expect("in time")
        .expect("close");
    let _ = negotiated;
}

#[tokio::test]
async fn gurux_hdlc_one_byte_address_small_frames() {
    gurux_hdlc_round(
        &["--server-address", "1", "--max-info", "32"],
        address(1, 0),
        LinkParams::default(),
    )
    .await;
}

#[tokio::test]
async fn gurux_hdlc_two_byte_address_small_frames() {
    gurux_hdlc_round(
        &["--server-address", "1/17", "--max-info", "32"],
        address(2, 17),
        LinkParams::default(),
    )
    .await;
}

#[tokio::test]
async fn gurux_hdlc_four_byte_address_small_frames() {
    gurux_hdlc_round(
        &["--server-address", "1/4660", "--max-info", "32"],
        address(4, 4660),
        LinkParams::default(),
    )
    .await;
}

#[tokio::test]
async fn gurux_hdlc_negotiates_down_to_meter_limit() {
    let meter = GuruxMeter::start(&["--max-info", "32"]).await;
    let mut link =
        ClientLink::hdlc(meter.connect().await, address(2, 17), params(512, 1)).expect("address");
    let negotiated = timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(negotiated.max_info_tx, 32);
    assert_eq!(negotiated.max_info_rx, 32);
    assert_eq!(negotiated.window_tx, 1);
    let aare = timeout(STEP, link.exchange(&AARQ))
        .await
        .expect("in time")
        .expect("aarq exchange");
    assert_aare_accepted(&aare);
}

#[tokio::test]
async fn gurux_wrapper_aarq_and_get() {
    let meter = GuruxMeter::start(&["--transport", "wrapper"]).await;
    let mut link = ClientLink::wrapper(meter.connect().await, address(2, 17));
    timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    let aare = timeout(STEP, link.exchange(&AARQ))
        .await
        .expect("in time")
        .expect("aarq exchange");
    assert_aare_accepted(&aare);
    let value = timeout(STEP, link.exchange(&GET_VOLTAGE))
        .await
        .expect("in time")
        .expect("get exchange");
    assert_eq!(&value[..5], &[0xC4, 0x01, 0xC1, 0x00, 0x12], "{value:02x?}");
    timeout(STEP, link.close())
        .await
        .expect("in time")
        .expect("close");
}

// ---------------------------------------------------------------------------------------------
// Link recovery inside the association (scripted meters; an empty script entry is silence).
// ---------------------------------------------------------------------------------------------

/// A meter answering the n-th client frame with `script[n]` and recording every client frame.
fn recording_meter(script: Vec<Vec<u8>>) -> (tokio::io::DuplexStream, Arc<Mutex<Vec<Frame>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut script = script.into_iter();
        loop {
            match hdlc::decode(&mut buf) {
                Ok(Some(frame)) => {
                    log.lock().expect("log").push(frame);
                    match script.next() {
                        Some(bytes) => {
                            if b.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    }
                }
                Ok(None) => {
                    if b.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    (a, seen)
}

fn i_frame(ns: u8, nr: u8, apdu: &[u8]) -> Vec<u8> {
    let mut info = hdlc::LLC_RESPONSE.to_vec();
    info.extend_from_slice(apdu);
    meter_frame(Control::I { ns, nr, pf: true }, false, info)
}

fn rr(nr: u8) -> Vec<u8> {
    meter_frame(Control::Rr { nr, pf: true }, false, Vec::new())
}

/// `frame` with one information byte flipped: its FCS no longer matches.
fn damaged(mut frame: Vec<u8>) -> Vec<u8> {
    let at = frame.len() - 5;
    frame[at] ^= 0x5A;
    frame
}

const ANSWER: [u8; 7] = [0xC4, 0x01, 0xC1, 0x00, 0x12, 0x59, 0xE4];

fn recovery(retries: u32, repeatable: bool) -> Recovery {
    Recovery {
        timeout: Duration::from_millis(300),
        retries,
        repeatable,
    }
}

async fn open_scripted(
    script: Vec<Vec<u8>>,
) -> (ClientLink<tokio::io::DuplexStream>, Arc<Mutex<Vec<Frame>>>) {
    let (io, seen) = recording_meter(script);
    let mut link = ClientLink::hdlc(io, address(2, 17), LinkParams::default()).expect("address");
    timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("open");
    (link, seen)
}

fn controls(seen: &Arc<Mutex<Vec<Frame>>>) -> Vec<Control> {
    seen.lock()
        .expect("log")
        .iter()
        .map(|f| f.control)
        .collect()
}

#[tokio::test]
async fn damaged_answer_is_polled_with_rr_and_the_retransmission_taken() {
    let (mut link, seen) = open_scripted(vec![
        ua(),
        damaged(i_frame(0, 1, &ANSWER)),
        i_frame(0, 1, &ANSWER),
    ])
    .await;
    let r = timeout(
        STEP,
        link.exchange_recovering(&GET_VOLTAGE, recovery(3, true)),
    )
    .await
    .expect("in time")
    .expect("recovered");
    assert_eq!(r, ANSWER);
    assert_eq!(link.recoveries(), 1);
    assert_eq!(
        controls(&seen)[1..],
        [
            Control::I {
                ns: 0,
                nr: 0,
                pf: true
            },
            Control::Rr { nr: 0, pf: true }
        ]
    );
}

#[tokio::test]
async fn missed_request_is_resent_with_the_same_sequence_numbers() {
    let (mut link, seen) =
        open_scripted(vec![ua(), Vec::new(), rr(0), i_frame(0, 1, &ANSWER)]).await;
    let r = timeout(
        STEP,
        link.exchange_recovering(&GET_VOLTAGE, recovery(3, true)),
    )
    .await
    .expect("in time")
    .expect("recovered");
    assert_eq!(r, ANSWER);
    let frames = seen.lock().expect("log").clone();
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[3], frames[1], "same frame, same N(S)/N(R)");
    assert_eq!(frames[2].control, Control::Rr { nr: 0, pf: true });
}

#[tokio::test]
async fn lost_answer_is_asked_again_as_a_new_i_frame() {
    let (mut link, seen) =
        open_scripted(vec![ua(), Vec::new(), rr(1), i_frame(1, 2, &ANSWER)]).await;
    let r = timeout(
        STEP,
        link.exchange_recovering(&GET_VOLTAGE, recovery(3, true)),
    )
    .await
    .expect("in time")
    .expect("recovered");
    assert_eq!(r, ANSWER);
    assert_eq!(
        controls(&seen)[1..],
        [
            Control::I {
                ns: 0,
                nr: 0,
                pf: true
            },
            Control::Rr { nr: 0, pf: true },
            // The lost answer's sequence number is skipped.
            Control::I {
                ns: 1,
                nr: 1,
                pf: true
            },
        ]
    );
    // A non-repeatable request (ACTION) is not executed twice.
    let (mut link, _) = open_scripted(vec![ua(), Vec::new(), rr(1)]).await;
    let r = timeout(
        STEP,
        link.exchange_recovering(&GET_VOLTAGE, recovery(3, false)),
    )
    .await
    .expect("in time");
    assert!(matches!(r, Err(Error::AnswerLost)), "{r:?}");
}

#[tokio::test]
async fn duplicate_i_frame_is_acknowledged_and_dropped() {
    let mut twice = i_frame(0, 1, &ANSWER);
    twice.extend(i_frame(0, 1, &ANSWER));
    let (mut link, seen) =
        open_scripted(vec![ua(), twice, i_frame(1, 2, &ANSWER), Vec::new()]).await;
    for _ in 0..2 {
        let r = timeout(
            STEP,
            link.exchange_recovering(&GET_VOLTAGE, recovery(3, true)),
        )
        .await
        .expect("in time")
        .expect("answer");
        assert_eq!(r, ANSWER);
    }
    let ClientLink::Hdlc(h) = &link else {
        unreachable!("hdlc link")
    };
    assert_eq!(h.duplicates(), 1);
    assert_eq!(link.recoveries(), 0);
    assert!(controls(&seen).contains(&Control::Rr { nr: 1, pf: true }));
}

#[tokio::test]
async fn silence_exhausts_the_retries_and_kills_the_link() {
    let (mut link, seen) = open_scripted(vec![ua(), Vec::new(), Vec::new(), Vec::new()]).await;
    let r = timeout(
        STEP,
        link.exchange_recovering(&GET_VOLTAGE, recovery(2, true)),
    )
    .await
    .expect("in time");
    assert!(
        matches!(r, Err(Error::NoAnswer { attempts: 2, .. })),
        "{r:?}"
    );
    assert_eq!(controls(&seen).len(), 4, "request and two polls");
    let r = link
        .exchange_recovering(&GET_VOLTAGE, recovery(2, true))
        .await;
    assert!(matches!(r, Err(Error::NotOpen)), "{r:?}");
}
