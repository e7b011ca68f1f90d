//! Packet tests: the real balancer object through BPF_PROG_TEST_RUN, maps
//! written by the controller's library, expected bytes written by hand.
//! Needs root (loads XDP programs); no interface is touched.

use std::net::IpAddr;

use lb_common::stat;
use lb_tests::*;
use lb_userspace::{
    services::{Encap, Via, VipSpec},
    BackendSpec, HashMode,
};

const CLIENT: &str = "192.0.2.55";
const VIP: &str = "203.0.113.10";
const CLIENT6: &str = "2001:db8:c::55";
const VIP6: &str = "2001:db8::10";

fn one_backend_v4() -> Harness {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.20", 1);
    h
}

/// The inner packet must leave byte for byte as it came in.
fn assert_inner_untouched(input: &[u8], out: &[u8], outer_len: usize) {
    assert_eq!(&out[14 + outer_len..], &input[14..], "inner packet changed");
}

#[test]
fn ipv4_syn_is_encapsulated_ipip_to_the_backend() {
    let mut h = one_backend_v4();
    let input = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(out.len(), input.len() + 20);
    #[rustfmt::skip]
    let expected_head: [u8; 34] = [
        // Ethernet: to the next hop, from the LB's own MAC, IPv4.
        0x02, 0, 0, 0, 0, 0x02,  0x02, 0, 0, 0, 0, 0x01,  0x08, 0x00,
        // IPv4 (RFC 791/2003): IHL 5, TOS 0, total 60 = 20 + 40 inner,
        // ID 0, DF, TTL 64, protocol 4 (IP-in-IP), checksum 0x4e75
        // (computed by hand), 192.0.2.1 -> 198.51.100.20.
        0x45, 0x00, 0x00, 0x3c,  0x00, 0x00, 0x40, 0x00,
        0x40, 0x04, 0x4e, 0x75,  192, 0, 2, 1,  198, 51, 100, 20,
    ];
    assert_eq!(&out[..34], &expected_head[..]);
    assert_eq!(checksum(&out[14..34]), 0, "outer checksum verifies");
    assert_inner_untouched(&input, &out, 20);
}

#[test]
fn ipv4_established_flow_keeps_its_backend_through_the_conn_table() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    for i in 1..=5 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
    }
    let first = h.forward(&tcp_frame(CLIENT, 40001, VIP, 80, SYN));
    assert_eq!(h.stat(stat::CONN_MISS), 1);
    for _ in 0..3 {
        assert_eq!(h.forward(&tcp_frame(CLIENT, 40001, VIP, 80, ACK)), first);
    }
    assert_eq!(h.stat(stat::CONN_HIT), 3);
    assert_eq!(h.stat(stat::CONN_MISS), 1);
}

#[test]
fn ipv6_syn_and_established_are_encapsulated_in_ipv6() {
    let mut h = Harness::new();
    let vip = h.vip("[2001:db8::10]:443/tcp", HashMode::FiveTuple);
    h.backend(&vip, "2001:db8:1::20", 1);
    let input = tcp_frame(CLIENT6, 50000, VIP6, 443, SYN);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected_head: [u8; 54] = [
        0x02, 0, 0, 0, 0, 0x02,  0x02, 0, 0, 0, 0, 0x01,  0x86, 0xdd,
        // IPv6 (RFC 8200/2473): version 6, traffic class 0, flow label
        // (checked below, masked here), payload 60 = 40 + 20 inner,
        // next header 41 (IPv6), hop limit 64.
        0x60, 0x00, 0x00, 0x00,  0x00, 0x3c, 41, 64,
        0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        0x20, 0x01, 0x0d, 0xb8, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
    ];
    let mut head = out[..54].to_vec();
    let label = u32::from_be_bytes([0, head[15] & 0x0f, head[16], head[17]]);
    head[15] &= 0xf0;
    head[16] = 0;
    head[17] = 0;
    assert_eq!(head, expected_head.to_vec());
    assert_inner_untouched(&input, &out, 40);

    // The flow label is the flow hash's low 20 bits: the same for every
    // packet of the flow, different for another flow (RFC 6438).
    let (_, again) = h.run(&tcp_frame(CLIENT6, 50000, VIP6, 443, ACK));
    assert_eq!(&again[14..18], &out[14..18]);
    let (_, other) = h.run(&tcp_frame(CLIENT6, 50001, VIP6, 443, SYN));
    let other_label = u32::from_be_bytes([0, other[15] & 0x0f, other[16], other[17]]);
    assert_ne!(label, other_label);
    assert_eq!(h.stat(stat::CONN_HIT), 1);
}

#[test]
fn ipv4_vip_to_ipv6_backend_is_ipv4_in_ipv6() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "2001:db8:1::20", 1);
    let input = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(out[14] >> 4, 6);
    assert_eq!(&out[18..22], &[0x00, 0x28, 4, 64], "payload 40, next header 4 (IPv4), hop limit 64");
    assert_eq!(outer_dst(&out), "2001:db8:1::20".parse::<std::net::IpAddr>().unwrap());
    assert_inner_untouched(&input, &out, 40);
}

#[test]
fn udp_is_balanced_and_encapsulated() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:53/udp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.20", 1);
    let input = udp_frame(CLIENT, 5353, VIP, 53, b"query");
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected_outer: [u8; 20] = [
        // Total 53 = 20 outer + 20 IPv4 + 8 UDP + 5 payload; checksum by hand.
        0x45, 0x00, 0x00, 0x35,  0x00, 0x00, 0x40, 0x00,
        0x40, 0x04, 0x4e, 0x7c,  192, 0, 2, 1,  198, 51, 100, 20,
    ];
    assert_eq!(&out[14..34], &expected_outer[..]);
    assert_inner_untouched(&input, &out, 20);
    // The same VIP address on TCP is not a VIP.
    let tcp = tcp_frame(CLIENT, 5353, VIP, 53, SYN);
    assert_eq!(h.run(&tcp), (XDP_PASS, tcp.clone()));
}

#[test]
fn port_zero_vip_catches_every_port_of_its_protocol() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:0/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.20", 1);
    for port in [1, 80, 8080, 65535] {
        assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, port, SYN)).to_string(), "198.51.100.20");
    }
    let udp = udp_frame(CLIENT, 40000, VIP, 8080, b"x");
    assert_eq!(h.run(&udp), (XDP_PASS, udp.clone()));
    // An exact-port VIP on the same address wins over the port-0 one.
    let exact = h.vip("203.0.113.10:443/tcp", HashMode::FiveTuple);
    h.backend(&exact, "198.51.100.30", 1);
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 443, SYN)).to_string(), "198.51.100.30");
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 444, SYN)).to_string(), "198.51.100.20");
}

#[test]
fn source_affinity_sends_all_flows_of_a_client_to_one_backend() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::SourceIp);
    for i in 1..=8 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
    }
    let mut seen_for_clients = std::collections::HashSet::new();
    for client in 1..=20 {
        let src = format!("192.0.2.{client}");
        let first = h.forward(&tcp_frame(&src, 1000, VIP, 80, SYN));
        for port in 1001..1020 {
            assert_eq!(h.forward(&tcp_frame(&src, port, VIP, 80, SYN)), first, "client {src} port {port}");
        }
        seen_for_clients.insert(first);
    }
    assert!(seen_for_clients.len() > 1, "20 clients all landed on one backend");
}

#[test]
fn packets_not_for_a_vip_pass_untouched() {
    let mut h = one_backend_v4();
    let mut arp = eth([0xff; 6], ROUTER_MAC, ETH_P_ARP);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);
    // ICMP timestamp request (type 13) to the VIP; echo to a non-VIP address.
    let icmp_to_vip = frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 1, &[13, 0, 0, 0, 0, 1, 0, 1]);
    let echo_elsewhere = echo_request_v4(CLIENT, "203.0.113.11");
    let cases = [
        arp,
        tcp_frame(CLIENT, 40000, "203.0.113.11", 80, SYN), // other address
        tcp_frame(CLIENT, 40000, VIP, 81, SYN),            // other port
        udp_frame(CLIENT, 40000, VIP, 80, b"x"),           // other protocol
        icmp_to_vip,                                       // ICMP, not an echo request
        echo_elsewhere,                                    // echo request, not a VIP address
        tcp_frame(CLIENT6, 40000, VIP6, 80, SYN),          // IPv6, no such VIP
    ];
    for (i, input) in cases.iter().enumerate() {
        assert_eq!(h.run(input), (XDP_PASS, input.clone()), "case {i}");
    }
    assert_eq!(h.stat(stat::NOT_FOR_US), cases.len() as u64);
    assert_eq!(h.stat(stat::FORWARDED), 0);
}

#[test]
fn truncated_headers_at_every_layer_pass_as_malformed() {
    let mut h = one_backend_v4();
    let good4 = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let good6 = {
        let mut h6 = Harness::new();
        let v = h6.vip("[2001:db8::10]:80/tcp", HashMode::FiveTuple);
        h6.backend(&v, "2001:db8:1::20", 1);
        let f = tcp_frame(CLIENT6, 40000, VIP6, 80, SYN);
        assert_eq!(h6.run(&f).0, XDP_TX, "the untruncated IPv6 frame is forwarded");
        f
    };
    assert_eq!(h.run(&good4).0, XDP_TX, "the untruncated IPv4 frame is forwarded");
    let udp4 = udp_frame(CLIENT, 40000, VIP, 80, b"");
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("IPv4 header cut".into(), good4[..14 + 19].to_vec()),
        ("TCP header cut".into(), good4[..14 + 20 + 19].to_vec()),
        ("only Ethernet, says IPv4".into(), good4[..14].to_vec()),
        ("IPv6 header cut".into(), good6[..14 + 39].to_vec()),
        ("TCP after IPv6 cut".into(), good6[..14 + 40 + 10].to_vec()),
        ("UDP header cut".into(), udp4[..14 + 20 + 4].to_vec()),
    ];
    // Lengths in the IP headers that lie.
    let mut ihl4 = good4.clone();
    ihl4[14] = 0x44; // IHL 4 < 5 (RFC 791)
    cases.push(("IHL below 5".into(), ihl4));
    let mut ihl15 = good4.clone();
    ihl15[14] = 0x4f; // 60-byte header, longer than total length 40
    cases.push(("IHL beyond total length".into(), ihl15));
    let mut long4 = good4.clone();
    long4[16..18].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("IPv4 total length beyond frame".into(), long4));
    let mut version = good4.clone();
    version[14] = 0x65;
    cases.push(("IPv4 ethertype, version 6".into(), version));
    let mut long6 = good6.clone();
    long6[18..20].copy_from_slice(&500u16.to_be_bytes());
    cases.push(("IPv6 payload length beyond frame".into(), long6));
    let mut short_tcp = good4.clone();
    short_tcp[16..18].copy_from_slice(&30u16.to_be_bytes()); // 10 bytes of TCP by the IP header
    cases.push(("IPv4 length leaves TCP short".into(), short_tcp));
    for (name, input) in &cases {
        assert_eq!(h.run(input), (XDP_PASS, input.clone()), "{name}");
    }
    assert_eq!(h.stat(stat::MALFORMED), cases.len() as u64);
    assert_eq!(h.stat(stat::FORWARDED), 1);
}

#[test]
fn ipv4_options_are_skipped_and_carried_unchanged() {
    let mut h = one_backend_v4();
    let tcp_bytes = tcp(40000, 80, SYN);
    let mut input = eth(LB_MAC, ROUTER_MAC, ETH_P_IP);
    // IHL 6: four NOP options (RFC 791 option type 1).
    input.extend(ipv4(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 6, &[1, 1, 1, 1], 20));
    input.extend(&tcp_bytes);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[16..18], &[0, 64], "outer total = 20 + 24 + 20");
    assert_inner_untouched(&input, &out, 20);
    // The ports were read after the options: a wrong port would not match.
    let mut wrong_port = input.clone();
    wrong_port[14 + 24 + 2..14 + 24 + 4].copy_from_slice(&81u16.to_be_bytes());
    assert_eq!(h.run(&wrong_port).0, XDP_PASS);
}

/// One IPv4 fragment (RFC 791): `offset` in 8-byte units, `more` = MF.
fn fragment4(src: &str, id: u16, offset: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(LB_MAC, ROUTER_MAC, ETH_P_IP);
    let mut ip = ipv4(src.parse().unwrap(), VIP.parse().unwrap(), 17, &[], payload.len());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&((offset & 0x1fff) | if more { 0x2000 } else { 0 }).to_be_bytes());
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend_from_slice(payload);
    f
}

/// One IPv6 fragment (RFC 8200 4.5) of a UDP datagram.
fn fragment6(src: &str, id: u32, offset: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(LB_MAC, ROUTER_MAC, ETH_P_IPV6);
    f.extend(ipv6(src.parse().unwrap(), VIP6.parse().unwrap(), 44, 8 + payload.len()));
    f.extend_from_slice(&[17, 0]);
    f.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn all_fragments_of_a_datagram_reach_one_backend_and_others_pass() {
    let mut h = Harness::new();
    let v4 = h.vip("203.0.113.10:53/udp", HashMode::FiveTuple);
    let v6 = h.vip("[2001:db8::10]:53/udp", HashMode::FiveTuple);
    for i in 1..=5 {
        h.backend(&v4, &format!("198.51.100.{i}"), 1);
        h.backend(&v6, &format!("2001:db8:1::{i}"), 1);
    }
    let mut seen = std::collections::HashSet::new();
    for n in 0..20u16 {
        let src = format!("192.0.2.{}", 10 + n);
        // A UDP datagram in three pieces (1400 + 400 + 136 bytes, so that
        // each fits the 1500 MTU once encapsulated); the later ones carry
        // payload bytes where the first has ports.
        let first = [udp(5353 + n, 53, &[]).as_slice(), &[0xaa; 1392]].concat();
        let middle = vec![n as u8; 400];
        let last = vec![0x55; 136];
        let backends: Vec<_> = [
            fragment4(&src, 0x1000 + n, 0, true, &first),
            fragment4(&src, 0x1000 + n, 175, true, &middle),
            fragment4(&src, 0x1000 + n, 225, false, &last),
        ]
        .iter()
        .map(|f| h.forward(f))
        .collect();
        assert!(backends.iter().all(|b| *b == backends[0]), "datagram {n}: {backends:?}");
        seen.insert(backends[0]);
        let src6 = format!("2001:db8:c::{:x}", 10 + n);
        let first6 = [udp(5353 + n, 53, &[]).as_slice(), &[0xaa; 1000]].concat();
        let b6: Vec<_> =
            [fragment6(&src6, 7 + n as u32, 0, true, &first6), fragment6(&src6, 7 + n as u32, 126, false, &[1; 64])]
                .iter()
                .map(|f| h.forward(f))
                .collect();
        assert_eq!(b6[0], b6[1], "IPv6 datagram {n}");
    }
    assert!(seen.len() > 1, "datagrams from 20 sources spread over the backends");
    assert_eq!(h.stat(stat::FRAGMENT_FORWARDED), 20 * 5);
    // Not a VIP address, or not TCP/UDP: passed and counted.
    let mut elsewhere = fragment4("192.0.2.10", 1, 0, true, &[0; 16]);
    elsewhere[30..34].copy_from_slice(&[203, 0, 113, 99]);
    elsewhere[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&elsewhere[14..34]);
    elsewhere[24..26].copy_from_slice(&c.to_be_bytes());
    let mut icmp_fragment = frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 1, &[8, 0, 0, 0, 0, 1, 0, 1]);
    icmp_fragment[20] = 0x20; // MF
    for input in [&elsewhere, &icmp_fragment] {
        assert_eq!(h.run(input), (XDP_PASS, input.clone()));
    }
    assert_eq!(h.stat(stat::FRAGMENT), 2);
    // Fragments follow the lowest-port VIP of the address and protocol.
    let low = h.vip("203.0.113.10:7/udp", HashMode::FiveTuple);
    h.backend(&low, "198.51.100.77", 1);
    assert_eq!(h.forward(&fragment4("192.0.2.10", 9, 100, false, &[0; 8])).to_string(), "198.51.100.77");
    h.services.remove_vip(&mut h.dp, &low).unwrap();
    assert_ne!(h.forward(&fragment4("192.0.2.10", 9, 100, false, &[0; 8])).to_string(), "198.51.100.77");
}

#[test]
fn too_big_once_encapsulated_is_answered_with_icmp_or_passed() {
    let mut h = one_backend_v4();
    // 1480 bytes of IP fit a 1500 MTU with 20 bytes of outer header.
    let payload = vec![0u8; 1480 - 40];
    let fits = frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 6, &[tcp(40000, 80, ACK), payload].concat());
    assert_eq!(h.run(&fits).0, XDP_TX);
    // 1481 with DF (the builder sets it): RFC 1191 "fragmentation needed".
    let payload = vec![0u8; 1481 - 40];
    let big = frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 6, &[tcp(40000, 80, ACK), payload].concat());
    let (action, out) = h.run(&big);
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected_head: [u8; 42] = [
        // Back to the router, from the LB.
        0x02, 0, 0, 0, 0, 0x03,  0x02, 0, 0, 0, 0, 0x01,  0x08, 0x00,
        // IPv4: total 56 = 20 + 8 + 28, ID 0, no flags, TTL 64, ICMP,
        // checksum 0x7c83 (by hand), from the VIP to the client.
        0x45, 0x00, 0x00, 0x38,  0x00, 0x00, 0x00, 0x00,
        0x40, 0x01, 0x7c, 0x83,  203, 0, 113, 10,  192, 0, 2, 55,
        // Type 3 code 4, checksum (checked below), next-hop MTU 1480.
        0x03, 0x04, 0x00, 0x00,  0x00, 0x00, 0x05, 0xc8,
    ];
    let mut head = out[..42].to_vec();
    head[36] = 0;
    head[37] = 0;
    assert_eq!(head, expected_head.to_vec());
    assert_eq!(&out[42..70], &big[14..42], "quotes the IP header and 8 bytes");
    assert_eq!(out.len(), 70);
    assert_eq!(checksum(&out[34..70]), 0, "ICMP checksum verifies");
    // Without DF the kernel may fragment it: passed.
    let mut no_df = big.clone();
    no_df[20] = 0;
    no_df[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&no_df[14..34]);
    no_df[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(h.run(&no_df), (XDP_PASS, no_df.clone()));

    // IPv6 (RFC 4443 packet too big), MTU 1500 - 40.
    let v6 = h.vip("[2001:db8::10]:80/tcp", HashMode::FiveTuple);
    h.backend(&v6, "2001:db8:1::20", 1);
    let payload = vec![0u8; 1461 - 60];
    let big6 = frame(CLIENT6.parse().unwrap(), VIP6.parse().unwrap(), 6, &[tcp(40000, 80, ACK), payload].concat());
    let (action, out) = h.run(&big6);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(&out[18..22], &[0, 56, 58, 64], "payload 8 + 48, ICMPv6, hop limit 64");
    assert_eq!(&out[22..38], &VIP6.parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(&out[38..54], &CLIENT6.parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(&out[54..56], &[2, 0]);
    assert_eq!(&out[58..62], &1460u32.to_be_bytes(), "MTU");
    assert_eq!(&out[62..110], &big6[14..62], "quotes the IPv6 header and 8 bytes");
    let (vip6, client6) = (VIP6.parse().unwrap(), CLIENT6.parse().unwrap());
    assert_eq!(icmpv6_checksum(&vip6, &client6, &out[54..110]), 0, "checksum verifies");
    assert_eq!(h.stat(stat::TOO_BIG), 3);
    assert_eq!(h.stat(stat::TOO_BIG_ANSWERED), 2);
}

#[test]
fn vip_without_backends_drops() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    let input = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    assert_eq!(h.run(&input).0, XDP_DROP);
    // A backend of weight 0 takes no new flows either.
    h.backend(&vip, "198.51.100.20", 0);
    assert_eq!(h.run(&input).0, XDP_DROP);
    assert_eq!(h.stat(stat::NO_BACKEND), 2);
}

/// Finds a client port whose new flow lands on `backend`.
fn port_to(h: &mut Harness, backend: &str) -> u16 {
    (1024..u16::MAX)
        .find(|&p| h.forward(&tcp_frame(CLIENT, p, VIP, 80, SYN)).to_string() == backend)
        .expect("some port maps to the backend")
}

#[test]
fn drained_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    for i in 1..=3 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
    }
    let port = port_to(&mut h, "198.51.100.1");
    h.services.drain_backend(&mut h.dp, &vip, "198.51.100.1".parse().unwrap()).unwrap();
    assert_eq!(h.forward(&tcp_frame(CLIENT, port, VIP, 80, ACK)).to_string(), "198.51.100.1");
    for p in 20000..20300 {
        assert_ne!(h.forward(&tcp_frame(CLIENT, p, VIP, 80, SYN)).to_string(), "198.51.100.1");
    }
    // A new SYN on the drained flow's own tuple starts a new connection.
    assert_ne!(h.forward(&tcp_frame(CLIENT, port, VIP, 80, SYN)).to_string(), "198.51.100.1");
}

#[test]
fn removed_backend_flows_are_re_picked_and_stick_to_the_new_one() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    for i in 1..=3 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
    }
    let port = port_to(&mut h, "198.51.100.2");
    let misses = h.stat(stat::CONN_MISS);
    h.services.remove_backend(&mut h.dp, &vip, "198.51.100.2".parse().unwrap()).unwrap();
    let repicked = h.forward(&tcp_frame(CLIENT, port, VIP, 80, ACK));
    assert_ne!(repicked.to_string(), "198.51.100.2");
    assert_eq!(h.stat(stat::CONN_MISS), misses + 1, "the stale entry was a miss");
    assert_eq!(h.forward(&tcp_frame(CLIENT, port, VIP, 80, ACK)), repicked);
    assert_eq!(h.stat(stat::CONN_MISS), misses + 1, "the new entry is a hit");
}

#[test]
fn a_conn_entry_for_a_reused_backend_id_is_not_followed() {
    // Ids are reused (late, but eventually): a conn entry made for the id's
    // previous owner carries that owner's cookie and must not match.
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.1", 1);
    let other = h.vip("203.0.113.20:80/tcp", HashMode::FiveTuple);
    h.backend(&other, "198.51.100.7", 1);
    let other_backend = *h.services.vip(&other).unwrap().backends.values().next().unwrap();
    let flow_frame = tcp_frame(CLIENT, 40000, VIP, 80, ACK);
    let stale = lb_common::ConnValue {
        backend_id: other_backend.id,
        cookie: other_backend.cookie + 1000,
        vip_id: 1,
        flags: 0,
        _pad: 0,
        hash: 7,
    };
    h.dp.set_conn(&flow_of(&flow_frame), &stale).unwrap();
    assert_eq!(h.forward(&flow_frame).to_string(), "198.51.100.1");
    assert_eq!(h.stat(stat::CONN_HIT), 0);
    // With the right cookie the entry is followed, even to another VIP's
    // backend: the cookie is the only guard, so it must be exact.
    let live = lb_common::ConnValue {
        backend_id: other_backend.id,
        cookie: other_backend.cookie,
        vip_id: 1,
        flags: 0,
        _pad: 0,
        hash: 7,
    };
    h.dp.set_conn(&flow_of(&flow_frame), &live).unwrap();
    assert_eq!(h.forward(&flow_frame).to_string(), "198.51.100.7");
}

#[test]
fn ring_swaps_write_a_free_slot_and_the_alternate_rings_are_the_declared_history_and_the_previous_live_ring() {
    let mut h = Harness::new();
    assert!(h.dp.rings_mapped(), "rings are written by one copy into the mapped array");
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.1", 1);
    let key = vip.key();
    let first = h.dp.vip(&key).unwrap().unwrap();
    assert_eq!(first.alt_rings_len, 0, "the only generation is the live ring: it names nothing else");
    h.backend(&vip, "198.51.100.2", 1);
    let second = h.dp.vip(&key).unwrap().unwrap();
    assert_eq!(first.ring_size, 65537);
    assert_ne!(second.ring_offset, first.ring_offset, "another slot went live");
    // Rings start on whole ring-array words: 65537 slots take 65540.
    assert_eq!(second.ring_offset.abs_diff(first.ring_offset) % 65540, 0);
    assert_eq!(second.alt_rings_len, 1, "the older generation (also the previous live ring, read once)");
    assert_eq!(second.alt_rings[0], first.ring_offset);
    // The old slot still holds the old ring untouched (packets that read the
    // old VIP entry finish on a complete ring; GUE takes alternates from it).
    let old_slot = h.dp.ring_slot(first.ring_offset + 1234).unwrap();
    let old_id = h.services.vip(&vip).unwrap().backends[&"198.51.100.1".parse().unwrap()].id;
    assert_eq!(old_slot, old_id);
    let mut seen = std::collections::HashSet::new();
    for p in 30000..30100 {
        seen.insert(h.forward(&tcp_frame(CLIENT, p, VIP, 80, SYN)).to_string());
    }
    assert_eq!(seen.len(), 2, "new flows use both backends after the swap");
    // A health change swaps the live ring but records no generation.
    h.services.set_health(&mut h.dp, &vip, "198.51.100.2".parse().unwrap(), false).unwrap();
    h.commit();
    let down = h.dp.vip(&key).unwrap().unwrap();
    assert_eq!(down.ring_offset, first.ring_offset, "the ring of .1 alone is the oldest generation's: its slot");
    assert_eq!(down.alt_rings_len, 1);
    assert_eq!(down.alt_rings[0], second.ring_offset, "the declared ring, with .2: health is not declared state");
    h.services.set_health(&mut h.dp, &vip, "198.51.100.2".parse().unwrap(), true).unwrap();
    // Four more declared sets: the history holds the newest four, each in
    // a slot of its own, and the VIP's sixth slot stays free for the next write.
    for last in 3..=6 {
        h.backend(&vip, &format!("198.51.100.{last}"), 1);
    }
    let now = h.dp.vip(&key).unwrap().unwrap();
    assert_eq!(now.alt_rings_len, 3, "the three generations besides the live one");
    let mut offsets = now.alt_rings[..3].to_vec();
    offsets.push(now.ring_offset);
    offsets.sort();
    offsets.dedup();
    assert_eq!(offsets.len(), 4, "four generations, four slots");
    let history = h.services.vip(&vip).unwrap().history();
    let sizes: Vec<usize> = history.iter().map(|g| g.members.len()).collect();
    assert_eq!(sizes, [6, 5, 4, 3], "newest first, the oldest two dropped");
    // A flap of .5: the ring without it (in no generation) stays readable
    // after .5 returns, as the previous live ring, in a fifth slot.
    let five = "198.51.100.5".parse().unwrap();
    h.services.set_health(&mut h.dp, &vip, five, false).unwrap();
    let without = h.dp.vip(&key).unwrap().unwrap().ring_offset;
    assert!(!offsets.contains(&without), "a ring of its own");
    h.services.set_health(&mut h.dp, &vip, five, true).unwrap();
    let back = h.dp.vip(&key).unwrap().unwrap();
    assert_eq!(back.ring_offset, now.ring_offset, "the declared ring is live again, in its slot");
    assert_eq!(back.alt_rings_len, 4);
    assert_eq!(back.alt_rings[..4], [now.alt_rings[0], now.alt_rings[1], now.alt_rings[2], without]);
}

#[test]
fn syn_re_picks_while_established_packets_keep_their_backend() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.1", 1);
    h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, SYN));
    h.services.set_weight(&mut h.dp, &vip, "198.51.100.1".parse().unwrap(), 0).unwrap();
    h.backend(&vip, "198.51.100.2", 1);
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, ACK)).to_string(), "198.51.100.1");
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, SYN)).to_string(), "198.51.100.2");
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, ACK)).to_string(), "198.51.100.2");
}

#[test]
fn counters_account_for_every_packet() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.1", 1);
    let syn = tcp_frame(CLIENT, 40000, VIP, 80, SYN); // 40 bytes of IP
    let data =
        frame(CLIENT.parse().unwrap(), VIP.parse().unwrap(), 6, &[tcp(40000, 80, ACK | PSH), vec![7; 100]].concat());
    h.run(&syn);
    h.run(&data);
    h.run(&data);
    h.run(&tcp_frame(CLIENT, 40000, "203.0.113.99", 80, SYN));
    h.run(&syn[..30]);
    let g = h.dp.global_stats().unwrap();
    assert_eq!(g[stat::FORWARDED], 3);
    assert_eq!(g[stat::NOT_FOR_US], 1);
    assert_eq!(g[stat::MALFORMED], 1);
    assert_eq!(g[stat::CONN_MISS], 1);
    assert_eq!(g[stat::CONN_HIT], 2);
    assert_eq!(g[..stat::OUTCOMES].iter().sum::<u64>(), 5, "one outcome per packet");
    let v = h.dp.vip_stats(h.services.vip(&vip).unwrap().id).unwrap();
    assert_eq!((v.packets, v.bytes, v.new_flows), (3, 40 + 140 + 140, 1));
    let id = h.services.vip(&vip).unwrap().backends.values().next().unwrap().id;
    let b = h.dp.backend_stats(id).unwrap();
    assert_eq!((b.packets, b.bytes), (3, 320));
}

#[test]
fn a_syn_again_for_a_flow_the_table_sent_to_a_backend_counts_for_that_backend() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.1", 1);
    h.backend(&vip, "198.51.100.2", 1);
    let repeats = |h: &mut Harness| -> Vec<u64> {
        let ids: Vec<u32> = h.services.vip(&vip).unwrap().backends.values().map(|b| b.id).collect();
        ids.iter().map(|id| h.dp.backend_stats(*id).unwrap().syn_repeats).collect()
    };
    let syn = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let owner = h.forward(&syn);
    assert_eq!(repeats(&mut h), [0, 0], "a first SYN");
    h.forward(&tcp_frame(CLIENT, 40001, VIP, 80, SYN));
    assert_eq!(repeats(&mut h), [0, 0], "another flow's SYN");
    assert_eq!(h.forward(&syn), owner);
    assert_eq!(h.forward(&syn), owner);
    let on = if owner.to_string() == "198.51.100.1" { [2, 0] } else { [0, 2] };
    assert_eq!(repeats(&mut h), on, "two retransmissions, counted for the backend that got them");
    // The handshake completes, then the client opens a new connection from
    // the same port (a quick reuse): a new SYN, no retransmission.
    h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, ACK));
    h.forward(&syn);
    assert_eq!(repeats(&mut h), on, "a SYN after the flow's ACK opens a new connection");
    // That new connection's own SYN, again: a retransmission.
    assert_eq!(h.forward(&syn), owner);
    let on = if owner.to_string() == "198.51.100.1" { [3, 0] } else { [0, 3] };
    assert_eq!(repeats(&mut h), on, "the new connection's SYN again");
    // The owner removed: the SYN goes elsewhere, which is no repeat there.
    h.services.remove_backend(&mut h.dp, &vip, owner).unwrap();
    h.commit();
    let other = h.forward(&syn);
    assert_ne!(other, owner);
    let other_id = h.services.vip(&vip).unwrap().backends[&other].id;
    assert_eq!(h.dp.backend_stats(other_id).unwrap().syn_repeats, 0);
}

/// A harness whose ring array holds `rings` rings of size 65537.
fn harness_with_rings(rings: u32) -> Harness {
    Harness::with(lb_userspace::LoadOptions {
        conn_table_size: 65_536,
        ring_capacity: rings * lb_common::ring_stride(65_537),
        bench_restore: false,
        offload_flavor: false,
        pin_dir: None,
    })
}

fn vip_spec(vip: &str, encap: Encap) -> VipSpec {
    VipSpec {
        vip: vip.parse().unwrap(),
        hash: HashMode::FiveTuple,
        ring_size: 65537,
        encap,
        stateless: false,
        quic: None,
    }
}

#[test]
fn the_ring_space_a_change_set_needs_is_checked_before_anything_is_written() {
    // Eight rings: four VIPs' live and spare rings.
    let mut h = harness_with_rings(8);
    let first = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    let four: Vec<VipSpec> = (81..85).map(|port| vip_spec(&format!("203.0.113.10:{port}/tcp"), Encap::Ipip)).collect();
    let err = h.services.check_ring_space(&[], &four).unwrap_err().to_string();
    assert!(err.contains("takes 3 of the 4 VIPs") && err.contains("--ring-capacity"), "{err}");
    // With the first VIP removed in the same change set, they fit.
    h.services.check_ring_space(&[first], &four).unwrap();
    h.services.check_ring_space(&[], &four[..3]).unwrap();
}

#[test]
fn a_full_ring_array_gives_alternate_rings_to_a_new_vip_and_never_a_live_ring() {
    // Four rings: two VIPs' live and spare rings, or one VIP with history.
    let mut h = harness_with_rings(4);
    let gue = h.vip_spec(vip_spec("203.0.113.10:80/tcp", Encap::Gue));
    for last in 1..=5 {
        h.backend(&gue, &format!("198.51.100.{last}"), 1);
    }
    let key = gue.key();
    let before = h.dp.vip(&key).unwrap().unwrap();
    // All four rings: the live one and three alternates; the oldest
    // generation's ring was given up for the newest.
    assert_eq!(before.alt_rings_len, 3, "{before:?}");
    assert_eq!(h.services.vip(&gue).unwrap().history().len(), 4, "the declared history is kept whole");
    let flows: Vec<Vec<u8>> = (0..200).map(|i| tcp_frame(CLIENT, 20000 + i, VIP, 80, SYN)).collect();
    let picked: Vec<IpAddr> = flows.iter().map(|f| h.forward(f)).collect();

    // A second VIP needs two rings: the first gives its alternates back.
    let plain = h.vip_spec(vip_spec("203.0.113.10:81/tcp", Encap::Ipip));
    h.backend(&plain, "198.51.100.9", 1);
    let after = h.dp.vip(&key).unwrap().unwrap();
    assert_eq!((after.ring_offset, after.ring_size, after.alt_rings_len), (before.ring_offset, 65537, 0));
    let again: Vec<IpAddr> = flows.iter().map(|f| h.forward(f)).collect();
    assert_eq!(again, picked, "the live ring was not touched");
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 81, SYN)).to_string(), "198.51.100.9");

    // A third has no room: refused, and nothing else changed.
    let err = h.services.add_vip(&mut h.dp, vip_spec("203.0.113.10:82/tcp", Encap::Ipip)).unwrap_err();
    assert!(err.to_string().contains("no room for a ring"), "{err}");
    assert!(h.dp.vip(&vip_spec("203.0.113.10:82/tcp", Encap::Ipip).vip.key()).unwrap().is_none());
    // Ring swaps still work in both: each has its spare.
    h.backend(&gue, "198.51.100.6", 1);
    h.backend(&plain, "198.51.100.10", 1);
    let spread: std::collections::HashSet<IpAddr> =
        (0..300).map(|i| h.forward(&tcp_frame(CLIENT, 30000 + i, VIP, 81, SYN))).collect();
    assert_eq!(spread.len(), 2, "the second VIP's new ring is live");
    assert!(flows.iter().any(|f| h.forward(f).to_string() == "198.51.100.6"), "so is the first's");
}

#[test]
fn program_and_userspace_agree_on_10000_random_flows() {
    let mut h = Harness::new();
    let v4 = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    let v6 = h.vip("[2001:db8::10]:0/udp", HashMode::FiveTuple);
    let affinity = h.vip("203.0.113.20:443/tcp", HashMode::SourceIp);
    for i in 1..=7u32 {
        h.backend(&v4, &format!("198.51.100.{i}"), i);
        h.backend(&v6, &format!("2001:db8:1::{i}"), 1 + i % 3);
        h.backend(&affinity, &format!("198.51.100.{}", 100 + i), 1);
    }
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut per_backend = std::collections::HashMap::new();
    for n in 0..10_000 {
        let r = rng.next_u64();
        let port = (r >> 16) as u16;
        let frame = match n % 3 {
            0 => tcp_frame(&format!("192.0.2.{}", r as u8), port, VIP, 80, SYN),
            1 => udp_frame(&format!("2001:db8:c::{:x}", r as u16), port, VIP6, (r >> 32) as u16, b"x"),
            _ => tcp_frame(&format!("192.0.2.{}", r as u8), port, "203.0.113.20", 443, SYN),
        };
        let flow = flow_of(&frame);
        let expected = h.services.explain(&mut h.dp, &flow).unwrap().expect("a VIP flow");
        assert!(matches!(expected.via, Via::Ring { .. }), "a SYN or new flow uses the ring");
        let got = h.forward(&frame);
        assert_eq!(got, expected.backend, "flow {n}");
        *per_backend.entry(got).or_insert(0) += 1;
        // Now the conn table knows it, and says so.
        let again = h.services.explain(&mut h.dp, &flow).unwrap().unwrap();
        assert_eq!((again.backend, again.via), (got, Via::ConnTable));
    }
    assert_eq!(per_backend.len(), 21, "every backend got flows");
}

/// The conn-table key of a frame, read from its bytes by offsets.

#[test]
fn outer_source_is_the_prefix_plus_flow_hash_bits() {
    let mut h = Harness::new();
    let mut settings = test_settings();
    settings.encap_src_v4 = ("192.0.2.0".parse().unwrap(), 24);
    settings.encap_src_v6 = ("2001:db8:ffff::".parse().unwrap(), 64);
    h.services.set_settings(&mut h.dp, settings).unwrap();
    let v4 = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&v4, "198.51.100.20", 1);
    let v6 = h.vip("[2001:db8::10]:80/tcp", HashMode::FiveTuple);
    h.backend(&v6, "2001:db8:1::20", 1);
    let mut sources4 = std::collections::HashSet::new();
    let mut sources6 = std::collections::HashSet::new();
    for port in 1000..1100 {
        let (_, out) = h.run(&tcp_frame(CLIENT, port, VIP, 80, SYN));
        assert_eq!(&out[26..29], &[192, 0, 2], "inside 192.0.2.0/24");
        assert_eq!(checksum(&out[14..34]), 0, "checksum verifies with any source");
        sources4.insert(out[29]);
        let (_, again) = h.run(&tcp_frame(CLIENT, port, VIP, 80, ACK));
        assert_eq!(&again[26..30], &out[26..30], "stable for the flow");
        let (_, out6) = h.run(&tcp_frame(CLIENT6, port, VIP6, 80, SYN));
        assert_eq!(&out6[22..30], &[0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0], "inside 2001:db8:ffff::/64");
        assert_eq!(&out6[30..34], &[0, 0, 0, 0], "only the last 32 bits carry the hash");
        sources6.insert(out6[34..38].to_vec());
    }
    assert!(sources4.len() > 50, "100 flows used {} sources", sources4.len());
    assert!(sources6.len() > 90, "100 flows used {} sources", sources6.len());
}

#[test]
fn removing_a_vip_stops_its_established_flows_and_clears_the_filter_last() {
    let mut h = Harness::new();
    let web = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&web, "198.51.100.1", 1);
    let tls = h.vip("203.0.113.10:443/tcp", HashMode::FiveTuple);
    h.backend(&tls, "198.51.100.2", 1);
    h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, SYN));
    h.forward(&tcp_frame(CLIENT, 40000, VIP, 443, SYN));
    let slot = lb_common::vip_filter_slot(&lb_common::addr_words_v4([203, 0, 113, 10]));
    assert_eq!(h.dp.vip_filter(slot).unwrap(), 1);

    h.services.remove_vip(&mut h.dp, &web).unwrap();
    // Its flow's conn entry names a released backend: not followed.
    let ack = tcp_frame(CLIENT, 40000, VIP, 80, ACK);
    assert_eq!(h.run(&ack), (XDP_PASS, ack.clone()));
    // The other VIP on the address keeps the filter slot and its flows.
    assert_eq!(h.dp.vip_filter(slot).unwrap(), 1);
    assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 443, ACK)).to_string(), "198.51.100.2");

    h.services.remove_vip(&mut h.dp, &tls).unwrap();
    assert_eq!(h.dp.vip_filter(slot).unwrap(), 0, "no VIP left on the address");
    let hits = h.stat(stat::CONN_HIT);
    let tls_ack = tcp_frame(CLIENT, 40000, VIP, 443, ACK);
    assert_eq!(h.run(&tls_ack), (XDP_PASS, tls_ack.clone()));
    assert_eq!(h.stat(stat::CONN_HIT), hits, "filtered out before the conn table");
}

/// A flood of `n` new flows from distinct sources, then whether the flow
/// of `established` is still in the conn table.
fn flood_keeps(h: &mut Harness, established: &[u8], n: u32) -> bool {
    h.forward(established);
    for i in 0..n {
        let src = format!("10.{}.{}.{}", (i >> 16) as u8, (i >> 8) as u8, i as u8);
        h.run(&tcp_frame(&src, 1024 + (i % 50000) as u16, VIP, 80, SYN));
    }
    h.dp.conn(&flow_of(established)).unwrap().is_some()
}

#[test]
fn a_syn_flood_larger_than_the_conn_table_does_not_move_an_established_flow() {
    let opts = || lb_userspace::LoadOptions {
        conn_table_size: 4096,
        ring_capacity: 8 * 65537,
        bench_restore: false,
        offload_flavor: false,
        pin_dir: None,
    };
    let established = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let flood = 20_000;
    on_cpu(0, || {
        // Without the guard the flood evicts the flow (the contrast).
        let mut h = Harness::with(opts());
        let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
        h.backend(&vip, "198.51.100.1", 1);
        assert!(!flood_keeps(&mut h, &established, flood), "an unguarded flood evicts the flow");

        // With the guard: 100 new flows/s per CPU are remembered, the rest
        // are balanced but not remembered.
        let mut h = Harness::with(opts());
        let mut settings = test_settings();
        settings.new_flow_limit = 100;
        h.services.set_settings(&mut h.dp, settings).unwrap();
        let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
        h.backend(&vip, "198.51.100.1", 1);
        let started = std::time::Instant::now();
        assert!(flood_keeps(&mut h, &established, flood), "the guarded flood left the flow in place");
        let secs = started.elapsed().as_secs_f64();
        let untracked = h.stat(stat::CONN_UNTRACKED);
        let remembered = flood as u64 + 1 - untracked;
        println!("flood: {flood} SYNs in {secs:.2} s, {remembered} remembered, {untracked} balanced untracked");
        // At most the burst (one second's worth) plus the rate over the run.
        assert!(remembered as f64 <= 100.0 + 100.0 * secs + 1.0, "{remembered} remembered in {secs} s");
        assert_eq!(h.stat(stat::FORWARDED), flood as u64 + 1, "every flood packet was still balanced");
        // The flow stays on its backend when the ring changes.
        h.services.set_weight(&mut h.dp, &vip, "198.51.100.1".parse().unwrap(), 0).unwrap();
        h.backend(&vip, "198.51.100.2", 1);
        assert_eq!(h.forward(&tcp_frame(CLIENT, 40000, VIP, 80, ACK)).to_string(), "198.51.100.1");
    });
}

#[test]
fn echo_requests_to_a_vip_address_are_answered_in_place() {
    let mut h = one_backend_v4();
    let request = echo_request_v4(CLIENT, VIP);
    let (action, out) = h.run(&request);
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected: [u8; 42] = [
        // Back to the router, from the LB.
        0x02, 0, 0, 0, 0, 0x03,  0x02, 0, 0, 0, 0, 0x01,  0x08, 0x00,
        // IPv4: total 28, ID 0x1234, DF, TTL 64, ICMP, checksum 0x2a6b (by
        // hand; swapping the addresses keeps it), VIP -> client.
        0x45, 0x00, 0x00, 0x1c,  0x12, 0x34, 0x40, 0x00,
        0x40, 0x01, 0x2a, 0x6b,  203, 0, 113, 10,  192, 0, 2, 55,
        // Echo reply: type 0, checksum 0xfffd, id 1, seq 1.
        0x00, 0x00, 0xff, 0xfd,  0x00, 0x01, 0x00, 0x01,
    ];
    assert_eq!(out, expected.to_vec());
    assert_eq!(checksum(&out[14..34]), 0);
    assert_eq!(checksum(&out[34..]), 0);

    // IPv6 (RFC 4443): type 129, addresses swapped, hop limit 64, and the
    // checksum over the pseudo-header still verifies.
    let v6 = h.vip("[2001:db8::10]:443/tcp", HashMode::FiveTuple);
    h.backend(&v6, "2001:db8:1::20", 1);
    let (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (CLIENT6.parse().unwrap(), VIP6.parse().unwrap());
    let mut icmp6 = vec![128, 0, 0, 0, 0, 7, 0, 9, b'p', b'i', b'n', b'g'];
    let c = icmpv6_checksum(&src, &dst, &icmp6);
    icmp6[2..4].copy_from_slice(&c.to_be_bytes());
    let request6 = frame(src.into(), dst.into(), 58, &icmp6);
    let (action, out) = h.run(&request6);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[..12], &[ROUTER_MAC, LB_MAC].concat()[..]);
    assert_eq!(out[21], 64, "hop limit");
    assert_eq!(&out[22..38], &dst.octets(), "from the VIP");
    assert_eq!(&out[38..54], &src.octets(), "to the client");
    assert_eq!(out[54], 129);
    assert_eq!(&out[58..], &icmp6[4..], "id, sequence and data unchanged");
    assert_eq!(icmpv6_checksum(&dst, &src, &out[54..]), 0, "checksum verifies");
    assert_eq!(h.stat(stat::ECHO_REPLIED), 2);
    // Once the address has no VIP, echo requests go to the kernel.
    h.services.remove_vip(&mut h.dp, &"203.0.113.10:80/tcp".parse().unwrap()).unwrap();
    assert_eq!(h.run(&request), (XDP_PASS, request.clone()));
}

/// RFC 4443 2.3 / RFC 8200 8.1: checksum over the pseudo-header and message.
fn icmpv6_checksum(src: &std::net::Ipv6Addr, dst: &std::net::Ipv6Addr, msg: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(msg);
    checksum(&data)
}

#[test]
fn path_mtu_errors_about_a_vip_flow_reach_the_backend_that_owns_it() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    let vip6 = h.vip("[2001:db8::10]:80/tcp", HashMode::FiveTuple);
    for i in 1..=5 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
        h.backend(&vip6, &format!("2001:db8:1::{i}"), 1);
    }
    for port in 41000..41010u16 {
        let owner = h.forward(&tcp_frame(CLIENT, port, VIP, 80, SYN));
        // A router on the way back could not forward the backend's reply
        // (VIP:80 -> client): RFC 1191 "fragmentation needed", next-hop MTU
        // 1400, quoting the reply's IP header and first 8 bytes.
        let mut quoted = ipv4(VIP.parse().unwrap(), CLIENT.parse().unwrap(), 6, &[], 1460);
        quoted.extend_from_slice(&tcp(80, port, ACK)[..8]);
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        icmp.extend_from_slice(&quoted);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let error = frame("198.51.100.254".parse().unwrap(), VIP.parse().unwrap(), 1, &icmp);
        let (action, out) = h.run(&error);
        assert_eq!(action, XDP_TX);
        assert_eq!(outer_dst(&out), owner, "port {port}: the owner gets it");
        assert_eq!(&out[34..], &error[14..], "the ICMP packet goes whole");

        let owner6 = h.forward(&tcp_frame(CLIENT6, port, VIP6, 80, SYN));
        let mut quoted6 = ipv6(VIP6.parse().unwrap(), CLIENT6.parse().unwrap(), 6, 1440);
        quoted6.extend_from_slice(&tcp(80, port, ACK)[..8]);
        let mut ptb = vec![2, 0, 0, 0, 0, 0, 0x05, 0x78];
        ptb.extend_from_slice(&quoted6);
        let error6 = frame("2001:db8:a1::1".parse().unwrap(), VIP6.parse().unwrap(), 58, &ptb);
        assert_eq!(h.forward(&error6), owner6, "RFC 4443 packet too big, port {port}");
    }
    assert_eq!(h.stat(stat::ICMP_ERROR_FORWARDED), 20);
    // About a flow that is no VIP's (another source port on the VIP address,
    // a TCP port with no VIP): passed to the kernel.
    let mut quoted = ipv4(VIP.parse().unwrap(), CLIENT.parse().unwrap(), 6, &[], 1460);
    quoted.extend_from_slice(&tcp(81, 5000, ACK)[..8]);
    let stray = frame(
        "198.51.100.254".parse().unwrap(),
        VIP.parse().unwrap(),
        1,
        &[&[3u8, 4, 0, 0, 0, 0, 5, 0x78][..], &quoted].concat(),
    );
    assert_eq!(h.run(&stray), (XDP_PASS, stray.clone()));
}

#[test]
fn packets_during_ring_swaps_see_the_old_ring_or_the_new_one() {
    use aya::programs::{TestRun, TestRunOptions, Xdp};
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    for i in 1..=4 {
        h.backend(&vip, &format!("198.51.100.{i}"), 1);
    }
    let flows: Vec<Vec<u8>> = (0..64).map(|p| tcp_frame(CLIENT, 20000 + p, VIP, 80, SYN)).collect();
    // Two states one change apart: backend 4 removed, and added again
    // (a new id and cookie each time, the same address).
    let four = "198.51.100.4".parse::<std::net::IpAddr>().unwrap();
    let set_four = |h: &mut Harness, present: u32| {
        if present == 1 {
            h.services
                .add_backend(&mut h.dp, &vip, lb_userspace::BackendSpec { addr: four, weight: 1, server_id: None })
                .unwrap();
        } else {
            h.services.remove_backend(&mut h.dp, &vip, four).unwrap();
        }
    };
    set_four(&mut h, 0);
    let ring_a: Vec<_> = flows.iter().map(|f| h.forward(f)).collect();
    set_four(&mut h, 1);
    let ring_b: Vec<_> = flows.iter().map(|f| h.forward(f)).collect();
    assert_ne!(ring_a, ring_b, "the two rings differ for some of these flows");

    // A second handle on the same loaded program, for a reader thread.
    let pin = format!("/sys/fs/bpf/lb-swap-test-{}", std::process::id());
    h.dp.program().pin(&pin).unwrap();
    let reader = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface).unwrap();
    std::fs::remove_file(&pin).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let checked = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut n = 0u64;
            let mut out = vec![0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (k, f) in flows.iter().enumerate() {
                    let r = reader
                        .test_run(TestRunOptions {
                            data_in: Some(f),
                            data_out: Some(&mut out),
                            ..TestRunOptions::default()
                        })
                        .unwrap();
                    assert_eq!(r.return_value, XDP_TX, "flow {k} was not forwarded");
                    let got = outer_dst(&out[..r.data_size_out as usize]);
                    assert!(got == ring_a[k] || got == ring_b[k], "flow {k} went to {got}: neither ring's choice");
                    n += 1;
                }
            }
            n
        });
        // Swap back and forth while the reader runs: each swap rewrites a
        // whole ring half (65537 slots), flips the VIP entry, and (on
        // removal) only then clears the backend's entry.
        for round in 0..80 {
            set_four(&mut h, round % 2);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        worker.join().unwrap()
    });
    println!("{checked} packets during 80 ring swaps, each forwarded by the old ring or the new one");
    assert!(checked > 0);
}

#[test]
fn vips_that_share_an_array_slot_are_both_served_and_removals_keep_the_other() {
    let mut h = Harness::new();
    // Two VIP keys in one VIP_SLOTS slot: the first owns it, the second is
    // found through the hash map.
    let key_of = |port: u16| format!("203.0.113.10:{port}/tcp").parse::<lb_userspace::services::VipAddr>().unwrap();
    let first = key_of(80);
    let slot = lb_common::vip_slot(&first.key());
    let port = (81..u16::MAX).find(|p| lb_common::vip_slot(&key_of(*p).key()) == slot).expect("a colliding port");
    let a = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    let b = h.vip(&format!("203.0.113.10:{port}/tcp"), HashMode::FiveTuple);
    h.backend(&a, "198.51.100.1", 1);
    h.backend(&b, "198.51.100.2", 1);
    let to = |h: &mut Harness, p: u16| h.forward(&tcp_frame(CLIENT, 40000, VIP, p, SYN)).to_string();
    assert_eq!(to(&mut h, 80), "198.51.100.1");
    assert_eq!(to(&mut h, port), "198.51.100.2");
    // Ring swaps reach packets through both paths (the owner's entry flips
    // halves): new flows use each VIP's new backend too.
    h.backend(&a, "198.51.100.3", 1);
    h.backend(&b, "198.51.100.4", 1);
    let spread = |h: &mut Harness, p: u16| -> std::collections::BTreeSet<String> {
        (30000..30100).map(|src| h.forward(&tcp_frame(CLIENT, src, VIP, p, SYN)).to_string()).collect()
    };
    assert_eq!(spread(&mut h, 80), ["198.51.100.1", "198.51.100.3"].map(String::from).into());
    assert_eq!(spread(&mut h, port), ["198.51.100.2", "198.51.100.4"].map(String::from).into());
    // Removing the owner leaves the other served, and the port unserved.
    h.services.remove_vip(&mut h.dp, &a).unwrap();
    assert_eq!(h.run(&tcp_frame(CLIENT, 40000, VIP, 80, SYN)).0, XDP_PASS);
    assert_eq!(spread(&mut h, port), ["198.51.100.2", "198.51.100.4"].map(String::from).into());
    // The other takes the slot at its next change, and stays right.
    h.services.remove_backend(&mut h.dp, &b, "198.51.100.4".parse().unwrap()).unwrap();
    assert_eq!(spread(&mut h, port), ["198.51.100.2"].map(String::from).into());
    h.services.remove_vip(&mut h.dp, &b).unwrap();
    assert_eq!(h.run(&tcp_frame(CLIENT, 40000, VIP, port, SYN)).0, XDP_PASS);
}

#[test]
fn a_change_set_that_defers_its_rings_builds_each_once_and_forwards_as_one_built_change_by_change() {
    // The same changes on two balancers: one change by change (each a ring
    // build), one deferred to the end of the change set, as `apply` does.
    let changes = |h: &mut Harness| {
        let vips: Vec<_> =
            (0..2).map(|k| h.vip(&format!("203.0.113.10:{}/tcp", 80 + k), HashMode::FiveTuple)).collect();
        for vip in &vips {
            for j in 1..=8 {
                let spec = BackendSpec { addr: format!("198.51.100.{j}").parse().unwrap(), weight: 1, server_id: None };
                h.services.add_backend(&mut h.dp, vip, spec).unwrap();
            }
            h.services.remove_backend(&mut h.dp, vip, "198.51.100.3".parse().unwrap()).unwrap();
            h.services.set_weight(&mut h.dp, vip, "198.51.100.5".parse().unwrap(), 4).unwrap();
        }
        vips
    };
    let mut one_by_one = Harness::new();
    let vips = changes(&mut one_by_one);
    one_by_one.commit();
    let mut deferred = Harness::new();
    deferred.services.defer_rings();
    changes(&mut deferred);
    // Nothing is live before the end of the change set: no ring yet.
    let (action, _) = deferred.run(&tcp_frame(CLIENT, 40000, VIP, 80, SYN));
    assert_eq!(action, XDP_DROP, "no ring before the change set ends");
    deferred.services.build_deferred_rings(&mut deferred.dp).unwrap();
    deferred.commit();
    assert_eq!(deferred.services.ring_swaps, 2, "one ring per VIP");
    assert!(one_by_one.services.ring_swaps >= 2 * 10, "a ring per change: {}", one_by_one.services.ring_swaps);
    for vip in &vips {
        let fingerprint = |h: &Harness| h.services.vip(vip).unwrap().fingerprint;
        assert_eq!(fingerprint(&deferred), fingerprint(&one_by_one), "{vip}: the same ring");
        assert_ne!(fingerprint(&deferred), 0);
    }
    // And the same backend for every flow of both VIPs.
    for port in 40000..40200 {
        for vip_port in [80, 81] {
            let syn = tcp_frame(CLIENT, port, VIP, vip_port, SYN);
            assert_eq!(deferred.forward(&syn), one_by_one.forward(&syn));
        }
    }
}
