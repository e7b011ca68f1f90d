//! Packet tests of the backends' decap program: the real object through
//! BPF_PROG_TEST_RUN, frames and expectations written by hand. Needs root.

use lb_tests::*;
use lb_userspace::Decap;

const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];

fn decap_for(addrs: &[&str]) -> Decap {
    let mut d = Decap::load().expect("decap object loads and verifies");
    for a in addrs {
        d.add_address(a.parse().unwrap()).unwrap();
    }
    d.set_gue_port(GUE_PORT).unwrap();
    d
}

const GUE_PORT: u16 = 6080;

fn run(d: &mut Decap, frame: &[u8]) -> (u32, Vec<u8>) {
    run_xdp(d.program(), frame)
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

/// A GUE frame as the balancer sends it over IPv4: UDP to port 6080, GUE
/// variant 0 with Hlen words of private data naming `alternates` (kind 1,
/// family 4, their count, then their addresses), or none.
fn gue4(dst: &str, alternates: &[&str], inner: &[u8]) -> Vec<u8> {
    let mut private = Vec::new();
    if !alternates.is_empty() {
        private.extend_from_slice(&[1, 4, alternates.len() as u8, 0]);
    }
    for a in alternates {
        private.extend_from_slice(&a.parse::<std::net::Ipv4Addr>().unwrap().octets());
    }
    let udp_len = 8 + 4 + private.len() + inner.len();
    let mut f = eth(BACKEND_MAC, NEXT_HOP_MAC, ETH_P_IP);
    f.extend(ipv4("192.0.2.1".parse().unwrap(), dst.parse().unwrap(), 17, &[], udp_len));
    f.extend_from_slice(&[0xc1, 0x23, 0x17, 0xc0]);
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[(private.len() / 4) as u8, 4, 0, 0]);
    f.extend_from_slice(&private);
    f.extend_from_slice(inner);
    f
}

/// `input` (a GUE frame over IPv4) as a backend passes it on: back to the
/// neighbour it came from, outer destination `to`, TTL 63, the IPv4
/// checksum redone (RFC 1071), lengths for `private` then `inner`. The GUE
/// header word (bytes 42..46) is left for the caller to write.
fn passed_on(input: &[u8], to: [u8; 4], private: &[u8], inner: &[u8]) -> Vec<u8> {
    let udp_len = 8 + 4 + private.len() + inner.len();
    let mut ip = input[14..34].to_vec();
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[8] = 63;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[16..20].copy_from_slice(&to);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut want = eth(NEXT_HOP_MAC, BACKEND_MAC, ETH_P_IP);
    want.extend_from_slice(&ip);
    want.extend_from_slice(&[0xc1, 0x23, 0x17, 0xc0]);
    want.extend_from_slice(&(udp_len as u16).to_be_bytes());
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    want.extend_from_slice(private);
    want.extend_from_slice(inner);
    want
}

/// IPv4 + TCP (20 bytes each) from 127.0.0.1:`sport` to 127.0.0.1:`dport`.
fn loopback_tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let lo = "127.0.0.1".parse().unwrap();
    let mut p = ipv4(lo, lo, 6, &[], 20);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

#[test]
fn gue_is_stripped_and_a_packet_without_an_alternate_is_never_passed_on() {
    let mut d = decap_for(&["198.51.100.20"]);
    let inner = &tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, ACK)[14..];
    // Hlen 0 (as after one redirect): decapsulated, even with no socket.
    let (action, out) = run(&mut d, &gue4("198.51.100.20", &[], inner));
    assert_eq!((action, out), (XDP_PASS, expected(inner, ETH_P_IP)));
    // Another UDP port, flags set, or another address: not ours, untouched.
    let mut other_port = gue4("198.51.100.20", &[], inner);
    other_port[36..38].copy_from_slice(&6081u16.to_be_bytes());
    let mut flags = gue4("198.51.100.20", &[], inner);
    flags[44] = 0x80;
    for input in [other_port, flags, gue4("198.51.100.21", &[], inner)] {
        assert_eq!(run(&mut d, &input), (XDP_PASS, input.clone()));
    }
    assert_eq!(d.stats().unwrap(), [1, 0, 0], "one decapsulated, nothing passed on");
}

#[test]
fn the_second_chance_follows_the_sockets_of_this_host() {
    in_fresh_netns(|| {
        let mut d = decap_for(&["198.51.100.20"]);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();
        let client_port = client.local_addr().unwrap().port();

        // An established socket owns its segments: decapsulated, passed up.
        let established = loopback_tcp(client_port, port, 1, 1, ACK);
        let (action, out) = run(&mut d, &gue4("198.51.100.20", &["198.51.100.34"], &established));
        assert_eq!((action, out), (XDP_PASS, expected(&established, ETH_P_IP)));

        // A SYN is never passed on: a new connection starts here.
        let syn = loopback_tcp(40001, port, 1, 0, SYN);
        let (action, _) = run(&mut d, &gue4("198.51.100.20", &["198.51.100.34"], &syn));
        assert_eq!(action, XDP_PASS);

        // No socket but the listener, and not a SYN-cookie ACK: the
        // connection lives on the alternate. Out again (XDP_TX) to the
        // neighbour it came from, to the alternate, TTL 63, the private data
        // gone (Hlen 0, lengths 8 bytes shorter, checksum redone).
        let stray = loopback_tcp(40002, port, 5, 5, ACK | PSH);
        let input = gue4("198.51.100.20", &["198.51.100.34"], &stray);
        let (action, out) = run(&mut d, &input);
        assert_eq!(action, XDP_TX);
        let mut want = passed_on(&input, [198, 51, 100, 34], &[], &stray);
        want[42..46].copy_from_slice(&[0x00, 0x04, 0x00, 0x00]);
        assert_eq!(out, want);
        // On a VLAN trunk (802.1Q tag, VLAN 100): passed on with its tag.
        let vlan100 = [[0x81, 0x00, 0x00, 0x64]];
        assert_eq!(run(&mut d, &tagged(&input, &vlan100)), (XDP_TX, tagged(&want, &vlan100)));
        // At the alternate, the same packet has no alternate left: passed up.
        let mut again = decap_for(&["198.51.100.34"]);
        let (action, _) = run(&mut again, &out);
        assert_eq!(action, XDP_PASS, "passed on at most once");
        // A balancer from before the ring history wrote count 0 for its one
        // alternate: read as one.
        let mut old = input.clone();
        old[48] = 0;
        let (action, old_out) = run(&mut d, &old);
        assert_eq!((action, old_out), (XDP_TX, out.clone()));

        // Two alternates: the packet goes to the first, which is dropped from
        // the list (count 1, Hlen 2, lengths 4 shorter); from there to the
        // second with no private data left; there it is passed up.
        let input = gue4("198.51.100.20", &["198.51.100.34", "198.51.100.35"], &stray);
        let (action, out) = run(&mut d, &input);
        assert_eq!(action, XDP_TX);
        let mut want = passed_on(&input, [198, 51, 100, 34], &[0x01, 0x04, 0x01, 0x00, 198, 51, 100, 35], &stray);
        want[42..46].copy_from_slice(&[0x02, 0x04, 0x00, 0x00]);
        assert_eq!(out, want);
        let (action, second) = run(&mut again, &out);
        assert_eq!(action, XDP_TX, "no socket at the first alternate either");
        assert_eq!(&second[30..34], &[198, 51, 100, 35]);
        assert_eq!(second[22], 62, "TTL lowered at each hop");
        assert_eq!(&second[42..46], &[0x00, 0x04, 0x00, 0x00], "no private data left");
        assert_eq!(&second[46..], &stray[..]);
        let (action, _) = run(&mut decap_for(&["198.51.100.35"]), &second);
        assert_eq!(action, XDP_PASS, "the last alternate passes it up");

        // A listener with a valid SYN-cookie ACK owns it.
        let cookie_ack = syn_cookie_ack(port);
        let (action, out) = run(&mut d, &gue4("198.51.100.20", &["198.51.100.34"], &cookie_ack));
        assert_eq!((action, out), (XDP_PASS, expected(&cookie_ack, ETH_P_IP)));
        // The same ACK with a wrong acknowledgment number is not a cookie.
        let mut forged = cookie_ack.clone();
        forged[28] ^= 0x55;
        let (action, _) = run(&mut d, &gue4("198.51.100.20", &["198.51.100.34"], &forged));
        assert_eq!(action, XDP_TX);

        // Established, SYN and cookie ACK named an alternate that was not
        // needed; the stray (three times) and the forged ACK were passed on.
        assert_eq!(d.stats().unwrap(), [0, 3, 5], "decapsulated, alternate unused, redirected");
    });
}

/// An ACK that completes a SYN-cookie handshake with the listener on
/// `port`: cookies on for every SYN (tcp_syncookies=2 in this namespace), a
/// SYN sent from a raw socket, the cookie read from the SYN-ACK.
fn syn_cookie_ack(port: u16) -> Vec<u8> {
    std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2").unwrap();
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    assert!(raw >= 0, "raw socket");
    let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const _,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let client_port = 40003u16;
    let mut syn = loopback_tcp(client_port, port, 1000, 0, SYN)[20..].to_vec();
    let sum = tcp_checksum_v4([127, 0, 0, 1], [127, 0, 0, 1], &syn);
    syn[16..18].copy_from_slice(&sum.to_be_bytes());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    };
    let sent = unsafe {
        libc::sendto(
            raw,
            syn.as_ptr() as *const _,
            syn.len(),
            0,
            &to as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(sent, syn.len() as isize);
    let mut buf = [0u8; 1500];
    let cookie = loop {
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        assert!(n > 0, "no SYN-ACK from the listener");
        let tcp = &buf[((buf[0] & 0x0f) as usize * 4)..n as usize];
        let (from, to, flags) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]), tcp[13]);
        if from == port && to == client_port && flags & (SYN | ACK) == SYN | ACK {
            break u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        }
    };
    unsafe { libc::close(raw) };
    loopback_tcp(client_port, port, 1001, cookie.wrapping_add(1), ACK)
}
