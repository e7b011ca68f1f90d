//! QUIC VIPs through the real balancer (BPF_PROG_TEST_RUN): connection IDs
//! that name a server (draft-ietf-quic-load-balancers-21, unencrypted)
//! route to it whatever the client's address; a client's own CID in a long
//! header is balanced by its hash; the rest goes by the 5-tuple, counted.
//! QUIC headers are written by hand from RFC 8999 / RFC 9000 17.2-17.3.

use std::net::IpAddr;

use lb_common::stat;
use lb_tests::*;
use lb_userspace::{
    quic::{QuicSpec, ServerId},
    services::{Encap, VipAddr, VipSpec},
    BackendSpec, HashMode,
};

const VIP: &str = "203.0.113.10";
const BACKENDS: [&str; 4] = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"];

/// A QUIC VIP on 443/udp (config 0, 2-octet server IDs, 6-octet nonce:
/// 9-octet CIDs) with the four backends; their server IDs are the last
/// two octets of their addresses (0x6401..0x6404).
fn quic_vip(h: &mut Harness, vip: &str) -> VipAddr {
    let vip = h.vip_spec(VipSpec {
        vip: vip.parse().unwrap(),
        hash: HashMode::FiveTuple,
        ring_size: 65537,
        encap: Encap::Ipip,
        stateless: false,
        quic: Some(QuicSpec::default()),
    });
    for b in BACKENDS {
        h.backend(&vip, b, 1);
    }
    vip
}

/// A 1-RTT packet (RFC 9000 17.3.1): first octet 0x41 (short header, fixed
/// bit, 2-octet packet number), the 9-octet DCID, packet number 0x0001,
/// then 20 octets standing for the protected payload.
fn short_header(dcid: [u8; 9]) -> Vec<u8> {
    let mut p = vec![0x41];
    p.extend_from_slice(&dcid);
    p.extend_from_slice(&[0x00, 0x01]);
    p.extend_from_slice(&[0x55; 20]);
    p
}

/// A CID as a server issues it: first octet config 0 (top 3 bits) with
/// the length self-description 8 (low 5 bits), server ID, nonce.
fn server_cid(config: u8, server_id: [u8; 2]) -> [u8; 9] {
    [config << 5 | 0x08, server_id[0], server_id[1], 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6]
}

/// A long-header packet (RFC 9000 17.2): `first` octet, version 1, the
/// DCID, an empty SCID, then 40 octets (token length, length, packet
/// number, payload).
fn long_header(first: u8, dcid: &[u8]) -> Vec<u8> {
    let mut p = vec![first, 0x00, 0x00, 0x00, 0x01, dcid.len() as u8];
    p.extend_from_slice(dcid);
    p.push(0x00);
    p.extend_from_slice(&[0x66; 40]);
    p
}

/// Initial (RFC 9000 17.2.2): long header, fixed bit, type 0, 4-octet
/// packet number.
const INITIAL: u8 = 0xc3;
/// Handshake (RFC 9000 17.2.4): type 2.
const HANDSHAKE: u8 = 0xe3;

fn client(i: u32) -> (String, u16) {
    (format!("192.0.2.{}", 1 + i % 250), 20000 + (i * 7919 % 40000) as u16)
}

#[test]
fn a_short_header_cid_goes_to_the_server_it_names_from_any_client_address_golden_bytes() {
    let mut h = Harness::new();
    quic_vip(&mut h, "203.0.113.10:443/udp");
    let payload = short_header(server_cid(0, [0x64, 0x03]));
    let input = udp_frame("192.0.2.7", 51000, VIP, 443, &payload);
    let (action, out) = h.run(&input);
    assert_eq!(action, XDP_TX);
    #[rustfmt::skip]
    let expected_head: [u8; 34] = [
        0x02, 0, 0, 0, 0, 0x02,  0x02, 0, 0, 0, 0, 0x01,  0x08, 0x00,
        // IPv4 (RFC 2003): total 80 = 20 + 20 + 8 UDP + 32 QUIC, DF, TTL
        // 64, protocol 4, checksum 0x4e72, 192.0.2.1 -> 198.51.100.3.
        0x45, 0x00, 0x00, 0x50,  0x00, 0x00, 0x40, 0x00,
        0x40, 0x04, 0x4e, 0x72,  192, 0, 2, 1,  198, 51, 100, 3,
    ];
    assert_eq!(&out[..34], &expected_head[..]);
    assert_eq!(&out[34..], &input[14..], "the QUIC packet is carried unchanged");
    // The client migrates: new ports, new addresses; the CID still names .3.
    for i in 0..200 {
        let (src, port) = client(i);
        assert_eq!(h.forward(&udp_frame(&src, port, VIP, 443, &payload)).to_string(), "198.51.100.3", "{src}:{port}");
    }
    assert_eq!(h.stat(stat::QUIC_BY_SERVER_ID), 201);
    // Each server ID to its own backend.
    for b in BACKENDS {
        let last: u8 = b.rsplit('.').next().unwrap().parse().unwrap();
        let p = short_header(server_cid(0, [0x64, last]));
        assert_eq!(h.forward(&udp_frame("192.0.2.9", 40000, VIP, 443, &p)).to_string(), b);
    }
}

#[test]
fn a_clients_own_cid_in_long_headers_keeps_its_packets_together_when_the_client_moves() {
    let mut h = Harness::new();
    quic_vip(&mut h, "203.0.113.10:443/udp");
    // Client-chosen DCIDs (8 random-looking octets; first octet codepoint
    // 0b111: not routable) land on one backend from every address.
    let mut seen = std::collections::BTreeSet::new();
    for d in 0..64u8 {
        let dcid = [0xe0 | (d & 0x1f), d, 0x5a, d.wrapping_mul(37), 0x11, 0x22, d ^ 0x33, 0x44];
        let initial = long_header(INITIAL, &dcid);
        let first = h.forward(&udp_frame("192.0.2.200", 50000, VIP, 443, &initial));
        for i in 0..8 {
            let (src, port) = client(i + d as u32);
            assert_eq!(h.forward(&udp_frame(&src, port, VIP, 443, &initial)), first, "DCID {dcid:02x?} from {src}");
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 3, "client CIDs spread over the backends: {seen:?}");
    assert_eq!(h.stat(stat::QUIC_BY_CLIENT_CID), 64 * 9);
    // A long header whose DCID the server issued (Handshake) names it.
    let handshake = long_header(HANDSHAKE, &server_cid(0, [0x64, 0x02]));
    for i in 0..20 {
        let (src, port) = client(i);
        assert_eq!(h.forward(&udp_frame(&src, port, VIP, 443, &handshake)).to_string(), "198.51.100.2");
    }
    // A DCID longer than QUIC's 20 octets is not QUIC v1's: by the 5-tuple.
    let mut odd = long_header(INITIAL, &[0x42; 20]);
    odd[5] = 21;
    h.forward(&udp_frame("192.0.2.1", 1234, VIP, 443, &odd));
    assert_eq!(h.stat(stat::QUIC_UNDECODABLE), 1);
}

#[test]
fn cids_that_name_no_live_server_go_by_the_5_tuple_and_each_case_is_counted() {
    let mut h = Harness::new();
    quic_vip(&mut h, "203.0.113.10:443/udp");
    let unknown_config = short_header(server_cid(1, [0x64, 0x03]));
    let unknown_server = short_header(server_cid(0, [0x64, 0x09]));
    // First octet and half a CID: it cannot be the VIP's 9-octet CID.
    let cut_short = vec![0x41, 0x08, 0x64, 0x03, 0xa1];
    let mut by_five_tuple = std::collections::BTreeSet::new();
    for i in 0..100 {
        let (src, port) = client(i);
        // One 5-tuple, one backend, whichever way the CID fails.
        let backends: Vec<IpAddr> = [&unknown_config, &unknown_server, &cut_short]
            .iter()
            .map(|p| h.forward(&udp_frame(&src, port, VIP, 443, p)))
            .collect();
        assert!(backends.iter().all(|b| *b == backends[0]), "{src}:{port}: {backends:?}");
        by_five_tuple.insert(backends[0]);
    }
    assert!(by_five_tuple.len() >= 3, "the 5-tuple spreads them: {by_five_tuple:?}");
    assert_eq!(h.stat(stat::QUIC_UNKNOWN_CONFIG), 100);
    assert_eq!(h.stat(stat::QUIC_UNKNOWN_SERVER), 100);
    assert_eq!(h.stat(stat::QUIC_UNDECODABLE), 100);
    assert_eq!(h.stat(stat::QUIC_BY_SERVER_ID), 0);
    // A UDP VIP that is not QUIC reads no CID at all.
    let plain = h.vip("203.0.113.10:4433/udp", HashMode::FiveTuple);
    h.backend(&plain, "198.51.100.1", 1);
    let quic_counters =
        |h: &mut Harness| (stat::QUIC_BY_SERVER_ID..=stat::QUIC_UNDECODABLE).map(|c| h.stat(c)).sum::<u64>();
    let before = quic_counters(&mut h);
    h.forward(&udp_frame("192.0.2.1", 1000, VIP, 4433, &short_header(server_cid(0, [0x64, 0x01]))));
    assert_eq!(quic_counters(&mut h), before);
}

#[test]
fn a_server_id_routes_while_its_backend_is_up_or_drained_and_stops_when_down_or_removed() {
    let mut h = Harness::new();
    let vip = quic_vip(&mut h, "203.0.113.10:443/udp");
    let to_three = short_header(server_cid(0, [0x64, 0x03]));
    let send = |h: &mut Harness| h.forward(&udp_frame("192.0.2.33", 40000, VIP, 443, &to_three)).to_string();
    let three: IpAddr = "198.51.100.3".parse().unwrap();
    h.services.drain_backend(&mut h.dp, &vip, three).unwrap();
    assert_eq!(send(&mut h), "198.51.100.3", "a drained backend keeps its connections");
    h.services.set_health(&mut h.dp, &vip, three, false).unwrap();
    assert_ne!(send(&mut h), "198.51.100.3", "a down backend is no server");
    assert_eq!(h.stat(stat::QUIC_UNKNOWN_SERVER), 1);
    h.services.set_health(&mut h.dp, &vip, three, true).unwrap();
    assert_eq!(send(&mut h), "198.51.100.3");
    h.services.remove_backend(&mut h.dp, &vip, three).unwrap();
    // Its backend id goes to the next backend added: the ID still names no one.
    h.backend(&vip, "198.51.100.9", 1);
    assert_ne!(send(&mut h), "198.51.100.3");
    assert_eq!(h.stat(stat::QUIC_UNKNOWN_SERVER), 2);
    // The VIP removed, its server IDs go with it: the map is empty again.
    h.services.remove_vip(&mut h.dp, &vip).unwrap();
    let again = quic_vip(&mut h, "203.0.113.10:443/udp");
    assert_eq!(send(&mut h), "198.51.100.3", "{again} has the same IDs anew");
}

#[test]
fn server_ids_by_hand_and_ids_two_backends_would_share() {
    let mut h = Harness::new();
    let vip = quic_vip(&mut h, "203.0.113.10:443/udp");
    let add = |h: &mut Harness, addr: &str, id: Option<u64>| {
        let spec = BackendSpec { addr: addr.parse().unwrap(), weight: 1, server_id: id.map(ServerId) };
        h.services.add_backend(&mut h.dp, &vip, spec).map_err(|e| e.to_string())
    };
    // 10.0.100.3 would take 198.51.100.3's 0x6403.
    let err = add(&mut h, "10.0.100.3", None).unwrap_err();
    assert!(err.contains("server ID 6403") && err.contains("taken by 198.51.100.3"), "{err}");
    add(&mut h, "10.0.100.3", Some(0x0abc)).unwrap();
    let p = short_header(server_cid(0, [0x0a, 0xbc]));
    assert_eq!(h.forward(&udp_frame("192.0.2.8", 4000, VIP, 443, &p)).to_string(), "10.0.100.3");
    let err = add(&mut h, "10.0.0.9", Some(0x1_0000)).unwrap_err();
    assert!(err.contains("does not fit") && err.contains("2-octet"), "{err}");
    // Not a QUIC VIP: no server IDs.
    let plain = h.vip("203.0.113.10:53/udp", HashMode::FiveTuple);
    let spec = BackendSpec { addr: "198.51.100.1".parse().unwrap(), weight: 1, server_id: Some(ServerId(1)) };
    let err = h.services.add_backend(&mut h.dp, &plain, spec).unwrap_err().to_string();
    assert!(err.contains("is not QUIC"), "{err}");
    // QUIC needs UDP.
    let tcp = VipSpec { quic: Some(QuicSpec::default()), ..h.services.vip(&plain).unwrap().spec };
    let tcp = VipSpec { vip: "203.0.113.10:443/tcp".parse().unwrap(), ..tcp };
    let err = h.services.add_vip(&mut h.dp, tcp).unwrap_err().to_string();
    assert!(err.contains("QUIC runs over UDP"), "{err}");
}

#[test]
fn ipv6_quic_vips_route_by_server_id_too() {
    let mut h = Harness::new();
    let vip = h.vip_spec(VipSpec {
        vip: "[2001:db8::10]:443/udp".parse().unwrap(),
        hash: HashMode::FiveTuple,
        ring_size: 65537,
        encap: Encap::Ipip,
        stateless: true,
        quic: Some(QuicSpec::default()),
    });
    for b in ["2001:db8:b::1", "2001:db8:b::2", "2001:db8:b::3"] {
        h.backend(&vip, b, 1);
    }
    // 2001:db8:b::2 has server ID 0x0002.
    let payload = short_header(server_cid(0, [0x00, 0x02]));
    for i in 0..50u16 {
        let input = udp_frame(&format!("2001:db8:c::{i:x}"), 30000 + i, "2001:db8::10", 443, &payload);
        let (action, out) = h.run(&input);
        assert_eq!(action, XDP_TX);
        assert_eq!(outer_dst(&out).to_string(), "2001:db8:b::2");
        assert_eq!(&out[14 + 40..], &input[14..], "the QUIC packet is carried unchanged");
    }
}
