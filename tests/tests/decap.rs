//! Packet tests of the backends' decap program: the real object through
//! BPF_PROG_TEST_RUN, frames and expectations written by hand. Needs root.

use aya::programs::{TestRun, TestRunOptions};
use lb_tests::*;
use lb_userspace::Decap;

const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];

fn decap_for(addrs: &[&str]) -> Decap {
    let mut d = Decap::load().expect("decap object loads and verifies");
    for a in addrs {
        d.add_address(a.parse().unwrap()).unwrap();
    }
    d
}

fn run(d: &mut Decap, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let r = d
        .program()
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// An encapsulated frame as the balancer sends it to this backend.
fn encapsulated(outer_src: &str, outer_dst: &str, inner: &[u8], inner_is_v6: bool) -> Vec<u8> {
    let next = if inner_is_v6 { 41 } else { 4 };
    match (outer_src.parse().unwrap(), outer_dst.parse().unwrap()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let mut f = eth(BACKEND_MAC, NEXT_HOP_MAC, ETH_P_IP);
            f.extend(ipv4(s, d, next, &[], inner.len()));
            f.extend_from_slice(inner);
            f
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            let mut f = eth(BACKEND_MAC, NEXT_HOP_MAC, ETH_P_IPV6);
            f.extend(ipv6(s, d, next, inner.len()));
            f.extend_from_slice(inner);
            f
        }
        _ => panic!("mixed families"),
    }
}

/// The frame the kernel must see: the same MACs, the inner EtherType.
fn expected(inner: &[u8], ethertype: u16) -> Vec<u8> {
    let mut f = eth(BACKEND_MAC, NEXT_HOP_MAC, ethertype);
    f.extend_from_slice(inner);
    f
}

#[test]
fn ipv4_in_ipv4_to_our_address_is_stripped() {
    let mut d = decap_for(&["198.51.100.20"]);
    let inner = &tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, SYN)[14..];
    let (action, out) = run(&mut d, &encapsulated("192.0.2.1", "198.51.100.20", inner, false));
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, expected(inner, ETH_P_IP));
}

#[test]
fn ipv6_in_ipv6_and_ipv4_in_ipv6_are_stripped() {
    let mut d = decap_for(&["2001:db8:1::20"]);
    let inner6 = &tcp_frame("2001:db8:c::55", 40000, "2001:db8::10", 443, SYN)[14..];
    let (_, out) = run(&mut d, &encapsulated("2001:db8:ffff::1", "2001:db8:1::20", inner6, true));
    assert_eq!(out, expected(inner6, ETH_P_IPV6));
    let inner4 = &udp_frame("192.0.2.55", 5353, "203.0.113.10", 53, b"q")[14..];
    let (_, out) = run(&mut d, &encapsulated("2001:db8:ffff::1", "2001:db8:1::20", inner4, false));
    assert_eq!(out, expected(inner4, ETH_P_IP));
}

#[test]
fn everything_else_passes_untouched() {
    let mut d = decap_for(&["198.51.100.20"]);
    let inner = &tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, SYN)[14..];
    let mut with_options = eth(BACKEND_MAC, NEXT_HOP_MAC, ETH_P_IP);
    with_options.extend(ipv4(
        "192.0.2.1".parse().unwrap(),
        "198.51.100.20".parse().unwrap(),
        4,
        &[1, 1, 1, 1],
        inner.len(),
    ));
    with_options.extend_from_slice(inner);
    let cases = [
        encapsulated("192.0.2.1", "198.51.100.21", inner, false), // not our address
        tcp_frame("192.0.2.55", 40000, "198.51.100.20", 80, SYN), // plain TCP to us
        with_options,                                             // outer options: not from the balancer
        tcp_frame("192.0.2.55", 40000, "198.51.100.20", 80, SYN)[..20].to_vec(), // truncated
    ];
    for (i, input) in cases.iter().enumerate() {
        assert_eq!(run(&mut d, input), (XDP_PASS, input.clone()), "case {i}");
    }
}
