//! Packet tests of the data-path checks' egress program (`lb-probe`): what
//! a marked check packet looks like once encapsulated, byte for byte, with
//! the outer headers written here by hand from RFC 2003 (IPv4 in IPv4),
//! RFC 2473 (in IPv6), RFC 768 and draft-ietf-intarea-gue (GUE variant 0);
//! and that everything else leaves untouched. BPF_PROG_TEST_RUN; needs root.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    maps::Array,
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use lb_common::{ProbeRoute, AF_INET, AF_INET6, MAX_PROBES, PROBE_MARK_BASE};
use lb_tests::*;

/// TC_ACT_UNSPEC (-1, include/uapi/linux/pkt_cls.h): the frame goes on,
/// and on tcx the next program on egress still runs (TC_ACT_OK, 0, would
/// end the chain).
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
/// The check socket's own frame: from the LB host to the router.
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// The next hop the balancer uses (another router, to tell them apart).
const NEXT_HOP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];

struct Probe {
    ebpf: Ebpf,
}

impl Probe {
    fn load() -> Self {
        let mut ebpf = Ebpf::load(lb_userspace::object::PROBE).expect("lb-probe loads");
        let program: &mut SchedClassifier = ebpf.program_mut("probe_encap").unwrap().try_into().unwrap();
        program.load().expect("the verifier takes probe_encap");
        Self { ebpf }
    }

    fn route(&mut self, id: u32, route: ProbeRoute) {
        let mut routes: Array<_, ProbeRoute> = Array::try_from(self.ebpf.map_mut("PROBE_ROUTES").unwrap()).unwrap();
        routes.set(id, route, 0).unwrap();
    }

    /// Runs `frame` as a packet with socket mark `mark`: (verdict, frame out).
    fn run(&self, frame: &[u8], mark: u32) -> (u32, Vec<u8>) {
        let program: &SchedClassifier = self.ebpf.program("probe_encap").unwrap().try_into().unwrap();
        // struct __sk_buff up to `mark` (len and pkt_type must be zero).
        let mut ctx = [0u8; 12];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 128];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs a check's frame that must leave (TC_ACT_UNSPEC); the frame out.
    fn encapsulated(&self, frame: &[u8], mark: u32) -> Vec<u8> {
        let (verdict, out) = self.run(frame, mark);
        assert_eq!(verdict, TC_ACT_UNSPEC, "mark {mark:#x}: the frame leaves");
        out
    }
}

/// A check's SYN as the kernel hands it to tc egress: Ethernet towards the
/// gateway, then IP from the LB host to the VIP, then TCP.
fn check_syn_v4() -> Vec<u8> {
    let mut f = eth(GATEWAY_MAC, HOST_MAC, 0x0800);
    f.extend(ipv4(Ipv4Addr::new(198, 51, 100, 2), Ipv4Addr::new(203, 0, 113, 10), 6, &[], 20));
    f.extend(tcp(41000, 80, SYN));
    f
}

fn check_syn_v6() -> Vec<u8> {
    let mut f = eth(GATEWAY_MAC, HOST_MAC, 0x86dd);
    f.extend(ipv6("2001:db8:a1::2".parse().unwrap(), "2001:db8:f::10".parse().unwrap(), 6, 20));
    f.extend(tcp(41000, 80, SYN));
    f
}

fn v4_route(gue_port: u16) -> ProbeRoute {
    let word = |a: [u8; 4]| u32::from_ne_bytes(a);
    ProbeRoute {
        saddr: [word([198, 51, 100, 2]), 0, 0, 0],
        daddr: [word([198, 51, 100, 34]), 0, 0, 0],
        next_hop_mac: NEXT_HOP,
        gue_port: gue_port.to_be(),
        family: AF_INET,
        _pad: [0; 3],
    }
}

fn v6_route(gue_port: u16) -> ProbeRoute {
    let words = |a: Ipv6Addr| {
        let o = a.octets();
        std::array::from_fn(|i| u32::from_ne_bytes(o[4 * i..4 * i + 4].try_into().unwrap()))
    };
    ProbeRoute {
        saddr: words("2001:db8:a1::2".parse().unwrap()),
        daddr: words("2001:db8:b2::2".parse().unwrap()),
        next_hop_mac: NEXT_HOP,
        gue_port: gue_port.to_be(),
        family: AF_INET6,
        _pad: [0; 3],
    }
}

/// RFC 791 outer header written out: version 4, IHL 5, TOS 0, length,
/// ID 0, DF, TTL 64, protocol, checksum, 198.51.100.2 -> 198.51.100.34.
fn outer_v4(total_len: u16, proto: u8) -> Vec<u8> {
    let mut h = vec![0x45, 0x00];
    h.extend_from_slice(&total_len.to_be_bytes());
    h.extend_from_slice(&[0x00, 0x00, 0x40, 0x00, 64, proto, 0x00, 0x00]);
    h.extend_from_slice(&[198, 51, 100, 2, 198, 51, 100, 34]);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

#[test]
fn a_check_packet_leaves_in_ip_in_ip_to_its_backend_through_the_next_hop() {
    let mut probe = Probe::load();
    probe.route(7, v4_route(0));
    let syn = check_syn_v4();
    let out = probe.encapsulated(&syn, PROBE_MARK_BASE + 7);
    let mut want = eth(NEXT_HOP, HOST_MAC, 0x0800);
    // Protocol 4: IPv4 in IPv4; length 20 + the 40-byte inner packet.
    want.extend(outer_v4(60, 4));
    want.extend_from_slice(&syn[14..]);
    assert_eq!(out, want);
}

#[test]
fn a_check_packet_leaves_in_gue_over_ipv4_with_no_private_data() {
    let mut probe = Probe::load();
    probe.route(0, v4_route(6080));
    let syn = check_syn_v4();
    let out = probe.encapsulated(&syn, PROBE_MARK_BASE);
    let mut want = eth(NEXT_HOP, HOST_MAC, 0x0800);
    want.extend(outer_v4(20 + 8 + 4 + 40, 17));
    // UDP: source port 0xc000 | (flow hash & 0x3fff), the hash is 0 in a
    // test run; destination 6080; length 8 + 4 + 40; checksum 0.
    want.extend_from_slice(&[0xc0, 0x00, 0x17, 0xc0, 0x00, 52, 0x00, 0x00]);
    // GUE variant 0: C 0, Hlen 0 (no alternates), proto 4 (IPv4), flags 0.
    want.extend_from_slice(&[0x00, 0x04, 0x00, 0x00]);
    want.extend_from_slice(&syn[14..]);
    assert_eq!(out, want);
}

#[test]
fn a_check_to_an_ipv6_backend_leaves_in_ipv6_and_in_gue_over_ipv6() {
    let mut probe = Probe::load();
    probe.route(1, v6_route(0));
    probe.route(2, v6_route(6080));
    let syn = check_syn_v6();
    let inner = &syn[14..];
    let outer = |payload_len: u16, next_header: u8| {
        // RFC 8200: version 6, class 0, flow label from the hash (0 here).
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&payload_len.to_be_bytes());
        h.extend_from_slice(&[next_header, 64]);
        h.extend_from_slice(&"2001:db8:a1::2".parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(&"2001:db8:b2::2".parse::<Ipv6Addr>().unwrap().octets());
        h
    };

    let out = probe.encapsulated(&syn, PROBE_MARK_BASE + 1);
    let mut want = eth(NEXT_HOP, HOST_MAC, 0x86dd);
    // Next header 41: IPv6 in IPv6 (RFC 2473).
    want.extend(outer(60, 41));
    want.extend_from_slice(inner);
    assert_eq!(out, want, "IPv6 in IPv6");

    let out = probe.encapsulated(&syn, PROBE_MARK_BASE + 2);
    let mut want = eth(NEXT_HOP, HOST_MAC, 0x86dd);
    want.extend(outer(8 + 4 + 60, 17));
    want.extend_from_slice(&[0xc0, 0x00, 0x17, 0xc0, 0x00, 72, 0x00, 0x00]);
    // GUE proto 41: the inner packet is IPv6.
    want.extend_from_slice(&[0x00, 41, 0x00, 0x00]);
    want.extend_from_slice(inner);
    assert_eq!(out, want, "GUE over IPv6");

    // An IPv4 VIP's check to an IPv6 backend: next header 4.
    let syn = check_syn_v4();
    let out = probe.encapsulated(&syn, PROBE_MARK_BASE + 1);
    let mut want = eth(NEXT_HOP, HOST_MAC, 0x86dd);
    want.extend(outer(40, 4));
    want.extend_from_slice(&syn[14..]);
    assert_eq!(out, want, "IPv4 in IPv6");
}

#[test]
fn unmarked_packets_pass_untouched_and_a_check_without_a_route_is_dropped() {
    let mut probe = Probe::load();
    probe.route(3, v4_route(0));
    let syn = check_syn_v4();
    for mark in [0, 1, PROBE_MARK_BASE - 1, PROBE_MARK_BASE + MAX_PROBES] {
        assert_eq!(probe.run(&syn, mark), (TC_ACT_UNSPEC, syn.clone()), "mark {mark:#x} is not a check's");
    }
    // A check whose route is gone must not reach the VIP through the
    // tier, where any backend could answer for it.
    let (verdict, _) = probe.run(&syn, PROBE_MARK_BASE + 4);
    assert_eq!(verdict, TC_ACT_SHOT);
}
