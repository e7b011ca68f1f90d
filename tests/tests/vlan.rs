//! Packet tests of VLAN-tagged frames (IEEE 802.1Q tags, 802.1ad QinQ):
//! the real balancer and decap objects through BPF_PROG_TEST_RUN, every
//! path, expected bytes written by hand. Needs root; no interface is
//! touched.

use lb_common::stat;
use lb_tests::*;
use lb_userspace::{Decap, HashMode};

const CLIENT: &str = "192.0.2.55";
const VIP: &str = "203.0.113.10";

/// 802.1Q tag: TPID 0x8100, TCI = priority 3, DEI 0, VLAN 100 (0x6064).
const VLAN100: [u8; 4] = [0x81, 0x00, 0x60, 0x64];
/// 802.1ad service tag: TPID 0x88a8, priority 0, VLAN 10.
const SVLAN10: [u8; 4] = [0x88, 0xa8, 0x00, 0x0a];

fn one_backend_v4() -> Harness {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.20", 1);
    h
}

/// The outer IPv4 header of a SYN with 40 bytes of IP to 198.51.100.20
/// (RFC 791/2003: total 60, DF, TTL 64, protocol 4, checksum 0x4e75 by
/// hand, 192.0.2.1 -> 198.51.100.20), as in the untagged test.
#[rustfmt::skip]
const OUTER_V4: [u8; 20] = [
    0x45, 0x00, 0x00, 0x3c,  0x00, 0x00, 0x40, 0x00,
    0x40, 0x04, 0x4e, 0x75,  192, 0, 2, 1,  198, 51, 100, 20,
];

/// A SYN (`plain`, untagged) as the balancer forwards it to 198.51.100.20:
/// to the next hop, from the LB, then the tags' bytes as they came, IPv4,
/// [`OUTER_V4`] and the packet as it arrived.
fn forwarded(tags: &[[u8; 4]], plain: &[u8]) -> Vec<u8> {
    #[rustfmt::skip]
    let macs = [0x02, 0, 0, 0, 0, 0x02,  0x02, 0, 0, 0, 0, 0x01];
    [&macs[..], &tags.concat(), &[0x08, 0x00], &OUTER_V4, &plain[14..]].concat()
}

/// A stateless VIP with one backend, 198.51.100.20.
fn stateless_vip(h: &mut Harness, vip: &str, encap: lb_userspace::services::Encap) {
    let spec = lb_userspace::VipSpec {
        vip: vip.parse().unwrap(),
        hash: HashMode::FiveTuple,
        ring_size: 65537,
        encap,
        stateless: true,
        quic: None,
    };
    let vip = h.vip_spec(spec);
    h.backend(&vip, "198.51.100.20", 1);
}

#[test]
fn a_tagged_syn_leaves_encapsulated_with_its_tag_in_front_of_the_outer_header() {
    let mut h = one_backend_v4();
    let plain = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let input = tagged(&plain, &[VLAN100]);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(out, forwarded(&[VLAN100], &plain));
    assert_eq!(h.stat(stat::FORWARDED), 1);
}

#[test]
fn a_qinq_frame_keeps_both_tags_over_ipv4_and_ipv6() {
    let mut h = one_backend_v4();
    let plain = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let (action, out) = h.run(&tagged(&plain, &[SVLAN10, VLAN100]));
    assert_eq!(action, XDP_TX);
    assert_eq!(out, forwarded(&[SVLAN10, VLAN100], &plain));

    // IPv6 in IPv6 (RFC 2473): the tags, then EtherType 0x86dd.
    let v6 = h.vip("[2001:db8::10]:80/tcp", HashMode::FiveTuple);
    h.backend(&v6, "2001:db8:1::20", 1);
    let plain6 = tcp_frame("2001:db8:c::55", 40000, "2001:db8::10", 80, SYN);
    let (action, out) = h.run(&tagged(&plain6, &[SVLAN10, VLAN100]));
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..22], &[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x60, 0x64, 0x86, 0xdd]);
    assert_eq!(out[22] >> 4, 6);
    assert_eq!(out[28], 41, "next header: IPv6");
    assert_eq!(&out[46..62], &"2001:db8:1::20".parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(&out[62..], &plain6[14..], "inner packet untouched");
}

#[test]
fn frames_passed_to_the_kernel_keep_their_tags_byte_for_byte() {
    let mut h = one_backend_v4();
    let not_a_vip = tagged(&tcp_frame(CLIENT, 40000, "203.0.113.99", 80, SYN), &[VLAN100]);
    assert_eq!(h.run(&not_a_vip), (XDP_PASS, not_a_vip.clone()));
    let qinq = tagged(&udp_frame(CLIENT, 5353, "203.0.113.99", 53, b"q"), &[SVLAN10, VLAN100]);
    assert_eq!(h.run(&qinq), (XDP_PASS, qinq.clone()));
    // ARP on VLAN 100 (RFC 826 request, 28 bytes).
    let mut arp = tagged(&eth([0xff; 6], ROUTER_MAC, ETH_P_ARP), &[VLAN100]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);
    assert_eq!(h.run(&arp), (XDP_PASS, arp.clone()));
    // A third tag is not parsed: passed as it came, counted malformed.
    let three = tagged(&tcp_frame(CLIENT, 40000, VIP, 80, SYN), &[SVLAN10, VLAN100, VLAN100]);
    assert_eq!(h.run(&three), (XDP_PASS, three.clone()));
    // A tag cut short: the frame ends inside it.
    let cut = tagged(&tcp_frame(CLIENT, 40000, VIP, 80, SYN), &[VLAN100])[..15].to_vec();
    assert_eq!(h.run(&cut), (XDP_PASS, cut.clone()));
    assert_eq!(h.stat(stat::MALFORMED), 2);
    assert_eq!(h.stat(stat::NOT_FOR_US), 3);
}

#[test]
fn echo_replies_and_too_big_answers_go_back_on_the_vlan_they_came_from() {
    let mut h = one_backend_v4();
    let request = echo_request_v4(CLIENT, VIP);
    let (action, out) = h.run(&tagged(&request, &[SVLAN10, VLAN100]));
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected: [u8; 50] = [
        0x02, 0, 0, 0, 0, 0x03,  0x02, 0, 0, 0, 0, 0x01,
        0x88, 0xa8, 0x00, 0x0a,  0x81, 0x00, 0x60, 0x64,  0x08, 0x00,
        0x45, 0x00, 0x00, 0x1c,  0x12, 0x34, 0x40, 0x00,
        0x40, 0x01, 0x2a, 0x6b,  203, 0, 113, 10,  192, 0, 2, 55,
        0x00, 0x00, 0xff, 0xfd,  0x00, 0x01, 0x00, 0x01,
    ];
    assert_eq!(out, expected.to_vec());

    // 1481 bytes with DF: RFC 1191 "fragmentation needed", MTU 1480.
    let payload = vec![0u8; 1481 - 40];
    let big = frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 6, &[tcp(40000, 80, ACK), payload].concat());
    let (action, out) = h.run(&tagged(&big, &[VLAN100]));
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected_head: [u8; 46] = [
        0x02, 0, 0, 0, 0, 0x03,  0x02, 0, 0, 0, 0, 0x01,
        0x81, 0x00, 0x60, 0x64,  0x08, 0x00,
        0x45, 0x00, 0x00, 0x38,  0x00, 0x00, 0x00, 0x00,
        0x40, 0x01, 0x7c, 0x83,  203, 0, 113, 10,  192, 0, 2, 55,
        0x03, 0x04, 0x00, 0x00,  0x00, 0x00, 0x05, 0xc8,
    ];
    let mut head = out[..46].to_vec();
    head[40] = 0;
    head[41] = 0;
    assert_eq!(head, expected_head.to_vec());
    assert_eq!(&out[46..74], &big[14..42], "quotes the IP header and 8 bytes");
    assert_eq!(out.len(), 74);
    assert_eq!(checksum(&out[38..74]), 0, "ICMP checksum verifies");
}

#[test]
fn fragments_of_a_tagged_datagram_reach_one_backend_tagged() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:53/udp", HashMode::FiveTuple);
    for i in 1..=5 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
    }
    // RFC 791: the first fragment (MF, offset 0) and the last (offset 2,
    // in 8-byte units), both ID 0x1234.
    let first = {
        let mut f = udp_frame(CLIENT, 5353, VIP, 53, &[7; 8]);
        f[20..22].copy_from_slice(&[0x20, 0x00]);
        fix_ipv4_checksum(&mut f);
        f
    };
    let last = {
        let mut f = frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 17, &[9; 8]);
        f[20..22].copy_from_slice(&[0x00, 0x02]);
        fix_ipv4_checksum(&mut f);
        f
    };
    let mut to = Vec::new();
    for plain in [&first, &last] {
        let (action, out) = h.run(&tagged(plain, &[VLAN100]));
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[12..18], &[0x81, 0x00, 0x60, 0x64, 0x08, 0x00]);
        assert_eq!(&out[38..], &plain[14..], "inner fragment untouched");
        to.push(out[34..38].to_vec());
    }
    assert_eq!(to[0], to[1], "both fragments to one backend");
    assert_eq!(h.stat(stat::FRAGMENT_FORWARDED), 2);
}

fn fix_ipv4_checksum(f: &mut [u8]) {
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn the_vlan_map_moves_forwarded_packets_to_the_backends_vlan_and_nothing_else() {
    let mut h = one_backend_v4();
    h.dp.set_vlan_egress(100, 200).unwrap();
    let plain = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    // Priority 3 kept, VLAN 200 (0x0c8): TCI 0x60c8.
    let (action, out) = h.run(&tagged(&plain, &[VLAN100]));
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..18], &[0x81, 0x00, 0x60, 0xc8, 0x08, 0x00]);
    assert_eq!(&out[18..38], &OUTER_V4);
    // QinQ: the inner (customer) tag is the one mapped.
    let (_, out) = h.run(&tagged(&plain, &[SVLAN10, VLAN100]));
    assert_eq!(&out[12..22], &[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x60, 0xc8, 0x08, 0x00]);
    // Another VLAN is not mapped.
    let (_, out) = h.run(&tagged(&plain, &[[0x81, 0x00, 0x00, 0x65]]));
    assert_eq!(&out[12..16], &[0x81, 0x00, 0x00, 0x65]);
    // Answers to the client stay on the client's VLAN.
    let request = tagged(&echo_request_v4(CLIENT, VIP), &[VLAN100]);
    let (action, out) = h.run(&request);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..16], &VLAN100);
    // And what goes to the kernel goes as it came.
    let not_a_vip = tagged(&tcp_frame(CLIENT, 40000, "203.0.113.99", 80, SYN), &[VLAN100]);
    assert_eq!(h.run(&not_a_vip), (XDP_PASS, not_a_vip.clone()));
}

#[test]
fn the_decap_program_strips_tagged_tunnels_and_passes_them_up_tagged() {
    let mut d = Decap::load().expect("decap object loads and verifies");
    d.add_address("198.51.100.20".parse().unwrap()).unwrap();
    let backend_mac = [0x02, 0, 0, 0, 0, 0x20];
    let inner = &tcp_frame(CLIENT, 40000, VIP, 80, SYN)[14..];
    let mut outer = eth(backend_mac, NEXT_HOP_MAC, ETH_P_IP);
    outer.extend(ipv4("192.0.2.1".parse().unwrap(), "198.51.100.20".parse().unwrap(), 4, &[], inner.len()));
    outer.extend_from_slice(inner);
    for tags in [&[VLAN100][..], &[SVLAN10, VLAN100][..]] {
        let (action, out) = run_xdp(d.program(), &tagged(&outer, tags));
        assert_eq!(action, XDP_PASS);
        let mut expected = tagged(&eth(backend_mac, NEXT_HOP_MAC, ETH_P_IP), tags);
        expected.extend_from_slice(inner);
        assert_eq!(out, expected, "tags {tags:x?}");
    }
    // Not ours: passed as it came.
    let other = tagged(&tcp_frame(CLIENT, 40000, "198.51.100.99", 80, SYN), &[VLAN100]);
    assert_eq!(run_xdp(d.program(), &other), (XDP_PASS, other.clone()));
}

#[test]
fn a_tagged_packet_of_a_gue_vip_leaves_as_the_untagged_one_does_with_its_tags() {
    let mut h = Harness::new();
    stateless_vip(&mut h, "203.0.113.20:80/tcp", lb_userspace::services::Encap::Gue);
    let syn = tcp_frame(CLIENT, 40000, "203.0.113.20", 80, SYN);
    let (action, untagged) = h.run(&syn);
    assert_eq!(action, XDP_TX);
    assert_eq!(&untagged[12..14], &[0x08, 0x00]);
    assert_eq!(&untagged[36..38], &6080u16.to_be_bytes(), "GUE (UDP 6080), as tests/gue.rs checks byte by byte");
    let (action, out) = h.run(&tagged(&syn, &[SVLAN10, VLAN100]));
    assert_eq!(action, XDP_TX);
    assert_eq!(out, tagged(&untagged, &[SVLAN10, VLAN100]));
}

#[test]
fn the_offload_flavor_balances_tagged_frames_and_passes_the_rest_as_they_came() {
    let mut h =
        Harness::with(lb_userspace::LoadOptions { offload_flavor: true, ring_capacity: 1 << 20, ..Default::default() });
    stateless_vip(&mut h, "203.0.113.10:80/tcp", lb_userspace::services::Encap::Ipip);
    let plain = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let (action, out) = h.run(&tagged(&plain, &[SVLAN10, VLAN100]));
    assert_eq!(action, XDP_TX);
    assert_eq!(out, forwarded(&[SVLAN10, VLAN100], &plain));
    let not_a_vip = tagged(&tcp_frame(CLIENT, 40000, "203.0.113.99", 80, SYN), &[VLAN100]);
    assert_eq!(h.run(&not_a_vip), (XDP_PASS, not_a_vip.clone()));
}
