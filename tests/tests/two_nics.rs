//! Two NICs: clients' packets come in on one interface and leave for the
//! backends through another (`lbctl up --backend-iface`, XDP_REDIRECT
//! through a devmap). Packet tests of the real balancer through
//! BPF_PROG_TEST_RUN (bytes by hand), and the lab's lb1 given a second
//! link towards the backends. Needs root.

mod common;

use common::*;
use lb_lab::*;
use lb_tests::{tcp_frame, Harness, ACK, LB_MAC, ROUTER_MAC, SYN, XDP_TX};
use lb_userspace::HashMode;

/// XDP_REDIRECT (include/uapi/linux/bpf.h, enum xdp_action).
const XDP_REDIRECT: u32 = 4;
/// The backend-facing NIC's MAC.
const BACKEND_NIC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

#[test]
fn with_a_backend_nic_forwarded_packets_are_redirected_from_its_mac_and_answers_stay() {
    let mut h = Harness::new();
    let vip = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&vip, "198.51.100.20", 1);
    let settings = lb_userspace::Settings { egress_mac: Some(BACKEND_NIC_MAC), ..lb_tests::test_settings() };
    h.services.set_settings(&mut h.dp, settings).unwrap();
    h.dp.set_egress(1).unwrap(); // lo: any interface will do, the test run sends nothing
    let plain = tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, SYN);
    let (action, out) = h.run(&plain);
    assert_eq!(action, XDP_REDIRECT);
    #[rustfmt::skip]
    let expected_head: [u8; 34] = [
        // To the next hop, from the backend NIC; IPv4.
        0x02, 0, 0, 0, 0, 0x02,  0x02, 0, 0, 0, 0, 0x0b,  0x08, 0x00,
        // The same outer header as on one NIC (RFC 2003; checksum by hand).
        0x45, 0x00, 0x00, 0x3c,  0x00, 0x00, 0x40, 0x00,
        0x40, 0x04, 0x4e, 0x75,  192, 0, 2, 1,  198, 51, 100, 20,
    ];
    assert_eq!(&out[..34], &expected_head[..]);
    assert_eq!(&out[34..], &plain[14..]);
    // An established packet takes the same way.
    assert_eq!(h.run(&tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, ACK)).0, XDP_REDIRECT);
    // Answers to the client leave where it came from: XDP_TX, LB's MAC.
    let (action, out) = h.run(&lb_tests::echo_request_v4("192.0.2.55", "203.0.113.10"));
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[..12], &[ROUTER_MAC, LB_MAC].concat()[..]);
    // Back to one NIC: XDP_TX again.
    h.services.set_settings(&mut h.dp, lb_tests::test_settings()).unwrap();
    assert_eq!(h.run(&plain).0, XDP_TX);
}

/// Packets received on `dev` in namespace `netns` so far.
fn rx_packets(netns: &str, dev: &str) -> u64 {
    let out = sh("ip", &["-n", netns, "-s", "-j", "link", "show", dev]).unwrap();
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

#[test]
fn connections_through_an_lb_host_with_two_nics_survive_ring_changes_and_ecmp_moves() {
    let s = lab();
    let lab = &s.lab;
    lab.give_backend_nic(1).unwrap();
    let status = ok(lab, 1, &["status"]);
    assert!(status.contains("backends via   lb1-be (XDP_REDIRECT: two NICs)"), "{status}");
    let (client_side, backend_side) = ("rt-lb1", "rt-lb1b");
    let before =
        (rx_packets(ROUTER_NS, client_side), rx_packets(ROUTER_NS, backend_side), counter(lab, 1, "forwarded"));
    // Through lb1 alone first, GUE so that the second chance carries
    // connections whose backend a ring change moved.
    let streams = streams_on(lab, &["--encap", "gue"], 59000, &[1]);
    let mut failed = new_connections(20, 59100);
    let forwarded = counter(lab, 1, "forwarded") - before.2;
    let via_backend_nic = rx_packets(ROUTER_NS, backend_side) - before.1;
    let via_client_nic = rx_packets(ROUTER_NS, client_side) - before.0;
    println!("lb1 forwarded {forwarded}; the router got {via_backend_nic} on its backend link, {via_client_nic} on the other");
    assert!(forwarded > 100);
    assert!(via_backend_nic >= forwarded, "every forwarded packet left through lb1-be");
    assert!(via_client_nic < forwarded / 2, "not through the client-facing link");
    ring_changes(lab, &streams);
    failed += new_connections(20, 59200);
    lab.route_through(&[2], VIP4).unwrap();
    streams.more_rounds(3);
    failed += new_connections(20, 59300);
    lab.route_through(&[1], VIP4).unwrap();
    streams.more_rounds(3);
    failed += new_connections(20, 59400);
    lab.route_through(&[1, 2], VIP4).unwrap();
    streams.more_rounds(3);
    let owners = none_broke(streams);
    println!("{} connections kept, {failed} of 80 new ones failed", owners.len());
    assert_eq!(failed, 0);
}
