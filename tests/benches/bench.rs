//! The benchmark runner behind `cargo xtask bench` (not a test: it reports
//! numbers, beside floors measured in the same run, and asserts nothing
//! about time). Needs root.
//!
//! - dataplane: BPF_PROG_TEST_RUN with a large repeat on the bench build of
//!   the balancer (it restores each packet after forwarding it, and gives
//!   every SYN a new source port), conn table filled with 1M flows first;
//!   floors from `lb-floor`.
//! - control: the lab's lb1 controller, gRPC AddBackend until it returns
//!   (the new ring is live when it does: checked on the pinned VIP map).
//! - e2e: packets per second through the lab's LB hosts from a generator on
//!   the client (BPF_PROG_TEST_RUN live frames), against the same path with
//!   a program that only bounces; HTTP requests per second with wrk through
//!   the LB and through HAProxy (TCP mode) on the same LB host.
//!
//! - scale: one controller in a namespace of its own, VIPs x 100 backends
//!   applied, changed, re-applied and adopted after SIGKILL (scale.rs).
//! - checks: 10,000 TCP health checks every second, on distinct backends
//!   and on backends shared by VIPs: CPU, probe lateness, fds (checks.rs).
//!
//! Usage: bench [--quick] [--json PATH] [--skip-e2e] [--only scale|checks]

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Instant};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    EbpfLoader,
};
use lb_common::{addr_words_v4, port_raw, ConnValue, FlowKey, VipKey, VipMeta, AF_INET};
use lb_lab::{in_ns, ns, sh, Lab, CLIENT_NS, ROUTER_NS};
use lb_tests::*;
use lb_userspace::{
    object,
    quic::QuicSpec,
    services::{Encap, VipAddr, VipSpec},
    BackendSpec, Dataplane, HashMode, LoadOptions, Services,
};

mod checks;
mod per_core;
mod scale;

type Results = BTreeMap<String, f64>;

struct Opts {
    quick: bool,
    json: Option<PathBuf>,
    skip_e2e: bool,
    /// Run only this part (`scale` or `checks`).
    only: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let mut opts = Opts { quick: false, json: None, skip_e2e: false, only: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = args.next().map(PathBuf::from),
            "--skip-e2e" => opts.skip_e2e = true,
            "--only" => match args.next().as_deref() {
                Some(part @ ("scale" | "checks")) => opts.only = Some(part.to_string()),
                other => anyhow::bail!("--only takes scale or checks, not {other:?}"),
            },
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let mut r = Results::new();
    let runs = |part: &str| opts.only.as_deref().is_none_or(|only| only == part);
    if opts.only.is_none() {
        conn_table_occupancy(&mut r);
        dataplane(&mut r, &opts)?;
    }
    if !opts.skip_e2e {
        // The VIPs the default settings hold, 100 backends each.
        let vips = lb_common::DEFAULT_RING_VIPS as usize;
        if runs("scale") {
            scale::scale(&mut r, lbctl_release()?, vips)?;
        }
        if runs("checks") {
            checks::checks(&mut r, lbctl_release()?, opts.quick)?;
        }
    }
    if !opts.skip_e2e && opts.only.is_none() {
        lab_benches(&mut r, &opts)?;
    }
    let json = serde_json::to_string_pretty(&r)?;
    match &opts.json {
        Some(path) => std::fs::write(path, json)?,
        None => println!("{json}"),
    }
    Ok(())
}

fn stats(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[0], samples[samples.len() / 2], samples[samples.len() - 1])
}

/// Records min, median and max of `samples` under `key` (the median bare).
fn record(r: &mut Results, key: &str, samples: &mut [f64]) {
    let (min, median, max) = stats(samples);
    r.insert(key.to_string(), median);
    r.insert(format!("{key}.min"), min);
    r.insert(format!("{key}.max"), max);
    eprintln!("  {key:<34} median {median:>9.1}  (min {min:.1}, max {max:.1})");
}

fn run_ns(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    r.duration.as_nanos() as f64
}

/// The benchmarks' balancer: IP-in-IP conntrack VIPs, and GUE ones,
/// stateless (.20) and conntrack (.30), ten backends each, added one by
/// one in four change sets (after the 1st, 4th, 7th and 10th): the ring
/// history is (1-10), (1-7), (1-4), (1), so most GUE flows carry
/// alternates, many of them two or three (the costly case).
fn balancer(conn_table_size: u32) -> anyhow::Result<(Dataplane, Services)> {
    balancer_of(conn_table_size, false)
}

/// The same VIPs and backends in the full balancer or its offload flavor.
fn balancer_of(conn_table_size: u32, offload_flavor: bool) -> anyhow::Result<(Dataplane, Services)> {
    let mut dp = Dataplane::load(LoadOptions {
        conn_table_size,
        ring_capacity: 5 * lb_common::RINGS_PER_VIP * lb_common::ring_stride(65537),
        bench_restore: true,
        offload_flavor,
        pin_dir: None,
    })?;
    let mut svc = Services::new(&mut dp, test_settings())?;
    let vips = [
        ("203.0.113.10:80/tcp", Encap::Ipip, false),
        ("[2001:db8::10]:80/tcp", Encap::Ipip, false),
        ("203.0.113.10:53/udp", Encap::Ipip, false),
        ("203.0.113.20:80/tcp", Encap::Gue, true),
        ("203.0.113.30:80/tcp", Encap::Gue, false),
        ("203.0.113.40:443/udp", Encap::Ipip, false),
    ];
    for (v, encap, stateless) in vips {
        // The QUIC VIP: default layout, server IDs 0x6401-0x640a. (The
        // offload flavor passes QUIC VIPs to the host: it has no server map.)
        let quic = v.ends_with(":443/udp").then(QuicSpec::default);
        if quic.is_some() && offload_flavor {
            continue;
        }
        let vip: VipAddr = v.parse().map_err(anyhow::Error::msg)?;
        svc.add_vip(&mut dp, VipSpec { vip, hash: HashMode::FiveTuple, ring_size: 65537, encap, stateless, quic })?;
        for i in 1..=10 {
            let addr: IpAddr = if v.starts_with('[') {
                format!("2001:db8:1::{i}").parse()?
            } else {
                format!("198.51.100.{i}").parse()?
            };
            svc.add_backend(&mut dp, &vip, BackendSpec { addr, weight: 1, server_id: None })?;
            if i % 3 == 1 {
                svc.commit_history(&mut dp)?;
            }
        }
    }
    Ok((dp, svc))
}

/// `n` IPv4 flows to 203.0.113.10:80 from random clients, and the entry
/// that sends each to its first backend.
fn random_flows(svc: &Services, n: usize, seed: u64) -> anyhow::Result<(Vec<FlowKey>, ConnValue)> {
    let v4 = svc.vip(&"203.0.113.10:80/tcp".parse().map_err(anyhow::Error::msg)?)?;
    let b = *v4.backends.values().next().unwrap();
    let target = ConnValue { backend_id: b.id, cookie: b.cookie, vip_id: v4.id as u16, flags: 0, _pad: 0, hash: 0 };
    let mut rng = XorShift(seed);
    let flows = (0..n)
        .map(|_| {
            let x = rng.next_u64();
            FlowKey {
                src: addr_words_v4([10, (x >> 8) as u8, (x >> 16) as u8, (x >> 24) as u8]),
                dst: addr_words_v4([203, 0, 113, 10]),
                src_port: port_raw((x >> 32) as u16),
                dst_port: port_raw(80),
                proto: 6,
                family: AF_INET,
                _pad: [0; 2],
            }
        })
        .collect();
    Ok((flows, target))
}

/// The flows the bench build gives a repeated SYN frame: its source port,
/// then one more per repetition.
fn syn_flows(frame: &[u8], n: u32) -> Vec<FlowKey> {
    let (src, dst) = (<[u8; 4]>::try_from(&frame[26..30]).unwrap(), <[u8; 4]>::try_from(&frame[30..34]).unwrap());
    let first = u16::from_be_bytes([frame[34], frame[35]]);
    (0..=n)
        .map(|k| FlowKey {
            src: addr_words_v4(src),
            dst: addr_words_v4(dst),
            src_port: port_raw(first.wrapping_add(k as u16)),
            dst_port: port_raw(u16::from_be_bytes([frame[36], frame[37]])),
            proto: 6,
            family: AF_INET,
            _pad: [0; 2],
        })
        .collect()
}

fn dataplane(r: &mut Results, opts: &Opts) -> anyhow::Result<()> {
    eprintln!("dataplane (BPF_PROG_TEST_RUN, ns per packet, on CPU 0)");
    // On one CPU, so that runs compare (no migration mid-measurement).
    on_cpu(0, || dataplane_on_cpu0(r, opts))
}

fn dataplane_on_cpu0(r: &mut Results, opts: &Opts) -> anyhow::Result<()> {
    let (rounds, repeat) = if opts.quick { (5, 200_000) } else { (11, 1_000_000) };
    // A new flow per repetition: keep below 65536 (the port wraps).
    let new_flows = repeat.min(60_000);
    let mut floors = EbpfLoader::new().load(object::FLOOR)?;
    for name in ["floor_pass", "floor_tx", "floor_restore"] {
        let p: &mut Xdp = floors.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    let (mut dp, svc) = balancer(2 << 20)?;
    // 1M flows in the conn table, so lookups do not run on an empty table.
    let (flows, target) = random_flows(&svc, 1_000_000, 0x5eed)?;
    let t = Instant::now();
    dp.set_conns(&flows, &vec![target; flows.len()])?;
    eprintln!("  conn table filled with 1M flows in {:.1} s", t.elapsed().as_secs_f64());

    let ack4 = tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, ACK);
    let syn4 = tcp_frame("192.0.2.56", 1, "203.0.113.10", 80, SYN);
    let syn_known = tcp_frame("192.0.2.57", 1, "203.0.113.10", 80, SYN);
    let ack6 = tcp_frame("2001:db8:c::55", 40000, "2001:db8::10", 80, ACK);
    let udp4 = udp_frame("192.0.2.55", 5353, "203.0.113.10", 53, &[0; 18]);
    // QUIC (RFC 9000 17.3.1 and 17.2.2): a 1-RTT packet whose CID names
    // server ID 0x6403 (config 0, length 9), and an Initial whose client-
    // chosen 8-octet DCID is hashed; 1200 octets, as Initials must be.
    let mut short = vec![0x41, 0x08, 0x64, 0x03, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0x00, 0x01];
    short.extend_from_slice(&[0x55; 20]);
    let quic_short = udp_frame("192.0.2.55", 5353, "203.0.113.40", 443, &short);
    let mut initial = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0];
    initial.resize(1200, 0x66);
    let quic_initial = udp_frame("192.0.2.55", 5353, "203.0.113.40", 443, &initial);
    // The same established flow on a VLAN trunk: 802.1Q (VLAN 100), and
    // QinQ (802.1ad service VLAN 10, then VLAN 100).
    let ack4_vlan = tagged(&ack4, &[[0x81, 0x00, 0x00, 0x64]]);
    let ack4_qinq = tagged(&ack4, &[[0x88, 0xa8, 0x00, 0x0a], [0x81, 0x00, 0x00, 0x64]]);
    let non_vip = tcp_frame("192.0.2.55", 40000, "203.0.113.99", 80, ACK);
    let gue_syn = tcp_frame("192.0.2.56", 1, "203.0.113.20", 80, SYN);
    let gue_ct_ack = tcp_frame("192.0.2.55", 40000, "203.0.113.30", 80, ACK);
    let mut arp = eth([0xff; 6], ROUTER_MAC, ETH_P_ARP);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 34]);
    // A SYN whose flow the table already holds (every repetition's).
    let known = syn_flows(&syn_known, new_flows);
    dp.set_conns(&known, &vec![target; known.len()])?;
    // Established flows: their conn entries, as a first packet would leave.
    let mut h = lb_tests::Harness { dp, services: svc };
    for f in [&ack4, &ack6, &udp4, &gue_ct_ack] {
        let (action, _) = h.run(&syn_of(f));
        assert_eq!(action, XDP_TX);
    }
    let mut dp = h.dp;
    // A stateless GUE flow that carries three alternates, the costly case
    // (the bench build restores its output, so ask explain, which follows
    // the same rings).
    let gue_ack = (40000..41000)
        .map(|p| tcp_frame("192.0.2.55", p, "203.0.113.20", 80, ACK))
        .find(|f| {
            let explained = h.services.explain(&mut dp, &flow_of(f));
            explained.ok().flatten().is_some_and(|e| e.alternates.len() == 3)
        })
        .expect("a flow moved by each of the last three change sets");

    // The same table at capacity: four times its size in flows, so that
    // all but a few buckets are full and every insert evicts.
    let (mut full, full_svc) = balancer(2 << 20)?;
    let (flows, target) = random_flows(&full_svc, 4 * (2 << 20), 0xf111)?;
    full.set_conns(&flows, &vec![target; flows.len()])?;
    let (entries, capacity) = full.conn_count()?;
    eprintln!("  full table: {entries} of {capacity} entries");

    // The offload flavor, on the host, for reference (the same VIPs).
    let (mut flavor, _) = balancer_of(2 << 20, true)?;

    let cases: [(&str, &[u8]); 17] = [
        ("v4_established_ns", &ack4),
        ("v4_established_vlan_ns", &ack4_vlan),
        ("v4_established_qinq_ns", &ack4_qinq),
        ("v4_new_flow_ns", &syn4),
        // The passive signal's path: a SYN for a flow the table sent to a
        // backend, nothing since: counted as a repeat for that backend.
        ("v4_syn_repeat_ns", &syn_known),
        ("gue_stateless_established_ns", &gue_ack),
        ("gue_stateless_new_flow_ns", &gue_syn),
        ("gue_conntrack_established_ns", &gue_ct_ack),
        ("v6_established_ns", &ack6),
        ("v4_udp_ns", &udp4),
        ("quic_short_server_id_ns", &quic_short),
        ("quic_initial_ns", &quic_initial),
        ("non_vip_ns", &non_vip),
        ("non_ip_ns", &arp),
        ("v4_new_flow_full_table_ns", &syn4),
        ("offload_gue_stateless_established_ns", &gue_ack),
        ("offload_gue_stateless_new_flow_ns", &gue_syn),
    ];
    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for name in ["floor_pass", "floor_tx", "floor_restore"] {
            let p: &Xdp = floors.program(name).unwrap().try_into()?;
            samples.entry(name).or_default().push(run_ns(p, &ack4, repeat));
        }
        for (name, frame) in cases {
            let n = if name.contains("new_flow") || name.contains("syn") { new_flows } else { repeat };
            let prog = match name {
                "v4_new_flow_full_table_ns" => full.program(),
                n if n.starts_with("offload_") => flavor.program(),
                _ => dp.program(),
            };
            samples.entry(name).or_default().push(run_ns(prog, frame, n));
        }
    }
    for (name, mut s) in samples {
        let key = match name {
            "floor_pass" => "dataplane.floor_pass_ns".to_string(),
            "floor_tx" => "dataplane.floor_tx_ns".to_string(),
            "floor_restore" => "dataplane.floor_restore_ns".to_string(),
            other => format!("dataplane.{other}"),
        };
        record(r, &key, &mut s);
    }
    // Two NICs: the same VIPs, packets for backends out of another veth.
    let (dp2, services) = balancer(1 << 16)?;
    let mut two_nics = lb_tests::Harness { dp: dp2, services };
    let egress = lb_userspace::Settings { egress_mac: Some([2, 0, 0, 0, 0, 0x0b]), ..test_settings() };
    two_nics.services.set_settings(&mut two_nics.dp, egress)?;
    two_nics.run(&syn_of(&ack4));
    per_core::per_core(
        r,
        dp.program(),
        &[
            ("v4_established", &ack4),
            ("v4_established_vlan", &ack4_vlan),
            ("v4_new_flow", &syn4),
            ("gue_stateless_established", &gue_ack),
        ],
        per_core::Redirect { balancer: &mut two_nics.dp, frame: &ack4 },
        opts.quick,
    )?;
    // The data-path checks' tc egress program, on a packet that is not a
    // check's: what every packet the LB host itself sends pays for it.
    let mut probe = EbpfLoader::new().load(object::PROBE)?;
    let egress: &mut SchedClassifier = probe.program_mut("probe_encap").unwrap().try_into()?;
    egress.load()?;
    let mut s: Vec<f64> = (0..rounds)
        .map(|_| {
            let r = egress
                .test_run(TestRunOptions { data_in: Some(&ack4), repeat, ..TestRunOptions::default() })
                .expect("BPF_PROG_TEST_RUN");
            r.duration.as_nanos() as f64
        })
        .collect();
    record(r, "dataplane.probe_egress_unmarked_ns", &mut s);
    let stats = dp.global_stats()?;
    let (conn_hits, by_server_id, by_client_cid) = (
        stats[lb_common::stat::CONN_HIT],
        stats[lb_common::stat::QUIC_BY_SERVER_ID],
        stats[lb_common::stat::QUIC_BY_CLIENT_CID],
    );
    eprintln!(
        "  during the run: {conn_hits} conn hits, QUIC {by_server_id} by server ID, {by_client_cid} by client CID"
    );
    // The program's size as the kernel runs it (xlated BPF instructions).
    let mut plain = Dataplane::load(LoadOptions { bench_restore: false, ..LoadOptions::default() })?;
    if let Some(bytes) = plain.program().info()?.size_translated() {
        r.insert("dataplane.balancer_xlated_insns".into(), (bytes / 8) as f64);
        eprintln!("  balancer: {} xlated instructions", bytes / 8);
    }
    // What the kernel charges per conn-table entry (one table holds both
    // families: a flow is named by its digest, whatever its addresses).
    let (memlock, capacity) = dp.conn_table_memory()?;
    let per_flow = memlock as f64 / capacity as f64;
    for family in ["v4", "v6"] {
        r.insert(format!("dataplane.conn_bytes_per_flow_{family}"), per_flow);
    }
    eprintln!("  conn table: {memlock} bytes charged for {capacity} entries: {per_flow:.1} bytes per tracked flow");
    Ok(())
}

/// How many of the last `n` distinct flows a table of `C` entries still
/// holds (the kernel's LRU hash would hold all while n <= C; 4-way buckets
/// evict within a bucket). Computed with the program's own bucket code.
fn conn_table_occupancy(r: &mut Results) {
    const CAPACITY: usize = 262_144;
    eprintln!("conn table occupancy ({CAPACITY} entries, {} ways)", lb_common::CONN_WAYS);
    for load in [0.25, 0.5, 1.0] {
        let n = (CAPACITY as f64 * load) as usize;
        let buckets = (CAPACITY / lb_common::CONN_WAYS) as u32;
        let mut table = vec![lb_common::ConnBucket::default(); buckets as usize];
        let mut rng = XorShift(0x0cc0 + n as u64);
        let digests: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
        for &d in &digests {
            lb_common::conntrack::insert(&mut table[lb_common::conntrack::bucket_index(d, buckets) as usize], d, 1);
        }
        let kept = digests
            .iter()
            .filter(|&&d| {
                let bucket = &table[lb_common::conntrack::bucket_index(d, buckets) as usize];
                lb_common::conntrack::find(bucket, d).is_some()
            })
            .count();
        let pct = 100.0 * kept as f64 / n as f64;
        eprintln!("  {n} flows ({:.0}% of capacity): {pct:.1}% still held", load * 100.0);
        r.insert(format!("conn_table.kept_pct_at_{:.0}pct_load", load * 100.0), pct);
    }
}

/// The same frame with the SYN flag instead of ACK (TCP), or as is (UDP).
fn syn_of(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ipv6 = u16::from_be_bytes([f[12], f[13]]) == ETH_P_IPV6;
    let (proto, l4) = if ipv6 { (f[20], 54) } else { (f[23], 34) };
    if proto == 6 {
        f[l4 + 13] = SYN;
    }
    f
}

/// Benchmarks that need the lab: control-plane latency, pps, HTTP rps.
fn lbctl_release() -> anyhow::Result<PathBuf> {
    let lbctl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/lbctl");
    anyhow::ensure!(lbctl.exists(), "build lbctl first: cargo build --release -p lb-userspace");
    Ok(lbctl)
}

fn lab_benches(r: &mut Results, opts: &Opts) -> anyhow::Result<()> {
    let lbctl = lbctl_release()?;
    eprintln!("lab: up");
    let lab = Lab::up(&lbctl, &mut |_| {})?;
    control(r, &lab, opts)?;
    pps(r, &lab, opts)?;
    http(r, &lab, opts)?;
    Ok(())
}

fn control(r: &mut Results, lab: &Lab, opts: &Opts) -> anyhow::Result<()> {
    eprintln!("control (ms from a backend-add call to its return, the new ring live)");
    let vip = "203.0.113.20:80/tcp";
    lab.lbctl_all(&["vip", "add", vip])?;
    for j in 1..=10 {
        lab.lbctl_all(&["backend", "add", vip, &format!("198.51.100.{}", 100 + j)])?;
    }
    let socket = Lab::socket(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let vips_map = MapData::from_pin("/sys/fs/bpf/lbctl/lb1-eth/VIPS")?;
    let vips_map: BpfHashMap<MapData, VipKey, VipMeta> = BpfHashMap::try_from(aya::maps::Map::HashMap(vips_map))?;
    let key = vip.parse::<VipAddr>().map_err(anyhow::Error::msg)?.key();
    let n = if opts.quick { 10 } else { 40 };
    let mut samples = Vec::new();
    rt.block_on(async {
        let channel = connect(&socket).await?;
        let mut api = lb_userspace::api::pb::backends_client::BackendsClient::new(channel);
        for k in 0..n {
            let before = vips_map.get(&key, 0)?.ring_offset;
            let addr = format!("198.51.100.{}", 200 + k % 50);
            let t = Instant::now();
            api.add_backend(lb_userspace::api::pb::AddBackendRequest {
                vip: vip.into(),
                address: addr.clone(),
                weight: Some(1),
                health: None,
                server_id: String::new(),
            })
            .await?;
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(vips_map.get(&key, 0)?.ring_offset != before, "the ring was not live on return");
            api.delete_backend(lb_userspace::api::pb::BackendRef { vip: vip.into(), address: addr }).await?;
        }
        anyhow::Ok(())
    })?;
    record(r, "control.update_to_dataplane_ms", &mut samples);
    Ok(())
}

async fn connect(path: &str) -> anyhow::Result<tonic::transport::Channel> {
    let path = path.to_string();
    Ok(tonic::transport::Endpoint::try_from("http://lbctl.invalid")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?)
}

/// rx packets of an interface in a namespace.
fn rx_packets(netns: &str, dev: &str) -> u64 {
    let out = ns(netns, &["cat", &format!("/sys/class/net/{dev}/statistics/rx_packets")]).unwrap();
    out.trim().parse().unwrap()
}

fn mac_of(netns: &str, dev: &str) -> [u8; 6] {
    let out = ns(netns, &["cat", &format!("/sys/class/net/{dev}/address")]).unwrap();
    lb_userspace::netlink::parse_mac(out.trim()).unwrap()
}

/// Sends `count` copies of a 64-byte UDP frame out of the client's NIC with
/// BPF_PROG_TEST_RUN live frames; returns (packets seen coming back out of
/// the LB hosts at the router, seconds).
fn generate(count: u32) -> anyhow::Result<(u64, f64)> {
    let client_mac = mac_of(CLIENT_NS, "cl-eth");
    let router_mac = mac_of(ROUTER_NS, "rt-cl");
    // floor_tx swaps the MACs: write them swapped so the frame leaves
    // addressed to the router.
    let mut frame = eth(client_mac, router_mac, ETH_P_IP);
    let payload = udp(40000, 9999, &[0; 18]);
    let mut ip = ipv4("192.0.2.10".parse()?, "203.0.113.10".parse()?, 17, &[], payload.len());
    // TTL 2: the router forwards it to an LB host once; a frame only bounced
    // back by the floor program dies at the router instead of looping.
    ip[8] = 2;
    ip[10] = 0;
    ip[11] = 0;
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend(ip);
    frame.extend(payload);
    let before: u64 = (1..=lb_lab::LBS).map(|i| rx_packets(ROUTER_NS, &format!("rt-lb{i}"))).sum();
    let elapsed = in_ns(CLIENT_NS, move || -> anyhow::Result<f64> {
        let mut floors = EbpfLoader::new().load(object::FLOOR)?;
        let p: &mut Xdp = floors.program_mut("floor_tx").unwrap().try_into()?;
        p.load()?;
        let ifindex = lb_userspace::netlink::if_index("cl-eth").unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...;
        // the kernel wants data_end = the frame's length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let t = Instant::now();
        p.test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::default()
        })?;
        Ok(t.elapsed().as_secs_f64())
    })??;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after: u64 = (1..=lb_lab::LBS).map(|i| rx_packets(ROUTER_NS, &format!("rt-lb{i}"))).sum();
    Ok((after - before, elapsed))
}

fn pps(r: &mut Results, lab: &Lab, opts: &Opts) -> anyhow::Result<()> {
    eprintln!("e2e packets per second (live-frame generator on the client)");
    // XDP_TX out of the client's veth needs XDP on its peer (PLATFORM.md).
    lab.lbctl_in(ROUTER_NS, &["decap", "up", "rt-cl", "--address", "192.0.2.1"])?;
    lab.lbctl_all(&["vip", "add", "203.0.113.10:9999/udp"])?;
    for j in 1..=lb_lab::BACKENDS {
        lab.lbctl_all(&["backend", "add", "203.0.113.10:9999/udp", &lb_lab::backend_v4(j)])?;
    }
    lab.wait_routes(lb_lab::VIP4, &[1, 2])?;
    let (rounds, count) = if opts.quick { (3, 200_000) } else { (5, 1_000_000) };
    let mut lb = Vec::new();
    for _ in 0..rounds {
        let (seen, secs) = generate(count)?;
        eprintln!("  lb: {seen} of {count} packets forwarded in {secs:.2} s");
        lb.push(seen as f64 / secs);
    }
    record(r, "e2e.lb_pps", &mut lb);
    // The floor: the LB hosts only bounce packets back to the router. Their
    // controllers withdraw the VIP's routes when they stop: a static ECMP
    // route keeps the packets going to them.
    ns(
        ROUTER_NS,
        &[
            "ip",
            "route",
            "add",
            "203.0.113.10/32",
            "metric",
            "1",
            "nexthop",
            "via",
            "198.51.100.2",
            "nexthop",
            "via",
            "198.51.100.6",
        ],
    )?;
    for i in 1..=lb_lab::LBS {
        lab.stop_lb(i, libc::SIGTERM)?;
    }
    let mut holders = Vec::new();
    for i in 1..=lb_lab::LBS {
        let dev = lb_lab::lb_iface(i);
        holders.push(in_ns(&lb_lab::lb_ns(i), move || -> anyhow::Result<aya::Ebpf> {
            let mut floors = EbpfLoader::new().load(object::FLOOR)?;
            let p: &mut Xdp = floors.program_mut("floor_tx").unwrap().try_into()?;
            p.load()?;
            p.attach(&dev, XdpMode::Driver)?;
            Ok(floors)
        })??);
    }
    let mut floor = Vec::new();
    for _ in 0..rounds {
        let (seen, secs) = generate(count)?;
        eprintln!("  floor: {seen} of {count} packets bounced in {secs:.2} s");
        floor.push(seen as f64 / secs);
    }
    drop(holders);
    ns(ROUTER_NS, &["ip", "route", "del", "203.0.113.10/32", "metric", "1"])?;
    record(r, "e2e.floor_pps", &mut floor);
    for i in 1..=lb_lab::LBS {
        lab.start_lb(i, &[])?;
    }
    Ok(())
}

/// wrk's "Requests/sec" from the client against `url`.
fn wrk(url: &str, secs: u32) -> anyhow::Result<f64> {
    let out = ns(CLIENT_NS, &["wrk", "-t2", "-c32", &format!("-d{secs}s"), "--timeout", "2s", url])?;
    let line = out.lines().find(|l| l.starts_with("Requests/sec:")).ok_or_else(|| anyhow::anyhow!("wrk: {out}"))?;
    Ok(line.split_whitespace().nth(1).unwrap().parse()?)
}

fn http(r: &mut Results, lab: &Lab, opts: &Opts) -> anyhow::Result<()> {
    eprintln!("e2e HTTP requests per second (wrk -t2 -c32), LB vs HAProxy on lb1");
    lab.lbctl_all(&["vip", "add", "203.0.113.10:80/tcp"])?;
    for j in 1..=lb_lab::BACKENDS {
        lab.lbctl_all(&["backend", "add", "203.0.113.10:80/tcp", &lb_lab::backend_v4(j)])?;
    }
    // One LB host for both, so the comparison is host against host.
    lab.route_through(&[1], lb_lab::VIP4)?;
    let dir = format!("{}/haproxy", lb_lab::DIR);
    std::fs::create_dir_all(&dir)?;
    let servers: String =
        (1..=lb_lab::BACKENDS).map(|j| format!("    server be{j} {}:80\n", lb_lab::backend_v4(j))).collect();
    std::fs::write(
        format!("{dir}/haproxy.cfg"),
        format!(
            "global\n    maxconn 4096\n    pidfile {dir}/haproxy.pid\n    daemon\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
             frontend fe\n    bind 198.51.100.2:8080\n    default_backend be\n\
             backend be\n    balance roundrobin\n{servers}"
        ),
    )?;
    ns(&lb_lab::lb_ns(1), &["haproxy", "-f", &format!("{dir}/haproxy.cfg")])?;
    let (rounds, secs) = if opts.quick { (1, 3) } else { (3, 5) };
    let (mut lb, mut haproxy) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        lb.push(wrk("http://203.0.113.10/", secs)?);
        haproxy.push(wrk("http://198.51.100.2:8080/", secs)?);
    }
    let pid = std::fs::read_to_string(format!("{dir}/haproxy.pid"))?;
    let _ = sh("kill", &[pid.trim()]);
    record(r, "e2e.http_rps_lb", &mut lb);
    record(r, "e2e.http_rps_haproxy", &mut haproxy);
    Ok(())
}
