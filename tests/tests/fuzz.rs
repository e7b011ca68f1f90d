//! Randomized robustness tests (a bounded slice runs in CI; set
//! LB_FUZZ_ITERATIONS for a longer run). Packets: valid frames for VIPs and
//! non-VIPs, mutated byte by byte, cut and grown, through the real program
//! with BPF_PROG_TEST_RUN. The config parser and the API's validation get
//! mutated text. Deterministic seeds: a failure names the case to replay.

use lb_common::stat;
use lb_tests::*;
use lb_userspace::{desired, HashMode};

fn iterations(default: usize) -> usize {
    std::env::var("LB_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What a forwarded frame must look like: our Ethernet header, a sound outer
/// header to a real backend, the input byte for byte inside.
fn check_encapsulated(input: &[u8], out: &[u8], backends: &[std::net::IpAddr]) -> Result<(), String> {
    if out[..6] != NEXT_HOP_MAC || out[6..12] != input[..6] {
        return Err("Ethernet header not towards the next hop".into());
    }
    let inner_len = match u16::from_be_bytes([input[12], input[13]]) {
        ETH_P_IP => u16::from_be_bytes([input[16], input[17]]) as usize,
        ETH_P_IPV6 => 40 + u16::from_be_bytes([input[18], input[19]]) as usize,
        other => return Err(format!("forwarded a frame of ethertype {other:#06x}")),
    };
    let outer_len = match u16::from_be_bytes([out[12], out[13]]) {
        ETH_P_IP => {
            let h = &out[14..34];
            if h[0] != 0x45 || checksum(h) != 0 || u16::from_be_bytes([h[2], h[3]]) as usize != inner_len + 20 {
                return Err(format!("bad outer IPv4 header {h:02x?}"));
            }
            20
        }
        ETH_P_IPV6 => {
            let h = &out[14..54];
            if h[0] >> 4 != 6 || u16::from_be_bytes([h[4], h[5]]) as usize != inner_len || h[7] != 64 {
                return Err(format!("bad outer IPv6 header {h:02x?}"));
            }
            40
        }
        other => return Err(format!("outer ethertype {other:#06x}")),
    };
    if !backends.contains(&outer_dst(out)) {
        return Err(format!("sent to {}, not a backend", outer_dst(out)));
    }
    if out[14 + outer_len..] != input[14..] {
        return Err("inner packet changed".into());
    }
    Ok(())
}

/// A frame sent back unencapsulated must be an echo reply from a VIP
/// address to the request's sender.
fn check_echo_reply(input: &[u8], out: &[u8]) -> Result<(), String> {
    if out[..6] != input[6..12] || out[6..12] != input[..6] {
        return Err("MACs not swapped".into());
    }
    let (src, dst, reply_type, vip) = match u16::from_be_bytes([input[12], input[13]]) {
        ETH_P_IP if input[23] == 1 => (26..30, 30..34, 0u8, "203.0.113.10".parse::<std::net::IpAddr>().unwrap()),
        ETH_P_IPV6 if input[20] == 58 => (22..38, 38..54, 129u8, "2001:db8::10".parse().unwrap()),
        _ => return Err("sent back a frame that is not an ICMP echo".into()),
    };
    let dst_addr: std::net::IpAddr = if dst.len() == 4 {
        <[u8; 4]>::try_from(&input[dst.clone()]).unwrap().into()
    } else {
        <[u8; 16]>::try_from(&input[dst.clone()]).unwrap().into()
    };
    if dst_addr != vip {
        return Err(format!("answered an echo to {dst_addr}, not a VIP address"));
    }
    if out[src.clone()] != input[dst.clone()] || out[dst] != input[src] {
        return Err("addresses not swapped".into());
    }
    let icmp = if reply_type == 0 { 14 + ((input[14] & 0x0f) as usize) * 4 } else { 54 };
    if out[icmp] != reply_type {
        return Err(format!("reply type {}", out[icmp]));
    }
    if reply_type == 0 && checksum(&out[14..icmp]) != 0 && checksum(&input[14..icmp]) == 0 {
        return Err("a valid IPv4 header checksum was broken".into());
    }
    Ok(())
}

#[test]
fn random_and_mutated_packets_never_misbehave() {
    let mut h = Harness::new();
    let vips = [
        ("203.0.113.10:80/tcp", HashMode::FiveTuple),
        ("203.0.113.10:53/udp", HashMode::SourceIp),
        ("[2001:db8::10]:0/tcp", HashMode::FiveTuple),
        ("[2001:db8::10]:53/udp", HashMode::FiveTuple),
    ];
    let mut backends = Vec::new();
    for (v, hash) in vips {
        let vip = h.vip(v, hash);
        for i in 1..=3 {
            let b = if v.starts_with('[') { format!("2001:db8:1::{i}") } else { format!("198.51.100.{i}") };
            h.backend(&vip, &b, 1);
            backends.push(b.parse().unwrap());
        }
    }
    let vip_ports = |input: &[u8]| -> bool {
        // Whether the (unmutated parts of the) frame still address a VIP:
        // only such frames may be forwarded.
        let (dst, proto, l4, fragment): (std::net::IpAddr, u8, usize, bool) =
            match u16::from_be_bytes([input[12], input[13]]) {
                ETH_P_IP if input.len() >= 34 => (
                    std::net::IpAddr::from(<[u8; 4]>::try_from(&input[30..34]).unwrap()),
                    input[23],
                    14 + ((input[14] & 0x0f) as usize) * 4,
                    u16::from_be_bytes([input[20], input[21]]) & 0x3fff != 0,
                ),
                ETH_P_IPV6 if input.len() >= 62 && input[20] == 44 => {
                    (std::net::IpAddr::from(<[u8; 16]>::try_from(&input[38..54]).unwrap()), input[54], 62, true)
                }
                ETH_P_IPV6 if input.len() >= 54 => {
                    (std::net::IpAddr::from(<[u8; 16]>::try_from(&input[38..54]).unwrap()), input[20], 54, false)
                }
                _ => return false,
            };
        if proto == 1 || proto == 58 {
            // A path-MTU error goes on only if it quotes a VIP flow: the
            // quoted packet left from a VIP address and port.
            let (quoted_src, quoted_proto, quoted_l4): (std::net::IpAddr, u8, usize) = if proto == 1 {
                let q = l4 + 8;
                if input.len() < q + 20 {
                    return false;
                }
                (
                    <[u8; 4]>::try_from(&input[q + 12..q + 16]).unwrap().into(),
                    input[q + 9],
                    q + ((input[q] & 0x0f) as usize) * 4,
                )
            } else {
                let q = l4 + 8;
                if input.len() < q + 40 {
                    return false;
                }
                (<[u8; 16]>::try_from(&input[q + 8..q + 24]).unwrap().into(), input[q + 6], q + 40)
            };
            if input.len() < quoted_l4 + 2 {
                return false;
            }
            let port = u16::from_be_bytes([input[quoted_l4], input[quoted_l4 + 1]]);
            return match (quoted_src.to_string().as_str(), quoted_proto) {
                ("203.0.113.10", 6) => port == 80,
                ("203.0.113.10", 17) => port == 53,
                ("2001:db8::10", 6) => true,
                ("2001:db8::10", 17) => port == 53,
                _ => false,
            };
        }
        if fragment {
            // Balanced on addresses and protocol: any VIP of the pair.
            return matches!(
                (dst.to_string().as_str(), proto),
                ("203.0.113.10", 6) | ("203.0.113.10", 17) | ("2001:db8::10", 6) | ("2001:db8::10", 17)
            );
        }
        if input.len() < l4 + 4 {
            return false;
        }
        let port = u16::from_be_bytes([input[l4 + 2], input[l4 + 3]]);
        match (dst.to_string().as_str(), proto) {
            ("203.0.113.10", 6) => port == 80,
            ("203.0.113.10", 17) => port == 53,
            ("2001:db8::10", 6) => true,
            ("2001:db8::10", 17) => port == 53,
            _ => false,
        }
    };
    let templates = fuzz_templates();
    let n = iterations(30_000);
    let mut rng = XorShift(0xf022_1234_5678_9abc);
    let (mut forwarded, mut echoed) = (0, 0);
    for case in 0..n {
        let input = mutate(&mut rng, &templates[case % templates.len()]);
        let (action, out) = h.run(&input);
        match action {
            XDP_TX if out.len() == input.len() => {
                if let Err(e) = check_echo_reply(&input, &out) {
                    panic!("case {case}: {e}\ninput {input:02x?}\noutput {out:02x?}");
                }
                echoed += 1;
            }
            XDP_TX => {
                assert!(vip_ports(&input), "case {case}: forwarded a frame not for a VIP: {input:02x?}");
                if let Err(e) = check_encapsulated(&input, &out, &backends) {
                    panic!("case {case}: {e}\ninput {input:02x?}\noutput {out:02x?}");
                }
                forwarded += 1;
            }
            XDP_PASS | XDP_DROP => assert_eq!(out, input, "case {case}: a passed or dropped frame was changed"),
            other => panic!("case {case}: action {other}"),
        }
    }
    let g = h.dp.global_stats().unwrap();
    assert_eq!(g[..stat::OUTCOMES].iter().sum::<u64>(), n as u64, "one outcome per packet");
    assert_eq!(g[stat::FORWARDED], forwarded);
    assert_eq!(g[stat::ECHO_REPLIED], echoed);
    println!("fuzz: {n} packets, {forwarded} forwarded, {echoed} echo replies, outcomes {:?}", &g[..stat::OUTCOMES]);
}

#[test]
fn mutated_config_files_and_api_input_are_refused_cleanly() {
    let base = include_str!("../../packaging/etc/lbctl/lbctl.toml");
    let n = iterations(20_000);
    let mut rng = XorShift(0x70a1_c0f1_9000_0001);
    let (mut ok, mut refused) = (0, 0);
    for case in 0..n {
        let mut text: Vec<u8> = base.as_bytes().to_vec();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() as usize) % text.len();
            match rng.next_u64() % 3 {
                0 => text[i] = b"0123456789.:/[]\"=#\n abcxyz-"[(rng.next_u64() % 27) as usize],
                1 => {
                    text.remove(i);
                }
                _ => text.insert(i, rng.next_u64() as u8 % 128),
            }
        }
        let text = String::from_utf8_lossy(&text);
        // Must not panic; errors must say where.
        match desired::parse(&text) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.contains("line") || e.contains("TOML parse error"), "case {case}: {e}");
                refused += 1;
            }
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let word = words.get((rng.next_u64() as usize) % words.len().max(1)).copied().unwrap_or("");
        let _ =
            desired::vip_spec(word.trim_matches('"'), "5tuple", (rng.next_u64() % 70_000) as u32, word, false, None);
        let _ = lb_userspace::health::Probe::parse(word.trim_matches('"'), (rng.next_u64() % 3) as u16);
    }
    println!("config fuzz: {n} files, {ok} accepted, {refused} refused with a located error");
    assert!(refused > 0 && ok > 0);
}
