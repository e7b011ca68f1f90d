//! Support for the packet tests: frames built field by field from the RFCs,
//! and a harness that loads the real balancer object and runs frames through
//! it with BPF_PROG_TEST_RUN. Expected outputs live in the tests, by hand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    services::{Encap, VipAddr, VipSpec},
    BackendSpec, Dataplane, HashMode, LoadOptions, Services, Settings,
};

/// The router that hands frames to the LB host.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
/// The LB host's NIC.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The next hop towards backends.
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// TCP flags (RFC 9293 section 3.1).
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(14);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// RFC 1071 Internet checksum.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// RFC 791 header: TOS 0, ID 0x1234, DF, TTL 64, valid checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], payload_len: usize) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4));
    let header_len = 20 + options.len();
    let mut h = vec![0x40 | (header_len / 4) as u8, 0];
    h.extend_from_slice(&((header_len + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// RFC 8200 header: traffic class 0, flow label 0x12345, hop limit 64.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0x01, 0x23, 0x45];
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.extend_from_slice(&[next_header, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// RFC 9293 header, 20 bytes, no options. The checksum is left 0: the
/// balancer never reads or changes it.
pub fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // sequence
    h.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment
    h.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

/// RFC 768 header and payload.
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A whole frame from the router: Ethernet, IP, then `l4` (TCP or UDP bytes).
pub fn frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f = eth(LB_MAC, ROUTER_MAC, ETH_P_IP);
            f.extend(ipv4(s, d, proto, &[], l4.len()));
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f = eth(LB_MAC, ROUTER_MAC, ETH_P_IPV6);
            f.extend(ipv6(s, d, proto, l4.len()));
        }
        _ => panic!("mixed address families"),
    }
    f.extend_from_slice(l4);
    f
}

/// `frame` with VLAN `tags` (each TPID and TCI, as on the wire: IEEE
/// 802.1Q) inserted after its two MAC addresses.
pub fn tagged(frame: &[u8], tags: &[[u8; 4]]) -> Vec<u8> {
    [&frame[..12], &tags.concat(), &frame[12..]].concat()
}

/// An RFC 792 echo request from `src` to `dst`: id 1, sequence 1, no data,
/// checksum 0xf7fd (by hand; the addresses are not in it).
pub fn echo_request_v4(src: &str, dst: &str) -> Vec<u8> {
    frame(src.parse().unwrap(), dst.parse().unwrap(), 1, &[8, 0, 0xf7, 0xfd, 0, 1, 0, 1])
}

pub fn tcp_frame(src: &str, src_port: u16, dst: &str, dst_port: u16, flags: u8) -> Vec<u8> {
    frame(src.parse().unwrap(), dst.parse().unwrap(), 6, &tcp(src_port, dst_port, flags))
}

pub fn udp_frame(src: &str, src_port: u16, dst: &str, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    frame(src.parse().unwrap(), dst.parse().unwrap(), 17, &udp(src_port, dst_port, payload))
}

/// The outer destination of an encapsulated frame: the backend.
pub fn outer_dst(out: &[u8]) -> IpAddr {
    match u16::from_be_bytes([out[12], out[13]]) {
        ETH_P_IP => IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap()),
        ETH_P_IPV6 => IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap()),
        other => panic!("not an IP frame: ethertype {other:#06x}"),
    }
}

/// Default settings of the harness: outer sources are single addresses
/// (/32, /128) so that whole outer headers can be written out by hand.
pub fn test_settings() -> Settings {
    Settings {
        next_hop_mac: NEXT_HOP_MAC,
        encap_src_v4: ("192.0.2.1".parse().unwrap(), 32),
        encap_src_v6: ("2001:db8:ffff::1".parse().unwrap(), 128),
        mtu: 1500,
        debug: false,
        new_flow_limit: 0,
        gue_port: lb_common::DEFAULT_GUE_PORT,
        egress_mac: None,
    }
}

/// The real balancer object, loaded, with its maps written by the same
/// library the controller uses.
pub struct Harness {
    pub dp: Dataplane,
    pub services: Services,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(LoadOptions {
            conn_table_size: 65_536,
            // Four VIPs of the default ring size, each with all its rings.
            ring_capacity: 4 * lb_common::RINGS_PER_VIP * lb_common::ring_stride(65_537),
            bench_restore: false,
            offload_flavor: false,
            pin_dir: None,
        })
    }

    pub fn with(opts: LoadOptions) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "packet tests load XDP programs: run them as root (cargo xtask test does)"
        );
        let mut dp = Dataplane::load(opts).expect("the balancer object loads and verifies");
        let services = Services::new(&mut dp, test_settings()).expect("settings written");
        Self { dp, services }
    }

    /// Adds a VIP written as the CLI writes it, with the default ring size.
    pub fn vip(&mut self, vip: &str, hash: HashMode) -> VipAddr {
        let vip: VipAddr = vip.parse().unwrap();
        self.vip_spec(VipSpec { vip, hash, ring_size: 65537, encap: Encap::Ipip, stateless: false, quic: None })
    }

    /// Adds a VIP with every setting given.
    pub fn vip_spec(&mut self, spec: VipSpec) -> VipAddr {
        self.services.add_vip(&mut self.dp, spec).expect("VIP added");
        spec.vip
    }

    /// Adds a backend as one API call does: a change set of its own, so
    /// the declared ring history records it.
    pub fn backend(&mut self, vip: &VipAddr, addr: &str, weight: u32) {
        let spec = BackendSpec { addr: addr.parse().unwrap(), weight, server_id: None };
        self.services.add_backend(&mut self.dp, vip, spec).expect("backend added");
        self.commit();
    }

    /// Ends a change set made through `services` directly.
    pub fn commit(&mut self) {
        self.services.commit_history(&mut self.dp).expect("history recorded");
    }

    /// Runs one frame; returns the XDP action and the frame as it left.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_on(&mut self.dp, frame)
    }

    /// Runs a frame that must be forwarded; returns the backend it went to.
    pub fn forward(&mut self, frame: &[u8]) -> IpAddr {
        let (action, out) = self.run(frame);
        assert_eq!(action, XDP_TX, "frame was not forwarded");
        outer_dst(&out)
    }

    pub fn stat(&mut self, index: usize) -> u64 {
        self.dp.global_stats().unwrap()[index]
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one frame through a loaded program; returns the XDP action and the
/// frame as it left.
pub fn run_on(dp: &mut Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    run_xdp(dp.program(), frame)
}

/// Runs one frame through an XDP program (BPF_PROG_TEST_RUN).
pub fn run_xdp(program: &aya::programs::Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// A small deterministic generator, so a failing random test can be rerun.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The flow (conn-table key) of a frame built by the helpers above.
pub fn flow_of(frame: &[u8]) -> lb_common::FlowKey {
    let ipv6 = u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IPV6;
    let (src, dst, proto, l4, family) = if ipv6 {
        let a = |o: usize| lb_common::addr_words_v6(frame[o..o + 16].try_into().unwrap());
        (a(22), a(38), frame[20], 54, lb_common::AF_INET6)
    } else {
        let a = |o: usize| lb_common::addr_words_v4(frame[o..o + 4].try_into().unwrap());
        (a(26), a(30), frame[23], 34, lb_common::AF_INET)
    };
    let port = |o: usize| lb_common::port_raw(u16::from_be_bytes([frame[o], frame[o + 1]]));
    lb_common::FlowKey { src, dst, src_port: port(l4), dst_port: port(l4 + 2), proto, family, _pad: [0; 2] }
}

/// Runs `f` on a thread pinned to `cpu`: the conn table keeps one LRU list
/// per CPU (BPF_F_NO_COMMON_LRU), so where flows are written and where
/// packets run decides whether an insert finds room or evicts.
pub fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// The checksum of a TCP segment over IPv4 (RFC 9293 3.1: pseudo-header of
/// addresses, protocol and length, then the segment with its checksum 0).
pub fn tcp_checksum_v4(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut pseudo = [src, dst].concat();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// Valid frames of every kind the programs distinguish (the fuzz corpus
/// starts from these).
pub fn fuzz_templates() -> Vec<Vec<u8>> {
    let mut arp = eth([0xff; 6], ROUTER_MAC, ETH_P_ARP);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);
    let mut quoted = ipv4("203.0.113.10".parse().unwrap(), "192.0.2.55".parse().unwrap(), 6, &[], 1460);
    quoted.extend_from_slice(&tcp(80, 40000, ACK)[..8]);
    let mtu_error = frame(
        "198.51.100.254".parse().unwrap(),
        "203.0.113.10".parse().unwrap(),
        1,
        &[&[3u8, 4, 0, 0, 0, 0, 5, 0x78][..], &quoted].concat(),
    );
    let mut options = eth(LB_MAC, ROUTER_MAC, ETH_P_IP);
    options.extend(ipv4("192.0.2.55".parse().unwrap(), "203.0.113.10".parse().unwrap(), 6, &[1, 1, 1, 1], 20));
    options.extend(tcp(40000, 80, ACK));
    vec![
        tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, SYN),
        tcp_frame("192.0.2.55", 40001, "203.0.113.10", 80, ACK),
        tcp_frame("192.0.2.55", 40000, "203.0.113.10", 8080, SYN),
        udp_frame("192.0.2.55", 5353, "203.0.113.10", 53, b"query"),
        tcp_frame("2001:db8:c::55", 40000, "2001:db8::10", 443, SYN),
        udp_frame("2001:db8:c::55", 40000, "2001:db8::10", 53, b"q"),
        tcp_frame("192.0.2.55", 40000, "203.0.113.99", 80, SYN),
        echo_request_v4("192.0.2.55", "203.0.113.10"),
        frame("2001:db8:c::55".parse().unwrap(), "2001:db8::10".parse().unwrap(), 58, &[128, 0, 0, 0, 0, 1, 0, 1]),
        arp,
        options,
        mtu_error,
    ]
}

pub fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    let r = rng.next_u64();
    for _ in 0..(r % 4) {
        // Flip bytes, biased towards the headers where decisions are made.
        let span = if rng.next_u64().is_multiple_of(4) { f.len() } else { f.len().min(64) };
        let i = (rng.next_u64() as usize) % span;
        f[i] = rng.next_u64() as u8;
    }
    match (r >> 8) % 6 {
        0 => f.truncate(14 + (rng.next_u64() as usize) % f.len().saturating_sub(13).max(1)),
        1 => f.extend((0..rng.next_u64() % 64).map(|_| rng.next_u64() as u8)),
        _ => {}
    }
    if f.len() < 14 {
        f.resize(14, 0); // the kernel refuses shorter XDP test input
    }
    f
}

/// Runs `f` on a thread in a new network namespace with `lo` up: the
/// sockets, links and program runs it makes see only each other, and the
/// namespace goes with the thread (commands it starts run in it too).
pub fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
            assert!(up.success());
            f()
        })
        .join()
        .unwrap()
    })
}
