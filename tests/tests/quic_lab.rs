//! QUIC through the lab: a quinn server on every backend issues QUIC-LB
//! connection IDs (lb-quic) that name its server ID; quinn clients move to
//! a new source port and then a new source address in the middle of a
//! transfer, through ring changes on both LB hosts, an ECMP move and a
//! flood of Initials, and every transfer ends on the backend it began on.

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use common::*;
use futures_util::future::join_all;
use lb_lab::*;
use quinn::{ClientConfig, ConnectionId, Endpoint, EndpointConfig, ServerConfig, TransportConfig, VarInt};

const QUIC4: &str = "203.0.113.10:443/udp";
const QUIC6: &str = "[2001:db8:f::10]:443/udp";
const QUIC_PORT: u16 = 443;
/// Each client stream's receive window: small, so that every step of a
/// transfer needs fresh packets on the path the client has at that moment.
const WINDOW: u32 = 32 * 1024;
/// What a client reads between two faults: four windows.
const STEP: usize = 4 * WINDOW as usize;
/// A step that takes longer than this counts as a broken connection (the
/// client's idle timeout is shorter, so a dead path fails well before).
const STEP_PATIENCE: Duration = Duration::from_secs(30);

/// The server ID the controller gives a backend by default: the last two
/// octets of its address (README, "QUIC VIPs"); 198.51.100.(16j+2).
fn default_server_id(j: usize) -> Vec<u8> {
    vec![100, 16 * j as u8 + 2]
}

/// The n-th octet of every transfer.
fn pattern(n: usize) -> u8 {
    (n % 251) as u8
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(WINDOW));
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
    // A transfer waiting for the test's next step stays alive; a broken
    // path shows within the idle timeout.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // The lab's client link has MTU 1400; no probing beyond the 1200 floor.
    t.mtu_discovery_config(None);
    Arc::new(t)
}

/// A certificate for the name "lab", trusted by the clients.
struct Tls {
    cert: rustls::pki_types::CertificateDer<'static>,
    key: Vec<u8>,
}

fn tls() -> Tls {
    let made = rcgen::generate_simple_self_signed(vec!["lab".into()]).unwrap();
    Tls { cert: made.cert.der().clone(), key: made.signing_key.serialize_der() }
}

/// A quinn server on `addr` inside backend `j`'s namespace, whose CIDs
/// carry `server_id` (config 0, 6-octet nonces: the VIP's default layout).
/// Each stream asks "N" and gets "beJ CLIENT-ADDRESS\n" and N octets.
fn start_server(rt: &tokio::runtime::Runtime, tls: &Tls, j: usize, addr: SocketAddr, server_id: Vec<u8>) -> Endpoint {
    let socket = in_ns(&backend_ns(j), move || UdpSocket::bind(addr)).unwrap().unwrap();
    let config = lb_quic::Config::new(0, server_id, 6, None).unwrap();
    let mut endpoint = EndpointConfig::default();
    endpoint.cid_generator(move || Box::new(lb_quic::Generator::new(config.clone())));
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(tls.key.clone()).into();
    let mut server = ServerConfig::with_single_cert(vec![tls.cert.clone()], key).unwrap();
    server.transport_config(transport());
    let _in_runtime = rt.enter();
    let endpoint = Endpoint::new(endpoint, Some(server), socket, Arc::new(quinn::TokioRuntime)).unwrap();
    rt.spawn(serve(endpoint.clone(), format!("be{j}")));
    endpoint
}

async fn serve(endpoint: Endpoint, name: String) {
    while let Some(incoming) = endpoint.accept().await {
        let name = name.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (name, conn) = (name.clone(), conn.clone());
                tokio::spawn(async move {
                    let ask = recv.read_to_end(32).await.unwrap_or_default();
                    let n: usize = String::from_utf8_lossy(&ask).trim().parse().unwrap_or(0);
                    let head = format!("{name} {}\n", conn.remote_address());
                    send.write_all(head.as_bytes()).await?;
                    let mut sent = 0;
                    while sent < n {
                        let chunk: Vec<u8> = (sent..n.min(sent + 16 * 1024)).map(pattern).collect();
                        send.write_all(&chunk).await?;
                        sent += chunk.len();
                    }
                    send.finish()?;
                    send.stopped().await?;
                    anyhow::Ok(())
                });
            }
        });
    }
}

/// QUIC servers on every backend, on the VIPs' addresses (both families).
/// IPv4 backends keep their default server IDs; the IPv6 ones all end in
/// ::2, so they get 0b0J by hand.
fn start_servers(rt: &tokio::runtime::Runtime, tls: &Tls) -> Vec<Endpoint> {
    let mut all = Vec::new();
    for j in 1..=BACKENDS {
        all.push(start_server(rt, tls, j, sock(VIP4, QUIC_PORT), default_server_id(j)));
        all.push(start_server(rt, tls, j, sock(VIP6, QUIC_PORT), vec![0x0b, j as u8]));
    }
    all
}

/// The QUIC VIPs with `backends`, on both LB hosts.
fn quic_vips(lab: &Lab, backends: &[usize]) {
    all(lab, &["vip", "add", QUIC4, "--quic"]);
    all(lab, &["vip", "add", QUIC6, "--quic"]);
    for &j in backends {
        all(lab, &["backend", "add", QUIC4, &backend_v4(j)]);
        all(lab, &["backend", "add", QUIC6, &backend_v6(j), "--server-id", &format!("0b{j:02x}")]);
    }
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    lab.wait_routes(VIP6, &[1, 2]).unwrap();
}

/// A client transfer of `total` octets that the test reads step by step.
struct Transfer {
    endpoint: Endpoint,
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    backend: String,
    local: SocketAddr,
    read: usize,
    total: usize,
}

/// A UDP socket of the client namespace.
fn client_socket(local: SocketAddr) -> UdpSocket {
    in_ns(CLIENT_NS, move || UdpSocket::bind(local)).unwrap().unwrap_or_else(|e| panic!("bind {local}: {e}"))
}

impl Transfer {
    /// Connects from `local` to `vip` with the client-chosen Initial DCID
    /// `dcid` (fixed, so which backend takes it is the same every run),
    /// and asks for `total` octets.
    async fn start(tls: &Tls, local: SocketAddr, vip: SocketAddr, dcid: [u8; 8], total: usize) -> Result<Self, String> {
        let endpoint =
            Endpoint::new(EndpointConfig::default(), None, client_socket(local), Arc::new(quinn::TokioRuntime))
                .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(tls.cert.clone()).unwrap();
        let mut client = ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        client.transport_config(transport());
        client.initial_dst_cid_provider(Arc::new(move || ConnectionId::new(&dcid)));
        let connecting = endpoint.connect_with(client, vip, "lab").map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(STEP_PATIENCE, connecting)
            .await
            .map_err(|_| format!("no handshake from {local}"))?
            .map_err(|e| format!("handshake from {local}: {e}"))?;
        let (backend, _, recv) = ask(&conn, total).await?;
        Ok(Transfer { endpoint, conn, recv, backend, local, read: 0, total })
    }

    /// Reads the next `n` octets (or the rest) and checks them.
    async fn step(&mut self, n: usize) -> Result<(), String> {
        let until = self.total.min(self.read + n);
        let mut buf = vec![0u8; 16 * 1024];
        let reading = async {
            while self.read < until {
                let want = buf.len().min(until - self.read);
                let got = self.recv.read(&mut buf[..want]).await.map_err(|e| e.to_string())?.ok_or("stream ended")?;
                if let Some(k) = (0..got).find(|&k| buf[k] != pattern(self.read + k)) {
                    return Err(format!("octet {} is wrong", self.read + k));
                }
                self.read += got;
            }
            Ok(())
        };
        tokio::time::timeout(STEP_PATIENCE, reading)
            .await
            .map_err(|_| format!("stalled at octet {} of {}", self.read, self.total))?
            .map_err(|e| format!("{} from {} at octet {}: {e}", self.backend, self.local, self.read))
    }

    /// Moves the client to a new socket bound to `local` (QUIC migration).
    fn rebind(&mut self, local: SocketAddr) {
        self.endpoint.rebind(client_socket(local)).unwrap();
        self.local = local;
    }

    /// Reads the rest, then asks on a new stream who serves it and from
    /// which address it sees the client: the same backend, the new address.
    async fn finish(mut self) -> Result<String, String> {
        self.step(self.total).await?;
        let (backend, seen, _) = ask(&self.conn, 0).await?;
        if backend != self.backend {
            return Err(format!("began on {} and ended on {backend}", self.backend));
        }
        if seen != self.local.to_string() {
            return Err(format!("{backend} sees the client at {seen}, not at {}", self.local));
        }
        self.conn.close(0u32.into(), b"done");
        Ok(backend)
    }
}

/// Opens a stream asking for `n` octets; returns the server's name, the
/// client address it sees and the stream, positioned at the first octet.
async fn ask(conn: &quinn::Connection, n: usize) -> Result<(String, String, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(n.to_string().as_bytes()).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut octet = [0u8; 1];
    while head.last() != Some(&b'\n') {
        let read = tokio::time::timeout(STEP_PATIENCE, recv.read_exact(&mut octet)).await;
        read.map_err(|_| "no reply".to_string())?.map_err(|e| e.to_string())?;
        head.push(octet[0]);
    }
    let head = String::from_utf8_lossy(&head).trim().to_string();
    let (name, seen) = head.split_once(' ').ok_or(format!("bad reply {head:?}"))?;
    Ok((name.to_string(), seen.to_string(), recv))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn a_quic_transfer_survives_its_client_moving_to_a_new_port_then_a_new_address_on_both_families() {
    let s = lab();
    let lab = &s.lab;
    let (rt, tls) = (runtime(), tls());
    let _in_runtime = rt.enter();
    let _servers = start_servers(&rt, &tls);
    quic_vips(lab, &[1, 2, 3]);
    let listed = ok(lab, 1, &["backend", "list", QUIC4]);
    assert!(listed.contains("6412") && listed.contains("6422") && listed.contains("6432"), "{listed}");
    for (family, client, vip) in [("IPv4", client_v4 as fn(usize) -> String, VIP4), ("IPv6", client_v6, VIP6)] {
        rt.block_on(async {
            let mut t =
                Transfer::start(&tls, sock(&client(0), 41000), sock(vip, QUIC_PORT), [7; 8], 6 * STEP).await.unwrap();
            t.step(2 * STEP).await.unwrap();
            t.rebind(sock(&client(0), 41001));
            t.step(2 * STEP).await.unwrap();
            t.rebind(sock(&client(1), 41002));
            let backend = t.finish().await.unwrap();
            println!("{family}: {} octets from {backend} across a new port and a new address", 6 * STEP);
        });
    }
    let by_server_id: u64 = (1..=LBS).map(|i| counter(lab, i, "quic_by_server_id")).sum();
    let by_client_cid: u64 = (1..=LBS).map(|i| counter(lab, i, "quic_by_client_cid")).sum();
    println!("LB hosts routed {by_server_id} packets by server ID, {by_client_cid} by the client's CID");
    assert!(by_server_id > (6 * STEP / 1200) as u64 / 10, "the clients' packets went by server ID: {by_server_id}");
    assert!(by_client_cid >= 2, "the Initials went by the client's CID: {by_client_cid}");
    assert_eq!(unroutable(lab), 0);
}

#[test]
fn quic_transfers_survive_migrations_through_ring_changes_an_ecmp_move_and_an_initial_flood() {
    let s = lab();
    let lab = &s.lab;
    let (rt, tls) = (runtime(), tls());
    let _in_runtime = rt.enter();
    let _servers = start_servers(&rt, &tls);
    quic_vips(lab, &[1, 2]);
    let vip = sock(VIP4, QUIC_PORT);
    let steps = 12;
    let total = steps * STEP;
    let mut broken: Vec<String> = Vec::new();
    let mut transfers: Vec<Transfer> = rt.block_on(async {
        let mut started = Vec::new();
        for k in 0..8u8 {
            let local = sock(&client_v4(k as usize % 2), 42000 + k as u16);
            match Transfer::start(&tls, local, vip, [k.wrapping_mul(37); 8], total).await {
                Ok(t) => started.push(t),
                Err(e) => broken.push(e),
            }
        }
        started
    });
    let on = |transfers: &[Transfer], name: &str| transfers.iter().filter(|t| t.backend == name).count();
    println!("{} transfers: {} on be1, {} on be2", transfers.len(), on(&transfers, "be1"), on(&transfers, "be2"));
    assert!(on(&transfers, "be1") > 0 && on(&transfers, "be2") > 0, "the fixed Initial DCIDs spread");
    // Every transfer reads a step, all at once; a failure ends only its
    // own transfer.
    let step = |transfers: &mut Vec<Transfer>, broken: &mut Vec<String>, what: &str| {
        rt.block_on(async {
            let results = join_all(transfers.iter_mut().map(|t| t.step(STEP))).await;
            let mut kept = Vec::new();
            for (t, result) in transfers.drain(..).zip(results) {
                match result {
                    Ok(()) => kept.push(t),
                    Err(e) => broken.push(format!("after {what}: {e}")),
                }
            }
            *transfers = kept;
        });
        print_step(&format!("{what}: {} transfers going, {} broken", transfers.len(), broken.len()));
    };
    step(&mut transfers, &mut broken, "the start");

    // A ring change, with the LB hosts disagreeing in between.
    ok(lab, 1, &["backend", "add", QUIC4, &backend_v4(3)]);
    step(&mut transfers, &mut broken, "be3 added on lb1 only");
    ok(lab, 2, &["backend", "add", QUIC4, &backend_v4(3)]);
    all(lab, &["backend", "drain", QUIC4, &backend_v4(1)]);
    step(&mut transfers, &mut broken, "be3 added and be1 drained on both");

    for (k, t) in transfers.iter_mut().enumerate() {
        t.rebind(sock(&t.local.ip().to_string(), 43000 + k as u16));
    }
    step(&mut transfers, &mut broken, "every client on a new port");

    lab.route_through(&[1], VIP4).unwrap();
    step(&mut transfers, &mut broken, "the router sending everything to lb1");
    lab.route_through(&[2], VIP4).unwrap();
    step(&mut transfers, &mut broken, "the router moving everything to lb2");
    for (k, t) in transfers.iter_mut().enumerate() {
        t.rebind(sock(&client_v4(2 + k % 2), 44000 + k as u16));
    }
    step(&mut transfers, &mut broken, "every client on a new address");

    let entries = |i: usize| sample(&scrape(i, &[]), "lb_conn_table_entries");
    let before = [entries(1), entries(2)];
    let by_client_cid = || (1..=LBS).map(|i| counter(lab, i, "quic_by_client_cid")).sum::<u64>();
    let cid_before = by_client_cid();
    let flood = 20_000;
    let flooding = std::thread::spawn(move || in_ns(CLIENT_NS, move || initial_flood(flood)).unwrap());
    step(&mut transfers, &mut broken, "a flood of Initials from random sources");
    flooding.join().unwrap();
    step(&mut transfers, &mut broken, "the flood");
    let flooded = by_client_cid() - cid_before;
    println!("{flooded} of {flood} flood Initials balanced by the LB hosts");
    assert!(flooded > flood as u64 / 2, "the flood reached the LB hosts: {flooded}");
    assert_eq!([entries(1), entries(2)], before, "the flood left no state");

    lab.route_through(&[1, 2], VIP4).unwrap();
    // New connections now: the drained be1 takes none of them.
    let fresh: Vec<String> = rt.block_on(async {
        let mut names = Vec::new();
        for k in 0..6u8 {
            let local = sock(&client_v4(k as usize % 4), 45000 + k as u16);
            match Transfer::start(&tls, local, vip, [k.wrapping_mul(53) ^ 0x5a; 8], STEP).await {
                Ok(t) => match t.finish().await {
                    Ok(name) => names.push(name),
                    Err(e) => broken.push(format!("a new connection: {e}")),
                },
                Err(e) => broken.push(format!("a new connection: {e}")),
            }
        }
        names
    });
    println!("new connections on {fresh:?}");
    assert!(!fresh.iter().any(|b| b == "be1"), "be1 is drained: {fresh:?}");
    let ended: Vec<String> = rt.block_on(async {
        let mut names = Vec::new();
        for result in join_all(transfers.drain(..).map(Transfer::finish)).await {
            match result {
                Ok(name) => names.push(name),
                Err(e) => broken.push(format!("at the end: {e}")),
            }
        }
        names
    });
    println!("{} transfers of {total} octets ended on {ended:?}", ended.len());
    assert!(broken.is_empty(), "broken connections: {broken:#?}");
    assert_eq!(ended.len(), 8);
    assert_eq!(unroutable(lab), 0, "every packet of the connections named its server or was the client's");
}

/// Packets of QUIC VIPs that went by the 5-tuple, on every LB host.
fn unroutable(lab: &Lab) -> u64 {
    let names = ["quic_unknown_config", "quic_unknown_server", "quic_undecodable"];
    (1..=LBS).flat_map(|i| names.map(|n| counter(lab, i, n))).sum()
}

/// `n` QUIC v1 Initials (RFC 9000, 17.2.2) to the IPv4 QUIC VIP, each from
/// another source address of 192.0.2.64-254 and port, with random CIDs and
/// a payload no server can decrypt; IPv4 and UDP headers from the packet
/// tests' builders (RFC 791, RFC 768: UDP checksum 0, none), through a raw
/// socket.
fn initial_flood(n: u32) {
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // The same flood every run.
    let mut rng = lb_tests::XorShift(0x9e37_79b9_7f4a_7c15);
    let mut random = move || rng.next_u64();
    let dst = [203, 0, 113, 10];
    for k in 0..n {
        if k % 64 == 0 {
            // Bursts a veth's XDP ring (256 frames) takes whole.
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = random().to_be_bytes();
        let src = [192, 0, 2, 64 + r[0] % 191];
        let port = 1024 + u16::from_be_bytes([r[1], r[2]]) % 60000;
        let mut quic = vec![0xc3, 0, 0, 0, 1, 8];
        quic.extend_from_slice(&random().to_be_bytes()); // DCID
        quic.push(8);
        quic.extend_from_slice(&random().to_be_bytes()); // SCID
        quic.push(0); // no token
        let rest = 1200 - quic.len() - 2;
        quic.extend_from_slice(&(0x4000 | rest as u16).to_be_bytes()); // length, 2-octet varint
        while quic.len() < 1200 {
            quic.extend_from_slice(&random().to_be_bytes()[..(1200 - quic.len()).min(8)]);
        }
        let packet =
            [lb_tests::ipv4(src.into(), dst.into(), 17, &[], 8 + quic.len()), lb_tests::udp(port, QUIC_PORT, &quic)]
                .concat();
        let (to, to_len) = sockaddr(SocketAddr::from((dst, 0)));
        let sent = unsafe {
            libc::sendto(raw, packet.as_ptr() as *const _, packet.len(), 0, &to as *const _ as *const _, to_len)
        };
        assert_eq!(sent, packet.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }
    unsafe { libc::close(raw) };
}
