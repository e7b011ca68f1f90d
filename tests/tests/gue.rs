//! GUE encapsulation and the alternate hop, through the real balancer
//! (BPF_PROG_TEST_RUN). Outer headers are written out by hand from
//! draft-ietf-intarea-gue (variant 0), RFC 768 and RFC 791 / RFC 8200; the
//! private-data layout is this project's (README, "GUE and the second chance").

use lb_common::{flow_hash, stat};
use lb_tests::*;
use lb_userspace::{
    services::{Encap, Generation, VipSpec},
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
        quic: None,
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
    // Hlen 2 words of private data: kind 1, family 4, count 1, then 198.51.100.1.
    want.extend_from_slice(&[0x02, 0x04, 0x00, 0x00]);
    want.extend_from_slice(&[0x01, 0x04, 0x01, 0x00, 198, 51, 100, 1]);
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
    // Hlen 5 words; proto 41 (IPv6 inside); kind 1, family 6, count 1, the alternate.
    want.extend_from_slice(&[0x05, 0x29, 0x00, 0x00]);
    want.extend_from_slice(&[0x01, 0x06, 0x01, 0x00]);
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

/// A GUE VIP whose declared history is (.1, .2, .3), (.1, .2), (.1): the
/// backends added one at a time, each by an API call of its own.
fn three_generations(h: &mut Harness, stateless: bool) -> lb_userspace::services::VipAddr {
    let vip = gue_vip(h, "203.0.113.10:80/tcp", stateless);
    h.backend(&vip, "198.51.100.1", 1);
    h.backend(&vip, "198.51.100.2", 1);
    h.backend(&vip, "198.51.100.3", 1);
    vip
}

#[test]
fn a_flow_moved_twice_names_both_earlier_owners_newest_first() {
    let mut h = Harness::new();
    three_generations(&mut h, false);
    // A flow on .3 now that the (.1, .2) ring gave to .2 (the (.1) ring gave
    // every flow to .1): it names two alternates.
    let two = (40000..42000)
        .map(|p| (p, h.run(&tcp_frame(CLIENT, p, VIP, 80, ACK))))
        .find(|(_, (_, out))| outer_dst(out).to_string() == "198.51.100.3" && out.len() == 14 + 20 + 8 + 4 + 12 + 40)
        .map(|(p, _)| p)
        .expect("some flow moved .1 -> .2 -> .3");
    let input = tcp_frame(CLIENT, two, VIP, 80, ACK);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    let mut want = eth(NEXT_HOP_MAC, LB_MAC, ETH_P_IP);
    // 20 + 8 + 4 + 12 (head word, two addresses) + 40 = 84; checksum by RFC 1071.
    want.extend_from_slice(&[0x45, 0x00, 0x00, 0x54, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x4e, 0x61]);
    want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 3]);
    want.extend_from_slice(&gue_source_port(&input));
    want.extend_from_slice(&[0x17, 0xc0, 0x00, 0x40, 0x00, 0x00]);
    // Hlen 3; kind 1, family 4, count 2; .2 (the newer ring's) before .1.
    want.extend_from_slice(&[0x03, 0x04, 0x00, 0x00]);
    want.extend_from_slice(&[0x01, 0x04, 0x02, 0x00, 198, 51, 100, 2, 198, 51, 100, 1]);
    want.extend_from_slice(&input[14..]);
    assert_eq!(out, want);
}

#[test]
fn a_connection_opened_while_a_backend_was_down_keeps_its_backend_as_an_alternate_when_it_returns() {
    let mut h = Harness::new();
    let vip = three_generations(&mut h, true);
    let three = "198.51.100.3".parse().unwrap();
    // .3 fails its checks: flows of .3 go to .1 and .2 (a ring in no
    // generation: health is not declared).
    h.services.set_health(&mut h.dp, &vip, three, false).unwrap();
    let opened: Vec<(u16, String)> =
        (40000..40300).map(|p| (p, h.forward(&tcp_frame(CLIENT, p, VIP, 80, SYN)).to_string())).collect();
    h.services.set_health(&mut h.dp, &vip, three, true).unwrap();
    let mut moved = 0;
    for (port, owner) in opened {
        let (_, out) = h.run(&tcp_frame(CLIENT, port, VIP, 80, ACK));
        if outer_dst(&out).to_string() == owner {
            continue;
        }
        // Back on .3 now: the ring it was opened under names its owner.
        assert_eq!(outer_dst(&out).to_string(), "198.51.100.3");
        let count = out[48] as usize;
        let named: Vec<String> = out[50..50 + 4 * count]
            .chunks(4)
            .map(|a| std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string())
            .collect();
        assert!(named.contains(&owner), "port {port}: opened on {owner}, alternates {named:?}");
        moved += 1;
    }
    assert!(moved > 50, "about a third of the flows are .3's again: {moved}");
}

#[test]
fn alternates_are_the_history_rings_other_owners_and_retired_backends_stay_until_no_ring_names_them() {
    let mut h = Harness::new();
    let vip = three_generations(&mut h, true);
    let ids: std::collections::HashMap<u32, [u8; 4]> = h
        .services
        .vip(&vip)
        .unwrap()
        .backends
        .iter()
        .map(|(a, b)| (b.id, if let std::net::IpAddr::V4(a) = a { a.octets() } else { unreachable!() }))
        .collect();
    // Checks each flow against the rings in the maps: the private data names
    // each alternate ring's owner that differs from the live one and from
    // those named before it, in the alternate rings' order. Returns how many flows
    // carried alternates, how many carried two, and how many named .1.
    let check = |h: &mut Harness, seed: u64| -> (u32, u32, u32) {
        let meta = h.dp.vip(&vip.key()).unwrap().unwrap();
        let (mut with, mut two, mut from_1) = (0, 0, 0);
        let mut rng = XorShift(seed);
        for _ in 0..3000 {
            let port = 1024 + (rng.next_u64() % 60000) as u16;
            let input = tcp_frame(CLIENT, port, VIP, 80, ACK | PSH);
            let slot = lb_common::ring_slot(hash_of(&input), meta.ring_size);
            let mut named = vec![h.dp.ring_slot(meta.ring_offset + slot).unwrap()];
            let mut want: Vec<u8> = Vec::new();
            for offset in &meta.alt_rings[..meta.alt_rings_len as usize] {
                let owner = h.dp.ring_slot(offset + slot).unwrap();
                if !named.contains(&owner) {
                    named.push(owner);
                    want.extend_from_slice(&ids[&owner]);
                }
            }
            let (_, out) = h.run(&input);
            let count = want.len() / 4;
            if count == 0 {
                assert_eq!(out[42], 0x00, "port {port}: same owner in every ring");
                continue;
            }
            assert_eq!(out[42] as usize, 1 + count, "port {port}: Hlen");
            assert_eq!(&out[46..50], &[0x01, 0x04, count as u8, 0x00], "port {port}");
            assert_eq!(&out[50..50 + 4 * count], &want[..], "port {port}: the earlier owners");
            with += 1;
            two += (count == 2) as u32;
            from_1 += want.chunks(4).any(|a| a == [198, 51, 100, 1]) as u32;
        }
        (with, two, from_1)
    };
    let (with, two, _) = check(&mut h, 0x5eed);
    println!("after two adds: {with} of 3000 flows carried alternates, {two} of them two");
    // Two thirds of the flows moved off .1 (the first ring's only owner).
    assert!(with > 1500, "{with}");
    assert!(two > 300, "about a sixth moved .1 -> .2 -> .3: {two}");
    // .1 removed: the history still names it, so it is retired, not released,
    // and its connections keep their second chance.
    let id_1 = h.services.vip(&vip).unwrap().backends[&"198.51.100.1".parse().unwrap()].id;
    h.services.remove_backend(&mut h.dp, &vip, "198.51.100.1".parse().unwrap()).unwrap();
    h.commit();
    let retired = h.dp.backend(id_1).unwrap();
    assert_eq!(retired.flags, lb_common::BACKEND_F_RETIRED);
    assert_ne!(retired.cookie, 0);
    let (with, _, from_1) = check(&mut h, 0xfeed);
    println!("after a removal: {with} flows carried alternates, {from_1} naming the removed .1");
    assert!(from_1 > 500, "about a third of the flows were on .1: {from_1}");
    // .4 added and removed: retired while a generation names it.
    h.backend(&vip, "198.51.100.4", 1);
    let id_4 = h.services.vip(&vip).unwrap().backends[&"198.51.100.4".parse().unwrap()].id;
    h.services.remove_backend(&mut h.dp, &vip, "198.51.100.4".parse().unwrap()).unwrap();
    h.commit();
    assert_eq!(h.dp.backend(id_4).unwrap().flags, lb_common::BACKEND_F_RETIRED);
    // Each declared change pushes the oldest generation out: the one
    // naming .1 goes with the next, the one naming .4 two later.
    let reweigh = |h: &mut Harness, weight: u32| {
        h.services.set_weight(&mut h.dp, &vip, "198.51.100.2".parse().unwrap(), weight).unwrap();
        h.commit();
    };
    reweigh(&mut h, 2);
    assert_eq!(h.dp.backend(id_1).unwrap().cookie, 0, "no generation names .1 any more");
    reweigh(&mut h, 3);
    assert_eq!(h.dp.backend(id_4).unwrap().flags, lb_common::BACKEND_F_RETIRED, "the oldest generation names .4");
    reweigh(&mut h, 4);
    assert_eq!(h.dp.backend(id_4).unwrap().cookie, 0, "no generation names .4 any more");
}

#[test]
fn a_ring_history_imported_from_another_host_names_the_same_alternates_and_a_bad_one_changes_nothing() {
    // The first host lived through seven change sets, two of them adding
    // and removing .4 and .5 (retired now, each named by one generation).
    let mut first = Harness::new();
    let vip = three_generations(&mut first, true);
    for gone in ["198.51.100.4", "198.51.100.5"] {
        first.backend(&vip, gone, 1);
        first.services.remove_backend(&mut first.dp, &vip, gone.parse().unwrap()).unwrap();
        first.commit();
    }
    // The second got the same backends in one change set.
    let mut second = Harness::new();
    let vip2 = gue_vip(&mut second, "203.0.113.10:80/tcp", true);
    for b in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let spec = lb_userspace::BackendSpec { addr: b.parse().unwrap(), weight: 1, server_id: None };
        second.services.add_backend(&mut second.dp, &vip2, spec).unwrap();
    }
    second.commit();
    let exported: Vec<Generation> = first
        .services
        .vip(&vip)
        .unwrap()
        .history()
        .iter()
        .map(|g| Generation::declared(g.members.clone(), g.since, g.fingerprint))
        .collect();
    assert_eq!(exported.len(), 4);
    let frames: Vec<Vec<u8>> = (40000..42000).map(|p| tcp_frame(CLIENT, p, VIP, 80, ACK)).collect();
    let outputs = |h: &mut Harness| frames.iter().map(|f| h.run(f)).collect::<Vec<_>>();
    let before = outputs(&mut second);
    // Refused, naming the reason, with nothing changed.
    let mut wrong_print = exported.clone();
    wrong_print[2].fingerprint ^= 1;
    let five = [exported.clone(), vec![exported[3].clone()]].concat();
    for (bad, why) in
        [(&exported[1..], "newest generation"), (&wrong_print[..], "gives ring"), (&five[..], "at most 4")]
    {
        let err = second.services.import_history(&mut second.dp, &vip2, bad).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
        assert_eq!(second.services.vip(&vip2).unwrap().history().len(), 1);
        assert_eq!(outputs(&mut second), before, "a refused import changes no packet");
    }
    // Imported: every packet leaves both hosts byte for byte the same.
    second.services.import_history(&mut second.dp, &vip2, &exported).unwrap();
    let (a, b) = (outputs(&mut first), outputs(&mut second));
    if let Some(k) = (0..a.len()).find(|k| a[*k] != b[*k]) {
        panic!("port {}: {:?} on the first host, {:?} on the second", 40000 + k, a[k], b[k]);
    }
    let two = a.iter().filter(|(_, out)| out[42] >= 3).count();
    println!("{two} of 2000 flows name two alternates or more");
    assert!(two > 100, "{two}");
}
