//! The built-in simulator over real loopback TCP, driven by our own client link and APDU codec:
//! association, the five default registers with GET-with-list, block transfer combined with
//! HDLC segmentation, SET/ACTION, DISC + new SNRM on one connection, the wrapper, many meters at
//! once, the load profile read by our profile reader (range and entry access), and shutdown on
//! cancel; then an independent client (Gurux, Python) reading the simulator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use dlms_bridge::config::{DlmsTransport, MeterConfig};
use dlms_bridge::dlms::apdu::{
    self, AarqParams, AttrRef, Conformance, Data, DataAccessResult, GetResponse, MethodRef,
};
use dlms_bridge::dlms::obis::ObisCode;
use dlms_bridge::model::now_ms;
use dlms_bridge::sim::profile::LoadProfile;
use dlms_bridge::sim::{self as simulator, SimOptions};
use dlms_bridge::sources::meters::link::{ClientLink, LinkAddress, LinkParams};
use dlms_bridge::sources::meters::poller::connect as associate_meter;
use dlms_bridge::sources::meters::profile::ProfileReader;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Upper bound for one step; generous for a loaded box.
const STEP: Duration = Duration::from_secs(20);

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The five default registers: OBIS, expected scaler, expected unit.
const REGISTERS: [(ObisCode, i8, u8); 5] = [
    (ObisCode::new(1, 0, 32, 7, 0, 255), -1, 35),
    (ObisCode::new(1, 0, 31, 7, 0, 255), -2, 33),
    (ObisCode::new(1, 0, 14, 7, 0, 255), -2, 44),
    (ObisCode::new(1, 0, 1, 7, 0, 255), 0, 27),
    (ObisCode::new(1, 0, 1, 8, 0, 255), 0, 30),
];

const CLOCK: ObisCode = ObisCode::new(0, 0, 1, 0, 0, 255);
const RELAY: ObisCode = ObisCode::new(0, 0, 96, 3, 10, 255);
const OBJECT_LIST: ObisCode = ObisCode::new(0, 0, 40, 0, 0, 255);

/// Simulated meters on ephemeral loopback ports; stopped (and awaited) on drop of the guard.
struct Sim {
    addrs: Vec<SocketAddr>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Sim {
    async fn start(count: usize, opts: SimOptions) -> Sim {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let addrs = simulator::spawn_meters(LOCALHOST, 0, count, &opts, &tracker, cancel.clone())
            .await
            .expect("meters start");
        Sim {
            addrs,
            tracker,
            cancel,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(STEP, self.tracker.wait())
            .await
            .expect("simulator stops on cancel");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn address(size: u8) -> LinkAddress {
    LinkAddress {
        client: 16,
        logical: 1,
        physical: 17,
        address_size: size,
    }
}

fn params(max_info: usize) -> LinkParams {
    LinkParams {
        max_info_tx: max_info,
        max_info_rx: max_info,
        window_tx: 1,
        window_rx: 1,
    }
}

async fn connect(
    addr: SocketAddr,
    transport: DlmsTransport,
    proposal: LinkParams,
) -> ClientLink<TcpStream> {
    let stream = timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut link = match transport {
        DlmsTransport::Hdlc => ClientLink::hdlc(stream, address(2), proposal).expect("address"),
        DlmsTransport::Wrapper => ClientLink::wrapper(stream, address(2)),
    };
    timeout(STEP, link.open())
        .await
        .expect("open in time")
        .expect("open");
    link
}

async fn exchange(link: &mut ClientLink<TcpStream>, apdu: &[u8]) -> Vec<u8> {
    timeout(STEP, link.exchange(apdu))
        .await
        .expect("exchange in time")
        .expect("exchange")
}

async fn associate(link: &mut ClientLink<TcpStream>, max_pdu: u16) -> apdu::Aare {
    let aarq = apdu::encode_aarq(&AarqParams {
        password: None,
        conformance: Conformance::CLIENT_PROPOSED,
        max_receive_pdu: max_pdu,
    });
    apdu::parse_aare(&exchange(link, &aarq).await).expect("association accepted")
}

/// GET-with-list of the five registers' values; returns them as numbers.
async fn read_five(link: &mut ClientLink<TcpStream>) -> Vec<f64> {
    let attrs: Vec<AttrRef> = REGISTERS
        .iter()
        .map(|(obis, ..)| AttrRef::new(3, *obis, 2))
        .collect();
    let resp = exchange(link, &apdu::encode_get_with_list(0xC1, &attrs)).await;
    let GetResponse::List { results, .. } = apdu::parse_get_response(&resp).expect("parses") else {
        panic!("not a with-list response: {resp:02x?}");
    };
    results
        .into_iter()
        .map(|r| r.expect("value").as_f64().expect("numeric"))
        .collect()
}

async fn full_session(transport: DlmsTransport, proposal: LinkParams) {
    let sim = Sim::start(
        1,
        SimOptions {
            transport,
            ..SimOptions::default()
        },
    )
    .await;
    let mut link = connect(sim.addrs[0], transport, proposal).await;
    let aare = associate(&mut link, 1024).await;
    assert!(aare
        .conformance
        .has(Conformance::GET | Conformance::MULTIPLE_REFERENCES));

    // scalers and units
    for (i, (obis, scaler, unit)) in REGISTERS.iter().enumerate() {
        let req = apdu::encode_get_normal(0xC1, &AttrRef::new(3, *obis, 3));
        let resp = apdu::parse_get_response(&exchange(&mut link, &req).await).expect("parses");
        assert_eq!(
            resp,
            GetResponse::Normal {
                invoke: 0xC1,
                result: Ok(Data::Structure(vec![Data::I8(*scaler), Data::Enum(*unit)]))
            },
            "register {i}"
        );
        let req = apdu::encode_get_normal(0xC1, &AttrRef::new(3, *obis, 1));
        let resp = apdu::parse_get_response(&exchange(&mut link, &req).await).expect("parses");
        assert_eq!(
            resp,
            GetResponse::Normal {
                invoke: 0xC1,
                result: Ok(Data::OctetString(obis.as_bytes().to_vec()))
            }
        );
    }

    // realistic values; energy never goes back
    let first = read_five(&mut link).await;
    let volts = first[0] / 10.0;
    let amps = first[1] / 100.0;
    let hertz = first[2] / 100.0;
    assert!((220.0..=240.0).contains(&volts), "{volts} V");
    assert!((0.5..=20.0).contains(&amps), "{amps} A");
    assert!((49.8..=50.2).contains(&hertz), "{hertz} Hz");
    assert!((100.0..=5000.0).contains(&first[3]), "{} W", first[3]);
    let second = read_five(&mut link).await;
    assert!(second[4] >= first[4]);

    // clock is a 12-byte date-time octet string
    let resp = exchange(
        &mut link,
        &apdu::encode_get_normal(0xC1, &AttrRef::new(8, CLOCK, 2)),
    )
    .await;
    assert!(matches!(
        apdu::parse_get_response(&resp).expect("parses"),
        GetResponse::Normal { result: Ok(Data::OctetString(b)), .. } if b.len() == 12
    ));

    // unknown object
    let resp = exchange(
        &mut link,
        &apdu::encode_get_normal(
            0xC1,
            &AttrRef::new(3, ObisCode::new(1, 0, 99, 1, 0, 255), 2),
        ),
    )
    .await;
    assert_eq!(
        apdu::parse_get_response(&resp).expect("parses"),
        GetResponse::Normal {
            invoke: 0xC1,
            result: Err(DataAccessResult::ObjectUndefined)
        }
    );

    // SET on the relay and ACTION stub
    let relay = AttrRef::new(1, RELAY, 2);
    let resp = exchange(
        &mut link,
        &apdu::encode_set_normal(0xC1, &relay, &Data::Bool(false)),
    )
    .await;
    assert_eq!(
        apdu::parse_set_response(&resp).expect("parses").1,
        DataAccessResult::Success
    );
    let resp = exchange(&mut link, &apdu::encode_get_normal(0xC1, &relay)).await;
    assert_eq!(
        apdu::parse_get_response(&resp).expect("parses"),
        GetResponse::Normal {
            invoke: 0xC1,
            result: Ok(Data::Bool(false))
        }
    );
    let method = MethodRef {
        class_id: 1,
        obis: RELAY,
        method: 1,
    };
    let resp = exchange(
        &mut link,
        &apdu::encode_action_normal(0xC1, &method, Some(&Data::I8(0))),
    )
    .await;
    assert_eq!(
        apdu::parse_action_response(&resp).expect("parses").result,
        DataAccessResult::Success
    );

    // release and close
    let resp = exchange(&mut link, &apdu::encode_rlrq()).await;
    apdu::parse_rlre(&resp).expect("rlre");
    timeout(STEP, link.close())
        .await
        .expect("close in time")
        .expect("close");
    sim.stop().await;
}

#[tokio::test]
async fn hdlc_session_with_default_frames() {
    full_session(DlmsTransport::Hdlc, LinkParams::default()).await;
}

#[tokio::test]
async fn hdlc_session_with_small_frames() {
    full_session(DlmsTransport::Hdlc, params(32)).await;
}

#[tokio::test]
async fn wrapper_session() {
    full_session(DlmsTransport::Wrapper, LinkParams::default()).await;
}

#[tokio::test]
async fn block_transfer_over_segmented_hdlc() {
    let sim = Sim::start(1, SimOptions::default()).await;
    let mut link = connect(sim.addrs[0], DlmsTransport::Hdlc, params(32)).await;
    associate(&mut link, 64).await;
    let mut resp = exchange(
        &mut link,
        &apdu::encode_get_normal(0xC1, &AttrRef::new(15, OBJECT_LIST, 2)),
    )
    .await;
    let mut raw = Vec::new();
    let mut blocks = 0;
    loop {
        assert!(
            resp.len() <= 64,
            "APDU of {} bytes over the PDU",
            resp.len()
        );
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
        raw.extend_from_slice(&part);
        if last {
            break;
        }
        resp = exchange(&mut link, &apdu::encode_get_next(0xC1, block)).await;
    }
    assert!(blocks > 3, "{blocks} blocks");
    let Data::Array(objects) = apdu::parse_block_data_normal(&raw).expect("decodes") else {
        panic!("object list is not an array");
    };
    assert_eq!(objects.len(), 9);
    sim.stop().await;
}

#[tokio::test]
async fn disc_then_snrm_on_the_same_connection() {
    let sim = Sim::start(1, SimOptions::default()).await;
    let mut link = connect(sim.addrs[0], DlmsTransport::Hdlc, LinkParams::default()).await;
    associate(&mut link, 1024).await;
    timeout(STEP, link.close())
        .await
        .expect("in time")
        .expect("close");
    // the association went with the link: a new one is needed after SNRM
    timeout(STEP, link.open())
        .await
        .expect("in time")
        .expect("reopen");
    let resp = exchange(
        &mut link,
        &apdu::encode_get_normal(0xC1, &AttrRef::new(3, REGISTERS[0].0, 2)),
    )
    .await;
    assert!(matches!(
        apdu::parse_get_response(&resp),
        Err(apdu::Error::Exception { .. })
    ));
    associate(&mut link, 1024).await;
    assert_eq!(read_five(&mut link).await.len(), 5);
    sim.stop().await;
}

#[tokio::test]
async fn wrong_server_address_gets_no_answer() {
    let sim = Sim::start(1, SimOptions::default()).await;
    let stream = TcpStream::connect(sim.addrs[0]).await.expect("connect");
    let mut link = ClientLink::hdlc(
        stream,
        LinkAddress {
            logical: 5,
            ..address(2)
        },
        LinkParams::default(),
    )
    .expect("address");
    assert!(
        timeout(Duration::from_millis(300), link.open())
            .await
            .is_err(),
        "a meter must ignore frames for another address"
    );
    sim.stop().await;
}

#[tokio::test]
async fn many_meters_serve_concurrently() {
    const METERS: usize = 50;
    let sim = Sim::start(
        METERS,
        SimOptions {
            seed: 1000,
            ..SimOptions::default()
        },
    )
    .await;
    let mut clients = tokio::task::JoinSet::new();
    for addr in sim.addrs.clone() {
        clients.spawn(async move {
            let mut link = connect(addr, DlmsTransport::Hdlc, LinkParams::default()).await;
            associate(&mut link, 1024).await;
            let mut energy = Vec::new();
            for _ in 0..3 {
                energy.push(read_five(&mut link).await[4]);
            }
            timeout(STEP, link.close())
                .await
                .expect("in time")
                .expect("close");
            energy
        });
    }
    let mut starts = Vec::new();
    while let Some(done) = clients.join_next().await {
        let energy = done.expect("client task");
        assert!(energy.windows(2).all(|w| w[1] >= w[0]));
        starts.push(energy[0]);
    }
    assert_eq!(starts.len(), METERS);
    starts.sort_by(f64::total_cmp);
    starts.dedup();
    assert!(starts.len() > METERS / 2, "meters should differ");
    sim.stop().await;
}

#[tokio::test]
async fn cancel_stops_meters_with_open_connections() {
    let sim = Sim::start(3, SimOptions::default()).await;
    let mut links = Vec::new();
    for addr in &sim.addrs {
        links.push(connect(*addr, DlmsTransport::Hdlc, LinkParams::default()).await);
    }
    // stop() asserts the tracker finishes although clients keep their connections open
    sim.stop().await;
    drop(links);
}

#[tokio::test]
async fn load_profile_reads_the_same_entries_by_range_and_by_entry() {
    let sim = Sim::start(
        1,
        SimOptions {
            profile: Some(LoadProfile {
                rows: 96,
                period_s: 900,
            }),
            ..SimOptions::default()
        },
    )
    .await;
    let cfg = MeterConfig {
        name: "profile".into(),
        host: "127.0.0.1".into(),
        port: sim.addrs[0].port(),
        ..MeterConfig::default()
    };
    let mut c = timeout(STEP, associate_meter(&cfg, 1024))
        .await
        .expect("in time")
        .expect("associate");
    // The last 12 h: well inside the one-day buffer, so a quarter hour passing between the two
    // reads changes nothing below `now`.
    let now = now_ms();
    let after = now - 12 * 3600 * 1000;
    let profile = ObisCode::new(1, 0, 99, 1, 0, 255);
    let mut by_range = ProfileReader::new(profile, vec![]);
    let range = timeout(STEP, by_range.read_since(&mut c, after, now))
        .await
        .expect("in time")
        .expect("range access");
    let mut by_entry = ProfileReader::new(profile, vec![]).entry_access_only();
    let mut entry = timeout(STEP, by_entry.read_since(&mut c, after, now))
        .await
        .expect("in time")
        .expect("entry access");
    entry.retain(|e| e.ts_ms <= now);
    assert_eq!(range.len(), 48, "{range:?}");
    assert_eq!(range, entry);
    for e in &range {
        assert_eq!(e.ts_ms % 900_000, 0, "on the quarter hour");
        // The simulator's energy column: 275 Wh per period since the epoch, scaler 0.
        let wh = (e.ts_ms / 900_000) as u32;
        assert_eq!(
            e.values["active_energy"],
            serde_json::json!(f64::from(wh.wrapping_mul(275)))
        );
    }
    let _ = c.release().await;
    sim.stop().await;
}

#[tokio::test]
async fn simulate_command_serves_until_cancelled() {
    let args = simulator::SimulateArgs {
        host: LOCALHOST,
        port: 0,
        count: 2,
        transport: DlmsTransport::Hdlc,
        logical_address: 1,
        physical_address: 17,
        any_address: true,
        password: None,
        max_info: 128,
        window: 1,
        pdu_size: 1024,
        energy_scaler: 0,
        seed: 7,
        delay: Duration::ZERO,
        drop_every: 0,
        no_reply_every: 0,
        profile_rows: 0,
        profile_period: 900,
    };
    let cancel = CancellationToken::new();
    let run = tokio::spawn(simulator::simulate(args, cancel.clone()));
    cancel.cancel();
    timeout(STEP, run)
        .await
        .expect("stops in time")
        .expect("task")
        .expect("no error");
}

#[tokio::test]
async fn fault_injection_drops_and_swallows_requests() {
    // every 3rd request closes the connection
    let sim = Sim::start(
        1,
        SimOptions {
            drop_every: 3,
            ..SimOptions::default()
        },
    )
    .await;
    let mut link = connect(sim.addrs[0], DlmsTransport::Hdlc, LinkParams::default()).await;
    associate(&mut link, 1024).await; // request 1
    read_five(&mut link).await; // request 2
    let attrs = [AttrRef::new(3, REGISTERS[0].0, 2)];
    let r = timeout(
        STEP,
        link.exchange(&apdu::encode_get_with_list(0xC1, &attrs)),
    )
    .await
    .expect("in time");
    assert!(
        matches!(r, Err(dlms_bridge::sources::meters::link::Error::Closed)),
        "{r:?}"
    );
    sim.stop().await;

    // every 2nd request gets no answer
    let sim = Sim::start(
        1,
        SimOptions {
            no_reply_every: 2,
            ..SimOptions::default()
        },
    )
    .await;
    let mut link = connect(sim.addrs[0], DlmsTransport::Hdlc, LinkParams::default()).await;
    associate(&mut link, 1024).await; // request 1
    let r = timeout(
        Duration::from_millis(300),
        link.exchange(&apdu::encode_get_with_list(0xC1, &attrs)),
    )
    .await;
    assert!(r.is_err(), "request 2 must be swallowed: {r:?}");
    sim.stop().await;
}

/// Measurement, not a test: latency of one five-register GET-with-list cycle against one meter,
/// and a thousand meters polled at once. Prints numbers; asserts nothing about speed.
/// Run: `cargo test --release --test dlms_simulator -- --ignored --nocapture measure_`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; prints timings"]
async fn measure_read_cycle_and_thousand_meters() {
    for transport in [DlmsTransport::Hdlc, DlmsTransport::Wrapper] {
        let sim = Sim::start(
            1,
            SimOptions {
                transport,
                ..SimOptions::default()
            },
        )
        .await;
        let mut link = connect(sim.addrs[0], transport, LinkParams::default()).await;
        associate(&mut link, 1024).await;
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            read_five(&mut link).await;
            samples.push(t.elapsed());
        }
        samples.sort();
        println!(
            "{transport:?} five-register cycle: p50 {:?} p99 {:?} max {:?}",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100],
            samples[samples.len() - 1]
        );
        sim.stop().await;
    }

    const METERS: usize = 1000;
    const CYCLES: usize = 5;
    let started = std::time::Instant::now();
    let sim = Sim::start(METERS, SimOptions::default()).await;
    println!("{METERS} meters listening after {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for addr in sim.addrs.clone() {
        clients.spawn(async move {
            let mut link = connect(addr, DlmsTransport::Hdlc, LinkParams::default()).await;
            associate(&mut link, 1024).await;
            for _ in 0..CYCLES {
                read_five(&mut link).await;
            }
            let _ = link.close().await;
        });
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
    let elapsed = started.elapsed();
    println!(
        "{METERS} meters x (connect + SNRM + AARQ + {CYCLES} cycles + DISC), clients in the same process: {elapsed:?} ({:.0} cycles/s)",
        (METERS * CYCLES) as f64 / elapsed.as_secs_f64()
    );
    sim.stop().await;
}

/// An independent client (the Gurux Python stack installed for meter-sim) reading the simulator:
/// SNRM/UA, AARQ/AARE, registers with scaler/unit, clock, device name, the object list (block
/// transfer when the PDU is small), RLRQ and DISC. Prints "OK ..." on success.
const GURUX_CLIENT: &str = r#"
import socket, sys
from gurux_dlms import GXDLMSClient, GXReplyData, GXByteBuffer
from gurux_dlms.enums import InterfaceType, Authentication
from gurux_dlms.objects import GXDLMSRegister, GXDLMSClock, GXDLMSData

port = int(sys.argv[1]); transport = sys.argv[2]; max_info = int(sys.argv[3]); pdu = int(sys.argv[4])
iface = InterfaceType.HDLC if transport == "hdlc" else InterfaceType.WRAPPER
server = GXDLMSClient.getServerAddress(1, 17) if iface == InterfaceType.HDLC else 1
password = sys.argv[5] if len(sys.argv) > 5 else ""
if password:
    c = GXDLMSClient(True, 32, server, Authentication.LOW, password, iface)
else:
    c = GXDLMSClient(True, 16, server, Authentication.NONE, None, iface)
c.hdlcSettings.maxInfoTX = c.hdlcSettings.maxInfoRX = max_info
c.setMaxReceivePDUSize(pdu)
s = socket.create_connection(("127.0.0.1", port), timeout=10)

def packet(data, reply):
    if not data:
        return
    s.sendall(bytes(data))
    rd = GXByteBuffer()
    notify = GXReplyData()
    while not c.getData(rd, reply, notify):
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed")
        rd.set(chunk)
    if reply.error != 0:
        raise RuntimeError("dlms error %s" % reply.error)

def block(data, reply):
    if isinstance(data, list):
        for it in data:
            reply.clear()
            block(it, reply)
        return
    packet(data, reply)
    while reply.isMoreData():
        data = None if reply.isStreaming() else c.receiverReady(reply)
        packet(data, reply)

def read(obj, attr):
    r = GXReplyData()
    block(c.read(obj, attr), r)
    c.updateValue(obj, attr, r.value)
    return r.value

if iface == InterfaceType.HDLC:
    r = GXReplyData()
    block(c.snrmRequest(), r)
    c.parseUAResponse(r.data)
r = GXReplyData()
block(c.aarqRequest(), r)
c.parseAareResponse(r.data)
out = []
for ln in ["1.0.32.7.0.255", "1.0.31.7.0.255", "1.0.14.7.0.255", "1.0.1.7.0.255", "1.0.1.8.0.255"]:
    reg = GXDLMSRegister(ln)
    read(reg, 3)
    read(reg, 2)
    out.append("%s=%s unit=%d" % (ln, reg.value, int(reg.unit)))
clock = GXDLMSClock("0.0.1.0.0.255")
read(clock, 2)
out.append("clock=%s" % clock.time)
out.append("name=%s" % bytes(read(GXDLMSData("0.0.42.0.0.255"), 2)).decode())
r = GXReplyData()
block(c.getObjectsRequest(), r)
out.append("objects=%d" % len(c.parseObjects(r.data, True)))
r = GXReplyData()
block(c.releaseRequest(), r)
if iface == InterfaceType.HDLC:
    r = GXReplyData()
    block(c.disconnectRequest(), r)
print("OK " + "; ".join(out))
"#;

async fn gurux_client_reads_simulator(
    transport: DlmsTransport,
    max_info: u16,
    pdu: u16,
    password: &str,
) {
    let sim = Sim::start(
        1,
        SimOptions {
            transport,
            password: (!password.is_empty()).then(|| password.as_bytes().to_vec()),
            ..SimOptions::default()
        },
    )
    .await;
    let name = match transport {
        DlmsTransport::Hdlc => "hdlc",
        DlmsTransport::Wrapper => "wrapper",
    };
    let child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(GURUX_CLIENT)
        .arg(sim.addrs[0].port().to_string())
        .arg(name)
        .arg(max_info.to_string())
        .arg(pdu.to_string())
        .arg(password)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = timeout(Duration::from_secs(60), child)
        .await
        .expect("gurux client finished in time")
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("OK "),
        "gurux client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1.0.32.7.0.255="), "{stdout}");
    assert!(stdout.contains("unit=35"), "{stdout}");
    assert!(stdout.contains("objects=9"), "{stdout}");
    sim.stop().await;
}

#[tokio::test]
async fn gurux_client_reads_simulator_over_hdlc() {
    gurux_client_reads_simulator(DlmsTransport::Hdlc, 128, 1024, "").await;
}

#[tokio::test]
async fn gurux_client_reads_simulator_with_small_frames_and_pdu() {
    gurux_client_reads_simulator(DlmsTransport::Hdlc, 32, 64, "").await;
}

#[tokio::test]
async fn gurux_client_with_lls_reads_simulator() {
    gurux_client_reads_simulator(DlmsTransport::Hdlc, 128, 1024, "12345678").await;
}

#[tokio::test]
async fn gurux_client_reads_simulator_over_wrapper() {
    gurux_client_reads_simulator(DlmsTransport::Wrapper, 128, 1024, "").await;
}
