//! GUE encapsulation and the alternate hop, through the real balancer
//! (BPF_PROG_TEST_RUN). Outer headers are written out by hand from
//! draft-ietf-intarea-gue (variant 0), RFC 768 and RFC 791 / RFC 8200; the
//! private-data layout is this project's (README, "GUE and the second chance").

use lb_common::{flow_hash, stat};
use lb_tests::*;
use lb_userspace::{
    services::{Encap, VipSpec},
    HashMode,
};

const CLIENT: &str = "192.0.2.10";
const VIP: &str = "203.0.113.10";

fn gue_vip(h: &mut Harness, vip: &str, stateless: bool) -> lb_userspace::services::VipAddr {
    h.vip_spec(VipSpec {
        vip: vip.parse().unwrap(),
        hash: HashMode::FiveTuple,
        ring_size: 65537,
        encap: Encap::Gue,
        stateless,
    })
}

fn hash_of(frame: &[u8]) -> u32 {
    let f = flow_of(frame);
    flow_hash(&f.src, &f.dst, f.src_port, f.dst_port, f.proto)
}

/// UDP source port of a GUE packet: 0xc000 | 14 bits of the flow hash.
fn gue_source_port(frame: &[u8]) -> [u8; 2] {
    (0xc000u16 | (hash_of(frame) & 0x3fff) as u16).to_be_bytes()
}

/// A client source port whose flow the live ring gives to `backend`.
fn port_to(h: &mut Harness, backend: &str, flags: u8) -> u16 {
    (40000..41000).find(|p| h.forward(&tcp_frame(CLIENT, *p, VIP, 80, flags)).to_string() == backend).unwrap()
}

#[test]
fn gue_over_ipv4_golden_bytes_without_an_alternate() {
    let mut h = Harness::new();
    let vip = gue_vip(&mut h, "203.0.113.10:80/tcp", false);
    h.backend(&vip, "198.51.100.2", 1);
    let input = tcp_frame(CLIENT, 40000, VIP, 80, SYN);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    let mut want = eth(NEXT_HOP_MAC, LB_MAC, ETH_P_IP);
    // IPv4: length 20 + 8 + 4 + 40, DF, TTL 64, UDP, checksum by RFC 1071.
    want.extend_from_slice(&[0x45, 0x00, 0x00, 0x48, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x4e, 0x6e]);
    want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2]);
    // UDP: source from the hash, destination 6080, length 8 + 4 + 40, no checksum.
    want.extend_from_slice(&gue_source_port(&input));
    want.extend_from_slice(&[0x17, 0xc0, 0x00, 0x34, 0x00, 0x00]);
    // GUE: version 0, C 0, Hlen 0; proto 4 (IPv4 inside); flags 0.
    want.extend_from_slice(&[0x00, 0x04, 0x00, 0x00]);
    want.extend_from_slice(&input[14..]);
    assert_eq!(out, want);
}

#[test]
fn a_midstream_tcp_packet_names_the_previous_rings_backend() {
    let mut h = Harness::new();
    let vip = gue_vip(&mut h, "203.0.113.10:80/tcp", false);
    h.backend(&vip, "198.51.100.1", 1);
    // Every flow belonged to .1; now some move to .2.
    h.backend(&vip, "198.51.100.2", 1);
    let moved = port_to(&mut h, "198.51.100.2", ACK);
    let before = h.stat(stat::GUE_ALTERNATE);
    let input = tcp_frame(CLIENT, moved, VIP, 80, ACK);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(h.stat(stat::GUE_ALTERNATE), before + 1);
    let mut want = eth(NEXT_HOP_MAC, LB_MAC, ETH_P_IP);
    // 20 + 8 + 4 + 8 (the alternate) + 40.
    want.extend_from_slice(&[0x45, 0x00, 0x00, 0x50, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x4e, 0x66]);
    want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2]);
    want.extend_from_slice(&gue_source_port(&input));
    want.extend_from_slice(&[0x17, 0xc0, 0x00, 0x3c, 0x00, 0x00]);
    // Hlen 2 words of private data: kind 1, family 4, then 198.51.100.1.
    want.extend_from_slice(&[0x02, 0x04, 0x00, 0x00]);
    want.extend_from_slice(&[0x01, 0x04, 0x00, 0x00, 198, 51, 100, 1]);
    want.extend_from_slice(&input[14..]);
    assert_eq!(out, want);
    // A midstream packet is not remembered (its owner may be the alternate);
    // a SYN of a new connection is, and carries no alternate.
    assert_eq!(h.dp.conn(&flow_of(&input)).unwrap(), None);
    let syn = tcp_frame(CLIENT, moved, VIP, 80, SYN);
    let (_, out) = h.run(&syn);
    assert_eq!(&out[42..46], &[0x00, 0x04, 0x00, 0x00], "a SYN has no alternate");
    assert!(h.dp.conn(&flow_of(&syn)).unwrap().is_some(), "a SYN is remembered");
    // A flow that stayed on .1 has nothing to name.
    let stayed = port_to(&mut h, "198.51.100.1", ACK);
    let (_, out) = h.run(&tcp_frame(CLIENT, stayed, VIP, 80, ACK));
    assert_eq!(out[42], 0x00, "no alternate when both rings agree");
    // UDP never carries one.
    let udp_vip = gue_vip(&mut h, "203.0.113.10:53/udp", false);
    h.backend(&udp_vip, "198.51.100.1", 1);
    h.backend(&udp_vip, "198.51.100.2", 1);
    for p in 40000..40050 {
        let (_, out) = h.run(&udp_frame(CLIENT, p, VIP, 53, b"q"));
        assert_eq!(&out[42..44], &[0x00, 0x04], "UDP: Hlen 0");
    }
}

#[test]
fn gue_over_ipv6_with_an_alternate_and_a_stateless_vip_leaves_the_conn_table_alone() {
    let mut h = Harness::new();
    let client = "2001:db8:c::10";
    let vip6 = "2001:db8:f::10";
    let vip = gue_vip(&mut h, "[2001:db8:f::10]:80/tcp", true);
    h.backend(&vip, "2001:db8:b1::2", 1);
    h.backend(&vip, "2001:db8:b2::2", 1);
    let (entries_before, _) = h.dp.conn_count().unwrap();
    let port = (40000..41000)
        .find(|p| h.forward(&tcp_frame(client, *p, vip6, 80, ACK)).to_string() == "2001:db8:b2::2")
        .unwrap();
    let input = tcp_frame(client, port, vip6, 80, ACK);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    let hash = hash_of(&input);
    let mut want = eth(NEXT_HOP_MAC, LB_MAC, ETH_P_IPV6);
    // IPv6: version 6, class 0, flow label = 20 bits of the hash; payload
    // 8 + 4 + 20 + 60; next header UDP; hop limit 64.
    want.extend_from_slice(&(0x6000_0000u32 | (hash & 0xf_ffff)).to_be_bytes());
    want.extend_from_slice(&[0x00, 0x5c, 0x11, 0x40]);
    want.extend_from_slice(&"2001:db8:ffff::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    want.extend_from_slice(&"2001:db8:b2::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    // UDP checksum 0 (RFC 6935 / 6936: the inner packet carries its own).
    want.extend_from_slice(&gue_source_port(&input));
    want.extend_from_slice(&[0x17, 0xc0, 0x00, 0x5c, 0x00, 0x00]);
    // Hlen 5 words; proto 41 (IPv6 inside); kind 1, family 6, the alternate.
    want.extend_from_slice(&[0x05, 0x29, 0x00, 0x00]);
    want.extend_from_slice(&[0x01, 0x06, 0x00, 0x00]);
    want.extend_from_slice(&"2001:db8:b1::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    want.extend_from_slice(&input[14..]);
    assert_eq!(out, want);
    // Stateless: SYNs and everything else leave the conn table as it was.
    for p in 41000..41200 {
        h.forward(&tcp_frame(client, p, vip6, 80, SYN));
        h.forward(&tcp_frame(client, p, vip6, 80, ACK));
    }
    assert_eq!(h.dp.conn_count().unwrap().0, entries_before);
    assert_eq!(h.dp.conn(&flow_of(&input)).unwrap(), None);
}

#[test]
fn the_alternate_is_present_exactly_when_the_previous_ring_names_another_backend() {
    let mut h = Harness::new();
    let vip = gue_vip(&mut h, "203.0.113.10:80/tcp", true);
    h.backend(&vip, "198.51.100.1", 1);
    h.backend(&vip, "198.51.100.2", 1);
    // The (.1, .2) ring becomes the previous one; .3 takes a third of the flows.
    h.backend(&vip, "198.51.100.3", 1);
    let ids: std::collections::HashMap<u32, [u8; 4]> = h
        .services
        .vip(&vip)
        .unwrap()
        .backends
        .iter()
        .map(|(a, b)| (b.id, if let std::net::IpAddr::V4(a) = a { a.octets() } else { unreachable!() }))
        .collect();
    // Counts the flows that carried an alternate, checking each flow: one
    // exactly when the rings differ, naming the previous ring's backend.
    let check = |h: &mut Harness, seed: u64| -> (u32, u32) {
        let meta = h.dp.vip(&vip.key()).unwrap().unwrap();
        let (mut with, mut from_1) = (0, 0);
        let mut rng = XorShift(seed);
        for _ in 0..3000 {
            let port = 1024 + (rng.next_u64() % 60000) as u16;
            let input = tcp_frame(CLIENT, port, VIP, 80, ACK | PSH);
            let slot = lb_common::ring_slot(hash_of(&input), meta.ring_size);
            let now = h.dp.ring_slot(meta.ring_offset + slot).unwrap();
            let before = h.dp.ring_slot(meta.prev_ring_offset + slot).unwrap();
            let (_, out) = h.run(&input);
            if now == before {
                assert_eq!(out[42], 0x00, "port {port}: same owner in both rings");
            } else {
                assert_eq!(out[42], 0x02, "port {port}: the rings differ");
                assert_eq!(&out[50..54], &ids[&before], "port {port}: the previous owner is named");
                with += 1;
                from_1 += (ids[&before] == [198, 51, 100, 1]) as u32;
            }
        }
        (with, from_1)
    };
    let (with, _) = check(&mut h, 0x5eed);
    println!("after an add: {with} of 3000 flows carried an alternate");
    assert!(with > 500, "about a third of the flows moved to .3: {with}");
    // .1 is removed right away: the (.1, .2) ring stays the previous one
    // (the last ring lived too short), so .1 is retired, not released, and
    // its connections still get their second chance.
    let id_1 = h.services.vip(&vip).unwrap().backends[&"198.51.100.1".parse().unwrap()].id;
    h.services.remove_backend(&mut h.dp, &vip, "198.51.100.1".parse().unwrap()).unwrap();
    let retired = h.dp.backend(id_1).unwrap();
    assert_eq!(retired.flags, lb_common::BACKEND_F_RETIRED);
    assert_ne!(retired.cookie, 0);
    let (with, from_1) = check(&mut h, 0xfeed);
    println!("after a removal: {with} flows carried an alternate, {from_1} naming the removed .1");
    assert!(from_1 > 500, "about half of the flows were on .1: {from_1}");
    // A backend that no ring names any more is released at once.
    h.backend(&vip, "198.51.100.4", 1);
    let id_4 = h.services.vip(&vip).unwrap().backends[&"198.51.100.4".parse().unwrap()].id;
    h.services.remove_backend(&mut h.dp, &vip, "198.51.100.4".parse().unwrap()).unwrap();
    assert_eq!(h.dp.backend(id_4).unwrap().cookie, 0, ".4 was never in the previous ring");
}
