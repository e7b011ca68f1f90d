//! The offload flavor against the full balancer, through BPF_PROG_TEST_RUN:
//! byte for byte the same output on every path the NIC handles (stateless
//! VIPs: GUE and IP-in-IP, IPv4 and IPv6, TCP and UDP, with and without an
//! alternate hop), and XDP_PASS with the frame untouched on every path it
//! leaves to the host, over hand-made frames and the fuzz corpus. And the
//! flavor passes the offload checker; the full balancer does not.

use lb_tests::*;
use lb_userspace::{
    nic, object,
    offload_check::{check_object, Limits},
    services::{Encap, VipAddr, VipSpec},
    HashMode, LoadOptions,
};

/// The full balancer and the flavor, with the same VIPs and backends
/// written in the same order (so the same ids, cookies and rings).
fn pair() -> (Harness, Harness) {
    let opts = |offload_flavor| LoadOptions {
        conn_table_size: 65_536,
        // Five VIPs.
        ring_capacity: 5 * lb_common::RINGS_PER_VIP * lb_common::ring_stride(65_537),
        bench_restore: false,
        offload_flavor,
        pin_dir: None,
    };
    let mut full = Harness::with(opts(false));
    let mut flavor = Harness::with(opts(true));
    for h in [&mut full, &mut flavor] {
        let vip = |h: &mut Harness, vip: &str, encap, stateless| {
            let vip: VipAddr = vip.parse().unwrap();
            h.vip_spec(VipSpec { vip, hash: HashMode::FiveTuple, ring_size: 65537, encap, stateless, quic: None })
        };
        // The fuzz corpus's VIPs: GUE and IP-in-IP stateless ones, one
        // with a conn table (host only).
        let gue4 = vip(h, "203.0.113.10:80/tcp", Encap::Gue, true);
        let ipip4 = vip(h, "203.0.113.10:53/udp", Encap::Ipip, true);
        let gue6 = vip(h, "[2001:db8::10]:443/tcp", Encap::Gue, true);
        let tracked = vip(h, "[2001:db8::10]:53/udp", Encap::Gue, false);
        let udp_gue = vip(h, "203.0.113.20:53/udp", Encap::Gue, true);
        // One backend, then more: the previous ring differs, so TCP
        // packets that are not SYNs carry an alternate.
        for (vip, backends) in [
            (gue4, &["198.51.100.1", "198.51.100.2", "198.51.100.3"][..]),
            (ipip4, &["198.51.100.4", "2001:db8:b4::2"][..]),
            (gue6, &["2001:db8:b1::2", "2001:db8:b2::2"][..]),
            (tracked, &["2001:db8:b3::2"][..]),
            (udp_gue, &["198.51.100.5", "198.51.100.6"][..]),
        ] {
            for b in backends {
                h.backend(&vip, b, 1);
            }
        }
    }
    (full, flavor)
}

/// Runs `input` through both: the flavor forwards it exactly as the full
/// balancer does, or leaves it untouched to the host. Returns the frame the
/// flavor sent, if it forwarded it.
fn same_or_passed(full: &mut Harness, flavor: &mut Harness, input: &[u8]) -> Option<Vec<u8>> {
    let (action, out) = flavor.run(input);
    if action == XDP_PASS {
        assert_eq!(out, input, "passed to the host, but changed");
        return None;
    }
    assert_eq!(action, XDP_TX, "the flavor only forwards or passes");
    let (full_action, full_out) = full.run(input);
    assert_eq!((full_action, &full_out), (XDP_TX, &out), "the flavor and the full balancer differ on {input:02x?}");
    Some(out)
}

#[test]
fn the_flavor_forwards_stateless_vips_byte_for_byte_as_the_full_balancer_and_passes_the_rest() {
    let (mut full, mut flavor) = pair();
    let mut with_alternate = 0;
    for port in 40000..40400u16 {
        let client = ["192.0.2.55", "192.0.2.56"][port as usize % 2];
        for input in [
            tcp_frame(client, port, "203.0.113.10", 80, SYN),
            tcp_frame(client, port, "203.0.113.10", 80, ACK),
            udp_frame(client, port, "203.0.113.10", 53, b"query"),
            udp_frame(client, port, "203.0.113.20", 53, b"query"),
            tcp_frame("2001:db8:c::55", port, "2001:db8::10", 443, ACK | PSH),
            tcp_frame("2001:db8:c::55", port, "2001:db8::10", 443, SYN),
        ] {
            let out = same_or_passed(&mut full, &mut flavor, &input).expect("a stateless VIP's packet is forwarded");
            // GUE with an alternate: Hlen > 0 (the byte after the UDP header).
            let gue_at = if out[12..14] == [0x86, 0xdd] { 14 + 40 + 8 } else { 14 + 20 + 8 };
            if out[23] == 17 || out[20] == 17 {
                with_alternate += (out[gue_at] & 0x1f != 0) as u32;
            }
        }
    }
    assert!(with_alternate > 100, "alternates were exercised: {with_alternate}");
    // Counted by atomic adds in the flavor's plain arrays: each VIP saw 400
    // SYNs and 400 ACKs (TCP) or 400 datagrams (UDP).
    let gue4 = flavor.services.vip(&"203.0.113.10:80/tcp".parse().unwrap()).unwrap().id;
    let udp = flavor.services.vip(&"203.0.113.20:53/udp".parse().unwrap()).unwrap().id;
    assert_eq!(flavor.dp.vip_stats(gue4).unwrap().packets, 2 * 400);
    assert_eq!(flavor.dp.vip_stats(udp).unwrap().packets, 400);
    // The host's paths: a VIP with a conn table, no VIP, echo, fragments,
    // a packet too big for the MTU once encapsulated, ARP.
    let mut big = tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, ACK);
    let payload = vec![0u8; 1480 - 40];
    let ip_len = (40 + payload.len()) as u16;
    big[16..18].copy_from_slice(&ip_len.to_be_bytes());
    big.extend(payload);
    let mut fragment = udp_frame("192.0.2.55", 40000, "203.0.113.10", 53, b"query");
    fragment[20] |= 0x20; // more fragments
    for input in [
        udp_frame("2001:db8:c::55", 40000, "2001:db8::10", 53, b"q"),
        tcp_frame("192.0.2.55", 40000, "203.0.113.99", 80, SYN),
        echo_request_v4("192.0.2.55", "203.0.113.10"),
        fragment,
        big,
    ] {
        assert!(same_or_passed(&mut full, &mut flavor, &input).is_none(), "left to the host: {input:02x?}");
    }
}

#[test]
fn over_the_fuzz_corpus_the_flavor_matches_the_full_balancer_or_passes_untouched() {
    let (mut full, mut flavor) = pair();
    let templates = fuzz_templates();
    let mut rng = XorShift(0x00ff_10ad);
    let (mut forwarded, mut passed) = (0, 0);
    for case in 0..20_000 {
        let input = mutate(&mut rng, &templates[case % templates.len()]);
        if same_or_passed(&mut full, &mut flavor, &input).is_some() {
            forwarded += 1;
        } else {
            passed += 1;
        }
    }
    println!("fuzz corpus: {forwarded} forwarded identically, {passed} passed untouched");
    assert!(forwarded > 1000 && passed > 1000, "both paths exercised: {forwarded} / {passed}");
}

#[test]
fn the_offload_checker_passes_the_flavor_and_refuses_the_full_balancer() {
    let flavor = check_object(object::OFFLOAD, &Limits::default()).unwrap();
    assert_eq!(flavor.len(), 1);
    assert_eq!(flavor[0].violations, vec![], "the flavor is offloadable");
    assert!(flavor[0].helpers.keys().all(|h| [1, 44].contains(h)), "{:?}", flavor[0].helpers);
    let full = check_object(object::BALANCER, &Limits::default()).unwrap();
    assert!(!full[0].violations.is_empty());
}

#[test]
fn the_controller_writes_both_programs_maps_and_a_write_failing_half_way_leaves_them_the_same() {
    let stride = lb_common::ring_stride(65_537);
    // The host's full balancer, already serving a VIP when the NIC's flavor
    // joins: the NIC gets a copy of what the host has.
    let mut h = Harness::with(LoadOptions {
        conn_table_size: 65_536,
        ring_capacity: 2 * lb_common::RINGS_PER_VIP * stride,
        bench_restore: false,
        offload_flavor: false,
        pin_dir: None,
    });
    let spec = |vip: &str| VipSpec {
        vip: vip.parse().unwrap(),
        hash: HashMode::FiveTuple,
        ring_size: 65537,
        encap: Encap::Gue,
        stateless: true,
        quic: None,
    };
    let first = h.vip_spec(spec("203.0.113.10:80/tcp"));
    h.backend(&first, "198.51.100.1", 1);
    // The flavor loaded as `--xdp-mode offload` loads it for a NIC, through
    // the same raw bpf(2) calls, for the host (ifindex 0) so that frames can
    // be run through it; its ring array holds three rings only: the first
    // VIP's two and the one a removal writes.
    let words = 3 * stride / lb_common::RING_SLOTS_PER_WORD;
    let mut nic = nic::load_for_device(0, words, None).unwrap();
    let maps = std::mem::take(&mut nic.maps);
    h.dp.set_mirror(lb_userspace::Dataplane::on_nic(maps).unwrap()).unwrap();
    // A write after the copy reaches both.
    h.backend(&first, "198.51.100.2", 1);
    // Both programs forward the VIP's packets, the same way, to both backends.
    let mut seen = std::collections::BTreeSet::new();
    for port in 40000..40100u16 {
        let input = tcp_frame("192.0.2.55", port, "203.0.113.10", 80, ACK);
        let host = h.run(&input);
        assert_eq!(host, nic.test_run(&input).unwrap(), "port {port}");
        assert_eq!(host.0, XDP_TX);
        seen.insert(outer_dst(&host.1));
    }
    assert_eq!(seen.len(), 2, "both backends: {seen:?}");
    // Counters: the host's and the NIC's, summed (the NIC's BPF_PROG_TEST_RUN
    // runs counted 100 packets; the host's 100 more).
    let first_id = h.services.vip(&first).unwrap().id;
    assert_eq!(h.dp.vip_stats(first_id).unwrap().packets, 200);
    // Removing a backend reaches the NIC first: afterwards neither names it.
    h.services.remove_backend(&mut h.dp, &first, "198.51.100.1".parse().unwrap()).unwrap();
    for port in 40000..40100u16 {
        let input = tcp_frame("192.0.2.55", port, "203.0.113.10", 80, SYN);
        let (action, out) = nic.test_run(&input).unwrap();
        assert_eq!((action, outer_dst(&out)), (XDP_TX, "198.51.100.2".parse().unwrap()), "port {port}");
        assert_eq!(h.run(&input), (action, out));
    }
    // A second VIP: its ring does not fit in the NIC's array, so the
    // backend add fails half way; neither side keeps the backend.
    let second = h.vip_spec(spec("203.0.113.20:80/tcp"));
    let err = h.services.add_backend(
        &mut h.dp,
        &second,
        lb_userspace::BackendSpec { addr: "198.51.100.3".parse().unwrap(), weight: 1, server_id: None },
    );
    assert!(err.is_err(), "the NIC's ring array is full");
    let key = second.key();
    assert_eq!(h.dp.vip(&key).unwrap(), h.dp.mirror().unwrap().vip(&key).unwrap(), "the VIP entries agree");
    assert_eq!(h.dp.vip(&key).unwrap().unwrap().ring_size, 0, "no ring went live");
    for id in 0..8 {
        assert_eq!(h.dp.backend(id).unwrap(), h.dp.mirror().unwrap().backend(id).unwrap(), "backend {id}");
    }
    // The first VIP is untouched on both; the second VIP's packets go to the
    // host on the NIC (no ring) and nowhere new on the host.
    let input = tcp_frame("192.0.2.55", 40000, "203.0.113.10", 80, ACK);
    assert_eq!(h.run(&input), nic.test_run(&input).unwrap());
    let input = tcp_frame("192.0.2.55", 40000, "203.0.113.20", 80, ACK);
    assert_eq!(nic.test_run(&input).unwrap(), (XDP_PASS, input.clone()));
}

/// The id of the XDP program on `iface` (`ip link`'s prog/xdp), if any.
fn xdp_prog_id(iface: &str) -> Option<u32> {
    let out = std::process::Command::new("ip").args(["-d", "link", "show", iface]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("prog/xdp id ")? + "prog/xdp id ".len();
    text[at..].split_whitespace().next()?.parse().ok()
}

#[test]
fn the_nic_attach_is_refused_by_a_veth_in_hardware_mode_and_its_calls_work_in_native_mode() {
    /// Removes the test's pins, also when it fails.
    struct Pins(std::path::PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let pins = Pins(format!("/sys/fs/bpf/lb-test-nic-{}", std::process::id()).into());
    std::fs::create_dir_all(&pins.0).unwrap();
    let link = pins.0.join("link");
    let words = lb_common::RINGS_PER_VIP * lb_common::ring_stride(65_537) / lb_common::RING_SLOTS_PER_WORD;
    in_fresh_netns(|| {
        let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success());
        ip(&["link", "add", "nic-a", "type", "veth", "peer", "name", "nic-b"]);
        ip(&["link", "set", "nic-a", "up"]);
        ip(&["link", "set", "nic-b", "up"]);
        let ifindex = lb_userspace::netlink::if_index("nic-a").unwrap();
        let first = nic::load_for_device(0, words, None).unwrap();
        // Hardware mode: a veth has no offload; nothing attached or pinned.
        let err = first.attach(ifindex, &link).unwrap_err().to_string();
        assert!(err.starts_with("attaching the offload flavor: "), "{err}");
        assert!(!link.exists() && xdp_prog_id("nic-a").is_none());
        // The same calls in native mode: attached behind the pinned link ...
        assert!(!first.attach_with_flags(ifindex, nic::XDP_FLAGS_DRV_MODE, &link).unwrap());
        let first_id = xdp_prog_id("nic-a").expect("attached");
        // ... and a second flavor swapped in behind the same link (a restart).
        let second = nic::load_for_device(0, words, None).unwrap();
        assert!(second.attach_with_flags(ifindex, nic::XDP_FLAGS_DRV_MODE, &link).unwrap());
        let second_id = xdp_prog_id("nic-a").expect("still attached");
        assert_ne!(first_id, second_id, "the program behind the link was replaced");
        // The interface goes and comes back: the pinned link is severed, so
        // the flavor is attached anew.
        ip(&["link", "del", "nic-a"]);
        ip(&["link", "add", "nic-a", "type", "veth", "peer", "name", "nic-b"]);
        ip(&["link", "set", "nic-a", "up"]);
        let ifindex = lb_userspace::netlink::if_index("nic-a").unwrap();
        assert!(!second.attach_with_flags(ifindex, nic::XDP_FLAGS_DRV_MODE, &link).unwrap(), "a new link");
        assert_eq!(xdp_prog_id("nic-a"), Some(second_id));
        // Unpinned, the link goes (the kernel releases it a moment later).
        std::fs::remove_file(&link).unwrap();
        lb_lab::wait_for(lb_lab::PATIENCE, || xdp_prog_id("nic-a").is_none()).expect("detached once unpinned");
    });
}
