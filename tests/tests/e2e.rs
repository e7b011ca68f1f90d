//! End-to-end tests on the lab (tests/lab): real namespaces, veths, XDP in
//! native mode, nginx and an echo server on the backends, everything driven
//! through the `lbctl` CLI as a user would. Needs root. The lab is built
//! for each test and removed after it, also when the test fails.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use lb_lab::*;

/// Every backend on every VIP, on both LB hosts, with `extra` backend args.
fn serve_everything(lab: &Lab, extra: &[&str]) {
    for vip in [HTTP4, ECHO4, UDP4, HTTP6, ECHO6, UDP6] {
        all(lab, &["vip", "add", vip]);
        add_backends(lab, vip, extra);
    }
}

/// One UDP exchange from `src`; returns the backend and the reply's source.
fn udp(src: SocketAddr, dst: SocketAddr) -> (String, SocketAddr) {
    in_ns(CLIENT_NS, move || {
        let s = UdpSocket::bind(src).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.send_to(b"ping", dst).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("no UDP reply {src} -> {dst}: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        (text.split_once(' ').unwrap().0.to_string(), from)
    })
    .unwrap()
}

#[test]
fn tcp_http_and_udp_reach_the_chosen_backend_over_both_families_with_direct_return() {
    let s = lab();
    let lab = &s.lab;
    serve_everything(lab, &[]);
    // The LB hosts neither forward nor own the VIP: replies cannot pass them.
    for i in 1..=LBS {
        assert_eq!(ns(&lb_ns(i), &["sysctl", "-n", "net.ipv4.ip_forward"]).unwrap().trim(), "0");
    }
    let mut seen = HashMap::new();
    for (n, port) in (41000..41024).enumerate() {
        let c = n % 4;
        for (src, vip_addr, echo_vip, udp_vip) in [(client_v4(c), VIP4, ECHO4, UDP4), (client_v6(c), VIP6, ECHO6, UDP6)]
        {
            let client = sock(&src, port).to_string();
            let want = explained(lab, 1, &client, echo_vip);
            assert_eq!(explained(lab, 2, &client, echo_vip), want, "both LB hosts agree");
            let mut stream = connect(sock(&src, port), sock(vip_addr, ECHO_PORT));
            assert_eq!(stream.peer_addr().unwrap().ip().to_string(), vip_addr);
            assert_eq!(echo(&mut stream, "hello"), want, "TCP {client}");
            let want_udp = explained(lab, 1, &client, udp_vip);
            let (got, from) = udp(sock(&src, port), sock(vip_addr, ECHO_PORT));
            assert_eq!(got, want_udp, "UDP {client}");
            assert_eq!(from, sock(vip_addr, ECHO_PORT), "the UDP reply comes from the VIP (DSR)");
            *seen.entry(got).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), BACKENDS, "every backend served some flows: {seen:?}");
    // Real HTTP through nginx, both families.
    for c in 0..4 {
        let body = lab.curl(&client_v4(c), "http://203.0.113.10/").unwrap();
        assert!(body.starts_with("be"), "{body}");
        let body = lab.curl(&client_v6(c), "http://[2001:db8:f::10]/").unwrap();
        assert!(body.starts_with("be"), "{body}");
    }
}

#[test]
fn new_flows_follow_the_weights() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", UDP4]);
    for j in 1..=BACKENDS {
        all(lab, &["backend", "add", UDP4, &backend_v4(j), "--weight", &j.to_string()]);
    }
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    let mut counts = [0usize; BACKENDS + 1];
    let flows = 600;
    for n in 0..flows {
        let (got, _) = udp(sock(&client_v4(n % 4), 20000 + n as u16), sock(VIP4, ECHO_PORT));
        counts[got[2..].parse::<usize>().unwrap()] += 1;
    }
    // Tolerance: each share within 6 percentage points of weight/6 (about
    // four standard deviations of a binomial over 600 flows).
    for (j, count) in counts.iter().enumerate().skip(1) {
        let share = *count as f64 / flows as f64;
        let want = j as f64 / 6.0;
        println!("be{j}: weight {j}, {:.1}% of {flows} flows (weight share {:.1}%)", share * 100.0, want * 100.0);
        assert!((share - want).abs() < 0.06, "be{j}: {share} vs {want}");
    }
}

#[test]
fn a_long_connection_survives_adds_drains_weights_and_another_backend_dying() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    for j in 1..=2 {
        all(
            lab,
            &[
                "backend",
                "add",
                ECHO4,
                &backend_v4(j),
                "--check",
                "http://lab:80/",
                "--interval",
                "1s",
                "--timeout",
                "1s",
                "--fall",
                "2",
            ],
        );
    }
    let mut stream = connect(sock(&client_v4(0), 45000), sock(VIP4, ECHO_PORT));
    let mine = echo(&mut stream, "start");
    let other = if mine == "be1" { 2 } else { 1 };
    type Step<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step> = vec![
        ("add be3", Box::new(|| all(lab, &["backend", "add", ECHO4, &backend_v4(3)]))),
        ("re-weight", Box::new(|| all(lab, &["backend", "set-weight", ECHO4, &backend_v4(3), "5"]))),
        ("delete be3", Box::new(|| all(lab, &["backend", "del", ECHO4, &backend_v4(3)]))),
        ("add be3 again", Box::new(|| all(lab, &["backend", "add", ECHO4, &backend_v4(3)]))),
        ("drain the other", Box::new(move || all(lab, &["backend", "drain", ECHO4, &backend_v4(other)]))),
        ("kill the other", Box::new(move || lab.stop_servers(other).unwrap())),
        (
            "its health check",
            Box::new(move || {
                wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, ECHO4, other) == "down"))
                    .expect("the killed backend is marked down on both LB hosts")
            }),
        ),
    ];
    for (name, step) in steps {
        step();
        assert_eq!(echo(&mut stream, name), mine, "after '{name}' the connection stays on {mine}");
    }
    assert_eq!(backend_health(lab, 1, ECHO4, mine[2..].parse().unwrap()), "up", "ours passes its checks");
    // And our own backend is drained: still ours.
    let own_addr = backend_v4(mine[2..].parse().unwrap());
    all(lab, &["backend", "drain", ECHO4, &own_addr]);
    assert_eq!(echo(&mut stream, "own drained"), mine);
}

#[test]
fn sigkill_of_the_controllers_keeps_a_streaming_connection_and_restart_restores_state() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    for j in 1..=BACKENDS {
        all(lab, &["backend", "add", ECHO4, &backend_v4(j), "--weight", &j.to_string()]);
    }
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    let before = ok(lab, 1, &["backend", "list", ECHO4]);
    let mut stream = connect(sock(&client_v4(0), 49000), sock(VIP4, ECHO_PORT));
    let mine = echo(&mut stream, "0");
    // The connection streams lines until told to stop; the kill and the
    // restart happen while it does, however slow the machine is.
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streamer = {
        let (lines, stop) = (lines.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                assert_eq!(echo(&mut stream, &n.to_string()), mine, "line {n}");
                lines.store(n, std::sync::atomic::Ordering::SeqCst);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let streamed = || lines.load(std::sync::atomic::Ordering::SeqCst);
    let more_lines = |n: usize| {
        let from = streamed();
        wait_for(PATIENCE, || streamed() >= from + n || streamer.is_finished()).unwrap();
    };
    more_lines(5);
    for i in 1..=LBS {
        lab.stop_lb(i, libc::SIGKILL).unwrap();
    }
    more_lines(5);
    for i in 1..=LBS {
        lab.start_lb(i, &[]).unwrap();
    }
    more_lines(5);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    streamer.join().expect("the connection streamed through the kill and restart");
    for i in 1..=LBS {
        let status = ok(lab, i, &["status"]);
        assert!(status.contains("adopted        true"), "{status}");
    }
    let after = ok(lab, 1, &["backend", "list", ECHO4]);
    let strip =
        |t: &str| t.lines().map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
    assert_eq!(strip(&after), strip(&before), "backends restored");
    // A clean stop detaches: no XDP program is left on the LB host; an API
    // client that opened HTTP/2 and never answers does not hold it up.
    let mut idle_client = std::os::unix::net::UnixStream::connect(Lab::socket(1)).unwrap();
    // RFC 9113 3.4: the client preface, then an empty SETTINGS frame
    // (length 0, type 0x4, no flags, stream 0).
    idle_client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
    // The server's preface (a SETTINGS frame: type 0x4 in the 9-octet
    // frame header) says the connection is up, not still being accepted.
    let mut frame_header = [0u8; 9];
    std::io::Read::read_exact(&mut idle_client, &mut frame_header).unwrap();
    assert_eq!(frame_header[3], 0x04, "{frame_header:02x?}");
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    assert!(!ip_link(&lb_ns(1)).contains("prog/xdp"));
    let log = std::fs::read_to_string(format!("{DIR}/lb1.log")).unwrap();
    assert!(log.contains("API clients still connected after the grace"), "{log}");
    drop(idle_client);
}

fn ip_link(name: &str) -> String {
    sh("ip", &["-n", name, "link"]).unwrap()
}

#[test]
fn a_flow_moved_between_lb_hosts_by_the_router_keeps_its_backend() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    add_backends(lab, ECHO4, &[]);
    for p in 0..200u16 {
        let client = sock(&client_v4((p % 4) as usize), 50000 + p).to_string();
        assert_eq!(explained(lab, 1, &client, ECHO4), explained(lab, 2, &client, ECHO4), "{client}");
    }
    // The ring fingerprints say so too, and tell when the hosts differ.
    let fingerprint = |i: usize| {
        let list: serde_json::Value = serde_json::from_str(&ok(lab, i, &["-o", "json", "vip", "list"])).unwrap();
        list[0]["ring_fingerprint"].as_str().unwrap().to_string()
    };
    assert_eq!(fingerprint(1).len(), 16);
    assert_eq!(fingerprint(1), fingerprint(2), "the same backends on both LB hosts");
    ok(lab, 1, &["backend", "set-weight", ECHO4, &backend_v4(1), "2"]);
    assert_ne!(fingerprint(1), fingerprint(2), "lb1 re-weighted, lb2 not");
    let metric = format!("lb_vip_ring_info{{vip=\"{ECHO4}\",fingerprint=\"{}\"}}", fingerprint(1));
    assert_eq!(sample(&scrape(1, &[]), &metric), 1.0);
    ok(lab, 2, &["backend", "set-weight", ECHO4, &backend_v4(1), "2"]);
    assert_eq!(fingerprint(1), fingerprint(2), "the same again");
    // And so do their ring histories (the same change sets on both).
    let history = |i: usize| {
        let list: serde_json::Value = serde_json::from_str(&ok(lab, i, &["-o", "json", "vip", "list"])).unwrap();
        let prints: Vec<&str> =
            list[0]["history_fingerprints"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        prints.join(",")
    };
    assert_eq!(history(1).split(',').count(), 4, "four change sets: {}", history(1));
    assert_eq!(history(1), history(2));
    let metric = format!("lb_vip_history_info{{vip=\"{ECHO4}\",history=\"{}\"}}", history(2));
    assert_eq!(sample(&scrape(2, &[]), &metric), 1.0);
    let pin = |i: usize| lab.route_through(&[i], VIP4).unwrap();
    pin(1);
    let mut stream = connect(sock(&client_v4(3), 51000), sock(VIP4, ECHO_PORT));
    let mine = echo(&mut stream, "via lb1");
    pin(2);
    assert_eq!(echo(&mut stream, "via lb2"), mine);
    assert!(counter(lab, 1, "forwarded") > 0 && counter(lab, 2, "forwarded") > 0, "both LB hosts carried the flow");
}

#[test]
fn traffic_not_for_a_vip_passes_the_lb_host_untouched() {
    let s = lab();
    let lab = &s.lab;
    serve_everything(lab, &[]);
    // Ping the LB host's own address and reach a non-VIP port of its NIC.
    ns(CLIENT_NS, &["ping", "-c", "3", "-i", "0.2", "-W", "2", "198.51.100.2"]).expect("ping through XDP");
    ns(CLIENT_NS, &["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "2001:db8:a1::2"]).expect("ping6 through XDP");
    let stats = ok(lab, 1, &["-o", "json", "stats"]);
    let not_for_us = stats
        .split("\"not_for_us\",\n      \"value\": ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap();
    assert!(not_for_us.parse::<u64>().unwrap() >= 6, "{stats}");
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    all(lab, &["backend", "add", ECHO4, &backend_v4(1)]);
    all(lab, &["vip", "add", ECHO6]);
    let before = (ok(lab, 1, &["-o", "json", "vip", "list"]), ok(lab, 1, &["-o", "json", "backend", "list", ECHO4]));
    let cases: &[(&[&str], &str)] = &[
        (&["vip", "add", "203.0.113.300:80/tcp"], "203.0.113.300:80/tcp"),
        (&["vip", "add", "203.0.113.10:80"], "no protocol"),
        (&["vip", "add", "203.0.113.11:80/tcp", "--ring-size", "65536"], "not a prime"),
        (&["vip", "add", "203.0.113.11:80/tcp", "--ring-size", "2000003"], "larger than the maximum"),
        (&["vip", "add", ECHO4], "already exists"),
        (&["backend", "add", "203.0.113.99:80/tcp", "198.51.100.18"], "no VIP 203.0.113.99:80/tcp"),
        (&["backend", "add", ECHO4, &backend_v4(1)], "already exists"),
        (&["backend", "add", ECHO4, "198.51.100.999"], "198.51.100.999"),
        (&["backend", "add", ECHO4, &backend_v4(2), "--weight", "10001"], "weight 10001"),
        (&["backend", "add", ECHO6, &backend_v4(2)], "is IPv4 but VIP"),
        (&["backend", "add", ECHO4, &backend_v4(2), "--check", "smtp:25"], "smtp:25"),
        (&["backend", "set-weight", ECHO4, &backend_v4(3), "2"], "no backend"),
        (&["explain", "192.0.2.10", ECHO4], "not ADDR:PORT"),
    ];
    for (args, needle) in cases {
        let out = lab.lbctl(1, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lbctl {} should fail", args.join(" "));
        assert!(err.contains(needle), "lbctl {}: {err}", args.join(" "));
    }
    let bad = format!("{DIR}/bad.toml");
    std::fs::write(
        &bad,
        "[[vip]]\nvip = \"203.0.113.10:9000/tcp\"\n\n[[vip.backend]]\naddress = \"198.51.100.18\"\nweight = 99999\n",
    )
    .unwrap();
    let out = lab.lbctl(1, &["apply", "-f", &bad]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 6: weight 99999"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = (ok(lab, 1, &["-o", "json", "vip", "list"]), ok(lab, 1, &["-o", "json", "backend", "list", ECHO4]));
    assert_eq!(after, before, "nothing changed");

    // A good file: the changes are printed, a second apply changes nothing.
    let good = format!("{DIR}/good.toml");
    std::fs::write(
        &good,
        format!("[[vip]]\nvip = \"{ECHO4}\"\n\n[[vip.backend]]\naddress = \"{}\"\nweight = 2\n\n[[vip.backend]]\naddress = \"{}\"\n", backend_v4(1), backend_v4(3)),
    )
    .unwrap();
    let first = ok(lab, 1, &["apply", "-f", &good]);
    assert!(first.contains("- vip [2001:db8:f::10]:9000/tcp"), "{first}");
    assert!(first.contains("~ backend 198.51.100.18 of 203.0.113.10:9000/tcp (weight 2"), "{first}");
    assert!(first.contains("+ backend 198.51.100.50 of 203.0.113.10:9000/tcp"), "{first}");
    assert_eq!(ok(lab, 1, &["apply", "-f", &good]).trim(), "no changes");
}

#[test]
fn the_api_socket_refuses_other_users() {
    let s = lab();
    let lab = &s.lab;
    let meta = std::fs::metadata(Lab::socket(1)).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&lab.lbctl)
        .args(["--socket", &Lab::socket(1), "vip", "add", ECHO4])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied on the controller socket"), "{err}");
    assert!(!ok(lab, 1, &["vip", "list"]).contains("203.0.113.10"), "nothing was added");
}

#[test]
fn the_next_hop_mac_follows_the_neighbour_table() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", HTTP4]);
    add_backends(lab, HTTP4, &[]);
    let mac_of = |i: usize| {
        ok(lab, i, &["status"])
            .lines()
            .find(|l| l.starts_with("next-hop MAC"))
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .to_string()
    };
    let router_mac = |dev: &str| {
        let out = sh("ip", &["-n", ROUTER_NS, "-br", "link", "show", dev]).unwrap();
        out.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(mac_of(1), router_mac("rt-lb1"));
    // The router's NIC is replaced: a new MAC; the LB host's neighbour
    // entry is refreshed (flushed here to make it immediate).
    ns(ROUTER_NS, &["ip", "link", "set", "rt-lb1", "address", "02:00:5e:00:53:01"]).unwrap();
    ns(&lb_ns(1), &["ip", "neigh", "flush", "dev", &lb_iface(1)]).unwrap();
    wait_for(PATIENCE, || mac_of(1) == "02:00:5e:00:53:01").expect("new next-hop MAC picked up");
    lab.route_through(&[1], VIP4).unwrap();
    for c in 0..4 {
        assert!(lab.curl(&client_v4(c), "http://203.0.113.10/").unwrap().starts_with("be"));
    }
}

#[test]
fn a_forced_xdp_mode_that_fails_is_a_clear_error_and_generic_works() {
    let s = lab();
    let lab = &s.lab;
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    let socket = Lab::socket(1);
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lb_ns(1)))
        .arg(&lab.lbctl)
        .args([
            "--socket",
            &socket,
            "up",
            &lb_iface(1),
            "--xdp-mode",
            "offload",
            "--state-dir",
            &format!("{DIR}/state"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "offload on a veth must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lb1-eth cannot offload XDP; use --xdp-mode native"), "{err}");
    assert!(err.contains("the kernel refused to create map"), "{err}");
    assert!(!ip_link(&lb_ns(1)).contains("prog/xdp"), "nothing left attached");
    lab.start_lb(1, &["--xdp-mode", "generic"]).unwrap();
    let status = ok(lab, 1, &["status"]);
    assert!(status.contains("xdp mode       generic"), "{status}");
    assert!(status.contains("lb_balancer (id ") && status.contains("): host (generic mode)"), "{status}");
    assert!(ip_link(&lb_ns(1)).contains("xdpgeneric"));
}

#[test]
fn metrics_count_exactly_the_traffic_sent_and_agree_with_lbctl_stats() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", UDP4]);
    add_backends(lab, UDP4, &["--check", "http://lab:80/", "--interval", "1s", "--timeout", "1s"]);
    // All traffic through lb1, so its counters see every packet.
    lab.route_through(&[1], VIP4).unwrap();
    let scrape = || scrape(1, &[]);
    let vip = format!("{{vip=\"{UDP4}\"}}");
    let before = scrape();
    let sent = 150;
    for n in 0..sent {
        udp(sock(&client_v4(n % 4), 30000 + n as u16), sock(VIP4, ECHO_PORT));
    }
    // Every exchange was answered, so every packet was counted; wait only
    // for each backend's first health probe to be on record.
    wait_for(PATIENCE, || {
        let page = scrape();
        (1..=BACKENDS).all(|j| {
            let labels = format!("{{vip=\"{UDP4}\",backend=\"{}\"}}", backend_v4(j));
            page.contains(&format!("lb_health_check_duration_seconds_count{labels}"))
                && sample(&page, &format!("lb_health_check_duration_seconds_count{labels}")) > 0.0
        })
    })
    .expect("every backend probed");
    let after = scrape();
    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(delta(&format!("lb_vip_packets_total{vip}")), sent as f64, "one inbound packet per exchange (DSR)");
    assert_eq!(delta(&format!("lb_vip_new_flows_total{vip}")), sent as f64, "each source port a new flow");
    assert_eq!(delta(&format!("lb_vip_bytes_total{vip}")), (sent * (20 + 8 + 4)) as f64, "IP length of each ping");
    let backend_sum: f64 = (1..=BACKENDS)
        .map(|j| delta(&format!("lb_backend_packets_total{{vip=\"{UDP4}\",backend=\"{}\"}}", backend_v4(j))))
        .sum();
    assert_eq!(backend_sum, sent as f64);
    assert!(delta("lb_packets_total{outcome=\"forwarded\"}") >= sent as f64);
    assert!(sample(&after, "lb_conn_table_entries") >= sent as f64);
    assert_eq!(sample(&after, "lb_conn_table_capacity"), 262144.0);
    for j in 1..=BACKENDS {
        let labels = format!("{{vip=\"{UDP4}\",backend=\"{}\"}}", backend_v4(j));
        assert_eq!(sample(&after, &format!("lb_backend_up{labels}")), 1.0);
        assert!(sample(&after, &format!("lb_health_check_duration_seconds_count{labels}")) > 0.0);
    }
    assert!(sample(&after, "lb_ring_swaps_total") >= 3.0);
    assert!(after.contains("lb_build_info{version=\""));
    // lbctl stats reads the same maps.
    let stats = ok(lab, 1, &["-o", "json", "stats"]);
    let packets = stats.split("\"packets\": ").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap();
    assert_eq!(packets.parse::<f64>().unwrap(), sample(&scrape(), &format!("lb_vip_packets_total{vip}")));
}

#[test]
fn the_controller_runs_with_only_cap_bpf_net_admin_and_perfmon() {
    let s = lab();
    let lab = &s.lab;
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    // What packaging/lbctl@.service grants: root's uid, three capabilities.
    let caps = "-all,+bpf,+net_admin,+perfmon";
    let socket = Lab::socket(1);
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lb_ns(1)))
        .args(["setpriv", &format!("--bounding-set={caps}"), &format!("--inh-caps={caps}")])
        .arg(&lab.lbctl)
        .args(["--socket", &socket, "up", &lb_iface(1), "--state-dir", &format!("{DIR}/state"), "--metrics", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_for(PATIENCE, || std::path::Path::new(&socket).exists());
    let status = lab.lbctl(1, &["status"]);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exit = child.wait().unwrap();
    up.expect("lbctl up started with the reduced capability set");
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("xdp mode       native"));
    assert!(exit.success(), "clean exit: {exit:?}");
}

#[test]
fn the_debug_switch_logs_packet_decisions_only_while_on() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", UDP4]);
    add_backends(lab, UDP4, &[]);
    lab.route_through(&[1], VIP4).unwrap();
    let decisions = || {
        let log = std::fs::read_to_string(format!("{DIR}/lb1.log")).unwrap();
        log.lines().filter(|l| l.contains("lb decision: outcome 6 action 3")).count()
    };
    udp(sock(&client_v4(0), 33000), sock(VIP4, ECHO_PORT));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(decisions(), 0, "off by default");
    ok(lab, 1, &["debug", "on"]);
    assert!(ok(lab, 1, &["status"]).contains("debug logging  on"));
    for n in 0..3 {
        udp(sock(&client_v4(0), 33001 + n), sock(VIP4, ECHO_PORT));
    }
    wait_for(PATIENCE, || decisions() == 3).expect("three forwarded decisions logged");
    ok(lab, 1, &["debug", "off"]);
    udp(sock(&client_v4(0), 33010), sock(VIP4, ECHO_PORT));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(decisions(), 3, "nothing more once off");
}

#[test]
fn pings_to_a_vip_are_answered_by_the_lb_hosts() {
    let s = lab();
    let lab = &s.lab;
    // Announced, so routed to the LB hosts: a VIP that can serve.
    for vip in [HTTP4, HTTP6] {
        all(lab, &["vip", "add", vip]);
        add_backends(lab, vip, &[]);
    }
    ns(CLIENT_NS, &["ping", "-c", "3", "-i", "0.2", "-W", "2", VIP4]).expect("ping the IPv4 VIP");
    ns(CLIENT_NS, &["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", VIP6]).expect("ping the IPv6 VIP");
    let replied: u64 = (1..=LBS).map(|i| counter(lab, i, "echo_replied")).sum();
    assert_eq!(replied, 6, "the LB hosts answered, no backend was involved");
}

#[test]
fn fragmented_udp_datagrams_are_reassembled_on_one_backend() {
    let s = lab();
    let lab = &s.lab;
    for vip in [UDP4, UDP6] {
        all(lab, &["vip", "add", vip]);
        add_backends(lab, vip, &[]);
    }
    // 3000 bytes over the client's 1400-byte MTU: three fragments, balanced
    // on addresses and protocol; the backend's kernel reassembles them.
    for (n, (src, vip)) in
        [(client_v4(0), VIP4), (client_v4(1), VIP4), (client_v6(0), VIP6), (client_v6(2), VIP6)].into_iter().enumerate()
    {
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + n as u32) as u8).collect();
        let (src, dst) = (sock(&src, 34000 + n as u16), sock(vip, ECHO_PORT));
        let reply = in_ns(CLIENT_NS, move || {
            let s = UdpSocket::bind(src).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.send_to(&data, dst).unwrap();
            let mut buf = vec![0u8; 8192];
            let (len, from) =
                s.recv_from(&mut buf).unwrap_or_else(|e| panic!("no reply to the fragmented datagram from {src}: {e}"));
            buf.truncate(len);
            (buf, from, data)
        })
        .unwrap();
        let (buf, from, data) = reply;
        assert_eq!(from, dst, "the reply comes from the VIP");
        assert!(buf.starts_with(b"be") && buf[3] == b' ', "{:?}", &buf[..8]);
        assert_eq!(&buf[4..], &data[..], "the backend saw the whole datagram");
    }
    let forwarded: u64 = (1..=LBS).map(|i| counter(lab, i, "fragment_forwarded")).sum();
    assert!(forwarded >= 4 * 3, "every fragment went through an LB host: {forwarded}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn hostile_api_input_is_refused_and_the_controller_stays_bounded_and_responsive() {
    use lb_userspace::api::pb::{self, backends_client::BackendsClient, vips_client::VipsClient};
    let s = lab();
    let lab = &s.lab;
    let pid: u32 = std::fs::read_to_string(format!("{DIR}/lb1.pid")).unwrap().trim().parse().unwrap();
    let socket = Lab::socket(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let path = socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://lbctl.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .unwrap();
        let mut vips = VipsClient::new(channel.clone());
        let rss_before = rss_kib(pid);

        // Ten thousand VIPs: the table holds 1024; the rest are refused
        // with a clear status, and nothing half-made stays behind.
        let mut refused = 0;
        for n in 0..10_000u32 {
            let vip = format!("203.0.113.{}:{}/udp", n % 250 + 1, 1000 + n / 250);
            match vips.add_vip(pb::AddVipRequest { vip, ring_size: 251, ..Default::default() }).await {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("VIP slots are in use"), "{}", status.message());
                    refused += 1;
                }
            }
        }
        let listed = vips.list_vips(pb::Empty {}).await.unwrap().into_inner().vips.len();
        assert_eq!((listed, refused), (1024, 10_000 - 1024));
        // A ring size that is too large or not prime.
        for (ring, needle) in [(2_000_003, "larger than the maximum"), (65536, "not a prime")] {
            let err = vips
                .add_vip(pb::AddVipRequest { vip: "203.0.113.251:1/tcp".into(), ring_size: ring, ..Default::default() })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(needle), "{}", err.message());
        }
        // A request over the 4 MiB message limit is refused whole.
        let huge = "# padding\n".repeat(600_000);
        let err = vips.apply(pb::ApplyRequest { toml: huge, dry_run: false }).await.unwrap_err();
        assert!(matches!(err.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange), "{err:?}");
        assert_eq!(vips.list_vips(pb::Empty {}).await.unwrap().into_inner().vips.len(), 1024, "nothing changed");
        let rss_after = rss_kib(pid);
        println!("controller RSS: {rss_before} KiB before, {rss_after} KiB after 10,000 VIP requests");
        assert!(rss_after < rss_before + 200 * 1024, "memory stays bounded");

        // Backends flapping every 100 ms while a client keeps asking.
        let mut backends = BackendsClient::new(channel);
        for j in 1..=2 {
            backends
                .add_backend(pb::AddBackendRequest {
                    vip: "203.0.113.1:1000/udp".into(),
                    address: backend_v4(j),
                    weight: Some(1),
                    health: None,
                    server_id: String::new(),
                })
                .await
                .unwrap();
        }
        for round in 0..30 {
            let weight = (round % 2) as u32;
            backends
                .set_weight(pb::SetWeightRequest { vip: "203.0.113.1:1000/udp".into(), address: backend_v4(1), weight })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(ok(lab, 1, &["status"]).contains("VIPs           1024"), "responsive after all that");
}

#[test]
fn the_tcp_api_takes_only_clients_with_a_certificate_from_its_ca() {
    let s = lab();
    let lab = &s.lab;
    let dir = format!("{DIR}/pki");
    let [ca, server_cert, server_key, client_cert, client_key] = make_pki(&dir, "good");
    let [_, _, _, rogue_cert, rogue_key] = make_pki(&dir, "rogue");
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    lab.start_lb(
        1,
        &["--listen", "127.0.0.1:9443", "--tls-cert", &server_cert, "--tls-key", &server_key, "--tls-ca", &ca],
    )
    .unwrap();
    let over_tcp = |cert: &str, key: &str, args: &[&str]| {
        let mut full =
            vec!["--server", "https://127.0.0.1:9443", "--tls-cert", cert, "--tls-key", key, "--tls-ca", &ca];
        full.extend_from_slice(args);
        lab.lbctl_in(&lb_ns(1), &full)
    };
    // A client with a certificate from the CA: served.
    over_tcp(&client_cert, &client_key, &["vip", "add", ECHO4]).expect("a good client is served");
    // One from another CA, and one with no certificate at all: refused in
    // the handshake, with an error that says so, and nothing changes.
    let err = over_tcp(&rogue_cert, &rogue_key, &["vip", "add", UDP4]).unwrap_err().to_string();
    assert!(err.contains("the server at https://127.0.0.1:9443 refused this client's certificate"), "{err}");
    // A client that does not trust the server's CA refuses the server.
    let [rogue_ca, ..] = make_pki(&dir, "rogue2");
    let distrust = lab.lbctl_in(
        &lb_ns(1),
        &[
            "--server",
            "https://127.0.0.1:9443",
            "--tls-cert",
            &client_cert,
            "--tls-key",
            &client_key,
            "--tls-ca",
            &rogue_ca,
            "vip",
            "add",
            UDP4,
        ],
    );
    let err = distrust.unwrap_err().to_string();
    assert!(err.contains("this client refused the certificate of the server at https://127.0.0.1:9443"), "{err}");
    let no_cert = lab.lbctl_in(&lb_ns(1), &["--server", "https://127.0.0.1:9443", "--tls-ca", &ca, "vip", "add", UDP4]);
    assert!(no_cert.unwrap_err().to_string().contains("needs --tls-cert"));
    // And a raw TLS client without a certificate (not lbctl) is refused too.
    let raw = ns(&lb_ns(1), &["curl", "-sS", "--max-time", "3", "--cacert", &ca, "https://127.0.0.1:9443/"]);
    assert!(raw.is_err(), "a TLS client without a certificate got through: {raw:?}");
    let list = ok(lab, 1, &["vip", "list"]);
    assert!(list.contains(ECHO4) && !list.contains(UDP4), "{list}");
    // --listen without the TLS files is refused at start.
    let out = Command::new(&lab.lbctl).args(["up", "lo", "--listen", "127.0.0.1:9444"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("mutual TLS only"));
}

#[test]
fn metrics_speak_both_formats_head_and_keep_alive_and_pass_promtool() {
    let s = lab();
    let lab = &s.lab;
    serve_everything(lab, &["--check", "http://lab:80/", "--interval", "500ms", "--timeout", "500ms"]);
    for c in 0..4 {
        lab.curl(&client_v4(c), "http://203.0.113.10/").unwrap();
    }
    wait_for(PATIENCE, || scrape(1, &[]).contains("lb_health_check_duration_seconds_count{")).unwrap();
    // The text format 0.0.4 by default, lint-free by Prometheus's own tool.
    let page = scrape(1, &[]);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    promtool.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(page.contains("# TYPE lb_vip_packets_total counter") && !page.contains("# EOF"), "{page}");
    // Headers: content type by Accept; HEAD has the length but no body.
    let head = |accept: &str| scrape(1, &["-sS", "-I", "-H", &format!("Accept: {accept}")]);
    let text_head = head("text/plain;version=0.0.4;q=0.5,*/*;q=0.1");
    assert!(text_head.contains("content-type: text/plain; version=0.0.4"), "{text_head}");
    assert!(text_head.contains("content-length: "), "{text_head}");
    let om_head = head("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
    assert!(om_head.contains("content-type: application/openmetrics-text; version=1.0.0"), "{om_head}");
    let om = scrape(1, &["-H", "Accept: application/openmetrics-text"]);
    assert!(om.contains("# TYPE lb_vip_packets counter") && om.ends_with("# EOF\n"), "{om}");
    // Keep-alive: the second scrape reuses the first one's connection.
    let url = format!("http://{}/metrics", Lab::metrics_addr(1));
    let connects =
        ns(&lb_ns(1), &["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{num_connects} ", &url, &url])
            .unwrap();
    assert_eq!(connects.split_whitespace().collect::<Vec<_>>(), ["1", "0"], "{connects}");
    // Other paths and methods.
    let status = |args: &[&str]| scrape(1, &[&["-o", "/dev/null", "-w", "%{http_code}"], args].concat());
    assert_eq!(status(&["-X", "POST"]), "405");
    let other = format!("http://{}/other", Lab::metrics_addr(1));
    assert_eq!(ns(&lb_ns(1), &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &other]).unwrap(), "404");
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn idle_and_slow_metrics_clients_cannot_exhaust_the_controller_at_1024_open_files() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    add_backends(lab, ECHO4, &["--check", "http://lab:80/", "--interval", "500ms", "--timeout", "500ms"]);
    // The controller under systemd's default soft limit.
    let pid: u32 = std::fs::read_to_string(format!("{DIR}/lb1.pid")).unwrap().trim().parse().unwrap();
    sh("prlimit", &["--pid", &pid.to_string(), "--nofile=1024:"]).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(limits.lines().any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")), "{limits}");
    // This test process needs room for its own 1,500 sockets.
    let raised = libc::rlimit { rlim_cur: 4096, rlim_max: 4096.max(unsafe { hard_nofile() }) };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) }, 0);
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let probes = |page: &str| -> f64 {
        (1..=BACKENDS)
            .map(|j| {
                let labels = format!("{{vip=\"{ECHO4}\",backend=\"{}\"}}", backend_v4(j));
                sample(page, &format!("lb_health_check_duration_seconds_count{labels}"))
            })
            .sum()
    };
    let addr: SocketAddr = Lab::metrics_addr(1).parse().unwrap();
    // 1,500 connections that never send, and one that sends a byte a second.
    let idle = in_ns(&lb_ns(1), move || {
        (0..1500).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()).collect::<Vec<_>>()
    })
    .unwrap();
    assert_eq!(idle.len(), 1500, "every idle connection was made");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let stop = stop.clone();
        let mut conn = in_ns(&lb_ns(1), move || TcpStream::connect(addr).unwrap()).unwrap();
        std::thread::spawn(move || {
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) || conn.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // During: scrapes answer, checks go on, the API answers, the fds stay
    // within the connection cap (each connection task holds one).
    let first = probes(&scrape(1, &[]));
    let mut most_fds = 0;
    for _ in 0..3 {
        let page = scrape(1, &[]);
        assert!(page.contains("lb_build_info"), "a scrape during the flood");
        assert!(ok(lab, 1, &["status"]).contains("VIPs           1"), "the API answers");
        most_fds = most_fds.max(open_fds(pid));
    }
    wait_for(PATIENCE, || probes(&scrape(1, &[])) >= first + 6.0).expect("health checks go on during the flood");
    println!("controller fds: {fds_before} before, at most {most_fds} during 1,500 idle connections");
    assert!(most_fds <= fds_before + lb_userspace::metrics::MAX_CONNECTIONS + 8, "{most_fds} fds");
    assert!(rss_kib(pid) < rss_before + 64 * 1024, "memory stays bounded");
    // After: everything closed, scrapes still answer.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(idle);
    slow.join().unwrap();
    assert!(scrape(1, &[]).contains("lb_build_info"), "a scrape after the flood");
    let health = ok(lab, 1, &["-o", "json", "backend", "list", ECHO4]);
    assert_eq!(health.matches("\"health\": \"up\"").count(), BACKENDS, "{health}");
}

unsafe fn hard_nofile() -> libc::rlim_t {
    let mut now: libc::rlimit = std::mem::zeroed();
    libc::getrlimit(libc::RLIMIT_NOFILE, &mut now);
    now.rlim_max
}

/// Every `expr` of the shipped Grafana dashboard.
fn dashboard_queries() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// LB hosts whose VIPs carried packets in the last minute.
const BOTH_CARRY: &str = "sum by (instance) (rate(lb_vip_packets_total[1m])) > 0";

#[test]
fn a_real_prometheus_scrapes_both_lb_hosts_and_every_dashboard_query_returns_data() {
    let s = lab();
    let lab = &s.lab;
    serve_everything(lab, &["--check", "http://lab:80/", "--interval", "500ms", "--timeout", "500ms"]);
    let url = lab.start_prometheus().unwrap();
    let query = |q: &str| -> serde_json::Value {
        let out = ns(
            CLIENT_NS,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("{url}/api/v1/query"),
                "--data-urlencode",
                &format!("query={q}"),
            ],
        )
        .unwrap();
        let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(reply["status"], "success", "{q}: {out}");
        reply["data"]["result"].clone()
    };
    // Traffic through both LB hosts while Prometheus scrapes them.
    let queries: Vec<String> = dashboard_queries().iter().map(|q| q.replace("$instance", ".*")).collect();
    assert!(queries.len() >= 10, "{queries:?}");
    let mut n = 0u16;
    let mut answered = false;
    let started = Instant::now();
    while started.elapsed() < PATIENCE && !answered {
        for c in 0..4 {
            lab.curl(&client_v4(c), "http://203.0.113.10/").unwrap();
            udp(sock(&client_v4(c), 36000 + n), sock(VIP4, ECHO_PORT));
            n += 1;
        }
        // Until both targets are up, every query has data and the router's
        // ECMP has sent some of the new flows to each LB host.
        let targets = query("up == 1");
        answered = targets.as_array().unwrap().len() == LBS
            && queries.iter().all(|q| !query(q).as_array().unwrap().is_empty())
            && query(BOTH_CARRY).as_array().unwrap().len() == LBS;
    }
    for q in &queries {
        let result = query(q);
        assert!(!result.as_array().unwrap().is_empty(), "dashboard query returned no data: {q}");
    }
    // The rates reflect the traffic sent, from both LB hosts.
    let rates = query(BOTH_CARRY);
    assert_eq!(rates.as_array().unwrap().len(), LBS, "both LB hosts carried traffic: {rates}");
    let per_vip = query(&queries[0]);
    assert!(per_vip.to_string().contains(HTTP4), "{per_vip}");
}

#[test]
fn a_syn_flood_at_a_stateless_vip_leaves_the_conn_table_and_established_connections_alone() {
    let s = lab();
    let lab = &s.lab;
    // A small conn table, and a flood ten times its size.
    for i in 1..=LBS {
        lab.stop_lb(i, libc::SIGTERM).unwrap();
        lab.start_lb(i, &["--conn-table-size", "4096"]).unwrap();
    }
    let streams = streams_on(lab, &["--encap", "gue", "--stateless"], 56000, &[1, 2]);
    let entries = |i: usize| sample(&scrape(i, &[]), "lb_conn_table_entries");
    let before = [entries(1), entries(2)];
    let flood = 40_960;
    in_ns(CLIENT_NS, move || syn_flood(flood)).unwrap();
    streams.more_rounds(5);
    none_broke(streams);
    assert_eq!([entries(1), entries(2)], before, "the flood left no state");
    // Queues on the way may drop some of a burst this size; what counts is
    // that far more SYNs than the table holds reached the LB hosts.
    let new_flows: u64 = (1..=LBS).map(|i| counter(lab, i, "conn_miss")).sum();
    println!("{new_flows} of {flood} flood SYNs balanced by the LB hosts, conn tables unchanged");
    assert!(new_flows > 2 * 4096, "the flood reached the LB hosts: {new_flows}");
}

/// `n` TCP SYNs to the echo VIP from the client's addresses, each from
/// another source port, through a raw socket (RFC 9293 headers by hand).
fn syn_flood(n: u32) {
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    assert!(raw >= 0);
    for k in 0..n {
        if k % 512 == 0 {
            // Bursts the veth queues can take.
            std::thread::sleep(Duration::from_millis(1));
        }
        let src = [192, 0, 2, 10 + (k % 4) as u8];
        let dst = [203, 0, 113, 10];
        let port = 1024 + (k % 60000) as u16;
        let mut tcp = Vec::with_capacity(20);
        tcp.extend_from_slice(&port.to_be_bytes());
        tcp.extend_from_slice(&ECHO_PORT.to_be_bytes());
        tcp.extend_from_slice(&k.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        let sum = lb_tests::tcp_checksum_v4(src, dst, &tcp);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        // A raw TCP socket takes the source the route picks; bind per
        // source address instead with IP_HDRINCL-free sendmsg and pktinfo.
        let mut info: libc::in_pktinfo = unsafe { std::mem::zeroed() };
        info.ipi_spec_dst = libc::in_addr { s_addr: u32::from_ne_bytes(src) };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst) },
            sin_zero: [0; 8],
        };
        let mut iov = libc::iovec { iov_base: tcp.as_mut_ptr() as *mut _, iov_len: tcp.len() };
        let mut cmsg_buf = [0u8; 64];
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &to as *const _ as *mut _;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr() as *mut _;
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as usize;
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::IPPROTO_IP;
            (*cmsg).cmsg_type = libc::IP_PKTINFO;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
            std::ptr::write(libc::CMSG_DATA(cmsg) as *mut libc::in_pktinfo, info);
            assert_eq!(libc::sendmsg(raw, &msg, 0), 20, "sendmsg: {}", std::io::Error::last_os_error());
        }
    }
    unsafe { libc::close(raw) };
}

#[test]
fn sighup_re_applies_the_config_file_and_a_broken_file_changes_nothing() {
    let s = lab();
    let lab = &s.lab;
    let file = format!("{DIR}/lb1.toml");
    let vip_entry =
        |vip: &str| format!("[[vip]]\nvip = \"{vip}\"\n\n[[vip.backend]]\naddress = \"{}\"\n\n", backend_v4(1));
    std::fs::write(&file, vip_entry(ECHO4)).unwrap();
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    let pid = lab.start_lb(1, &["--config", &file]).unwrap() as i32;
    let vips = || ok(lab, 1, &["vip", "list"]);
    assert!(vips().contains(ECHO4) && !vips().contains(UDP4), "{}", vips());
    let log = || std::fs::read_to_string(format!("{DIR}/lb1.log")).unwrap();

    // A changed file, then SIGHUP: applied, the plan in the log.
    std::fs::write(&file, format!("{}{}", vip_entry(ECHO4), vip_entry(UDP4))).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for(PATIENCE, || vips().contains(UDP4)).expect("the new VIP after SIGHUP");
    assert!(log().contains("SIGHUP: re-applying the config file"));
    assert!(log().lines().any(|l| l.contains("config applied") && l.contains(&format!("+ vip {UDP4}"))), "{}", log());

    // A broken file: refused with its line, nothing changes.
    let before = ok(lab, 1, &["-o", "json", "backend", "list", UDP4]);
    std::fs::write(&file, format!("{}{}weight = 99999\n", vip_entry(ECHO4), vip_entry(UDP4))).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for(PATIENCE, || log().contains("config not re-applied")).expect("the refusal is logged");
    let refusal = log().lines().find(|l| l.contains("config not re-applied")).unwrap().to_string();
    assert!(refusal.contains("line 13: weight 99999"), "{refusal}");
    assert_eq!(ok(lab, 1, &["-o", "json", "backend", "list", UDP4]), before, "nothing changed");
    assert!(vips().contains(ECHO4) && vips().contains(UDP4));
}

// Scale-out: the LB hosts announce their VIP addresses through BIRD (eBGP
// with BFD) and the router spreads flows over them (ECMP).

fn table_100(i: usize) -> String {
    ns(&lb_ns(i), &["ip", "route", "show", "table", "100"]).unwrap()
}

fn xdp_attached(i: usize) -> bool {
    ns(&lb_ns(i), &["ip", "link", "show", &lb_iface(i)]).unwrap().contains("prog/xdp")
}

#[test]
fn lb_hosts_announce_exactly_the_vip_addresses_that_can_serve() {
    let s = lab();
    let lab = &s.lab;
    // A route of someone else's in the same table: never touched.
    ns(&lb_ns(1), &["ip", "route", "add", "192.0.2.200/32", "dev", "lo", "table", "100", "proto", "static"]).unwrap();
    all(lab, &["vip", "add", ECHO4]);
    add_backends(lab, ECHO4, &[]);
    assert!(table_100(1).contains("203.0.113.10 dev lo proto 252 scope link"), "{}", table_100(1));
    // A VIP on one LB host only: one next hop.
    ok(lab, 1, &["vip", "add", ECHO6]);
    ok(lab, 1, &["backend", "add", ECHO6, &backend_v6(1)]);
    lab.wait_routes(VIP6, &[1]).unwrap();
    // The VIP's last backend leaves lb1: lb1 withdraws; it comes back.
    for j in 1..=BACKENDS {
        ok(lab, 1, &["backend", "del", ECHO4, &backend_v4(j)]);
    }
    let started = Instant::now();
    lab.wait_routes(VIP4, &[2]).unwrap();
    println!("last backend gone: the router dropped lb1 after {} ms", started.elapsed().as_millis());
    ok(lab, 1, &["backend", "add", ECHO4, &backend_v4(2)]);
    let started = Instant::now();
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    println!("a backend back: the router took lb1 again after {} ms", started.elapsed().as_millis());
    // Weight 0 (or drained) serves no new flow: withdrawn too.
    ok(lab, 1, &["backend", "set-weight", ECHO4, &backend_v4(2), "0"]);
    lab.wait_routes(VIP4, &[2]).unwrap();
    ok(lab, 1, &["backend", "set-weight", ECHO4, &backend_v4(2), "1"]);
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    // Maintenance: out of ECMP while forwarding, and back; said everywhere.
    ok(lab, 2, &["announce", "withdraw"]);
    lab.wait_routes(VIP4, &[1]).unwrap();
    assert!(ok(lab, 2, &["status"]).contains("table 100, withdrawn for maintenance, 0 route(s)"));
    let list = ok(lab, 2, &["vip", "list"]);
    assert!(list.lines().any(|l| l.starts_with(ECHO4) && l.trim_end().ends_with(" no")), "{list}");
    assert_eq!(sample(&scrape(2, &[]), "lb_announce_maintenance"), 1.0);
    ok(lab, 2, &["announce", "restore"]);
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    let announced = ok(lab, 1, &["announce", "status"]);
    assert!(announced.contains("table 100, announcing, 2 route(s)"), "{announced}");
    assert!(announced.contains("2001:db8:f::10"), "{announced}");
    let list = ok(lab, 1, &["vip", "list"]);
    assert!(list.lines().any(|l| l.starts_with(ECHO4) && l.trim_end().ends_with(" yes")), "{list}");
    assert_eq!(sample(&scrape(1, &[]), "lb_route_announced{address=\"203.0.113.10\"}"), 1.0);
    assert!(table_100(1).contains("192.0.2.200 dev lo proto static"), "{}", table_100(1));
    // The graceful stop withdraws only its own routes.
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    assert!(!table_100(1).contains("proto 252"), "{}", table_100(1));
    assert!(table_100(1).contains("192.0.2.200 dev lo proto static"), "{}", table_100(1));
}

#[test]
fn a_graceful_stop_leaves_ecmp_before_detaching_and_breaks_no_connection() {
    let s = lab();
    let lab = &s.lab;
    let streams = streams_on(lab, &[], 57000, &[1, 2]);
    let carried = |i: usize| counter(lab, i, "forwarded");
    assert!(carried(1) > 0 && carried(2) > 0, "both LB hosts carry connections");
    // SIGTERM, then watch: the router must drop lb1 while its program is
    // still attached (forwarding what is still in flight).
    let pid: i32 = std::fs::read_to_string(format!("{DIR}/lb1.pid")).unwrap().trim().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    lab.wait_routes(VIP4, &[2]).unwrap();
    let left_ecmp = started.elapsed();
    assert!(xdp_attached(1), "lb1 detached before the router stopped sending to it");
    lab.stop_lb(1, 0).unwrap();
    println!("lb1 left ECMP {} ms after SIGTERM, then detached", left_ecmp.as_millis());
    assert!(!xdp_attached(1));
    streams.more_rounds(10);
    assert_eq!(none_broke(streams).len(), 40);
}

#[test]
fn bfd_takes_a_cut_lb_host_out_and_every_connection_goes_on_through_the_other() {
    let s = lab();
    let lab = &s.lab;
    let streams = streams_on(lab, &[], 58000, &[1, 2]);
    cut_lb1();
    let started = Instant::now();
    lab.wait_routes(VIP4, &[2]).unwrap();
    println!("BFD: the router dropped the cut lb1 after {} ms", started.elapsed().as_millis());
    streams.more_rounds(10);
    let stall = streams.longest_stall();
    println!("longest stall of a round of all 40 connections: {} ms", stall.as_millis());
    // lb1 comes back: announced again, flows spread again, none breaks.
    heal_lb1();
    let started = Instant::now();
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    println!("lb1 back in ECMP {} ms after the link healed (BGP session set-up)", started.elapsed().as_millis());
    carries_flows_again_and_none_broke(lab, 1, streams);
}

#[test]
fn the_maintenance_command_leaves_ecmp_without_stopping_forwarding() {
    let s = lab();
    let lab = &s.lab;
    let streams = streams_on(lab, &[], 59000, &[1, 2]);
    ok(lab, 2, &["announce", "withdraw"]);
    lab.wait_routes(VIP4, &[1]).unwrap();
    streams.more_rounds(10);
    assert!(xdp_attached(2), "lb2 still has its program attached");
    assert!(ok(lab, 2, &["status"]).contains("withdrawn for maintenance"));
    ok(lab, 2, &["announce", "restore"]);
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    carries_flows_again_and_none_broke(lab, 2, streams);
}

/// LB host `i` is back in ECMP: it carries flows again, and in the end not
/// one connection broke.
fn carries_flows_again_and_none_broke(lab: &Lab, i: usize, streams: Streams) {
    let before = counter(lab, i, "forwarded");
    streams.more_rounds(10);
    assert!(counter(lab, i, "forwarded") > before, "lb{i} carries flows again");
    none_broke(streams);
}

#[test]
fn a_controller_restart_after_sigkill_or_with_keep_never_flaps_the_announcement() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    add_backends(lab, ECHO4, &[]);
    // Watch the router's FIB the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let hops = lb_lab::bird::next_hops(VIP4);
            if hops != [1, 2] {
                seen.push(hops);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    });
    // And traffic through both LB hosts the whole time.
    let streams = Streams::start(8, 60000);
    lab.stop_lb(1, libc::SIGKILL).unwrap();
    assert!(table_100(1).contains("203.0.113.10 dev lo proto 252"), "SIGKILL leaves the route");
    lab.start_lb(1, &["--keep"]).unwrap();
    wait_for(PATIENCE, || ok(lab, 1, &["announce", "status"]).contains("announcing, 1 route(s)")).unwrap();
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    assert!(table_100(1).contains("203.0.113.10 dev lo proto 252"), "--keep leaves the route");
    lab.start_lb(1, &[]).unwrap();
    wait_for(PATIENCE, || ok(lab, 1, &["announce", "status"]).contains("announcing, 1 route(s)")).unwrap();
    streams.more_rounds(5);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    assert!(seen.is_empty(), "the router's next hops changed: {seen:?}");
    none_broke(streams);
}

#[test]
fn the_offload_flavor_alone_forwards_real_traffic_and_the_second_chance_keeps_every_connection() {
    let s = lab();
    let lab = &s.lab;
    // The flavor on the host, in place of the full balancer (a test-only
    // switch: on a NIC it runs in front of the full balancer).
    for i in 1..=LBS {
        lab.stop_lb(i, libc::SIGTERM).unwrap();
        lab.start_lb(i, &["--offload-flavor-on-host"]).unwrap();
    }
    let before = redirected(lab);
    let streams = streams_on(lab, &["--encap", "gue", "--stateless"], 61000, &[1, 2]);
    ring_changes(lab, &streams);
    none_broke(streams);
    assert!(redirected(lab) > before, "the second chance was at work");
    // Counted by the flavor's atomic adds, read by the controller.
    let list: serde_json::Value = serde_json::from_str(&ok(lab, 1, &["-o", "json", "vip", "list"])).unwrap();
    assert!(list[0]["packets"].as_u64().unwrap() > 0, "{list}");
}

/// Runs one frame through a program pinned at `pin`.
fn run_pinned(pin: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let program = aya::programs::Xdp::from_pin(pin, aya_obj::programs::XdpAttachType::Interface).unwrap();
    lb_tests::run_xdp(&program, frame)
}

/// Where the offload flavor sends 100 new TCP flows from a lab client to
/// the HTTP VIP: the backends' addresses (each frame must be forwarded).
fn flavor_backends(pin: &str) -> std::collections::BTreeSet<std::net::IpAddr> {
    (50000..50100u16)
        .map(|port| {
            let input = lb_tests::tcp_frame(&client_v4(0), port, VIP4, 80, lb_tests::SYN);
            let (action, out) = run_pinned(pin, &input);
            assert_eq!(action, lb_tests::XDP_TX, "the flavor forwards the stateless VIP's SYN");
            lb_tests::outer_dst(&out)
        })
        .collect()
}

fn vip_packets(lab: &Lab) -> u64 {
    let list: serde_json::Value = serde_json::from_str(&ok(lab, 1, &["-o", "json", "vip", "list"])).unwrap();
    list[0]["packets"].as_u64().unwrap()
}

#[test]
fn offload_mode_mirrors_every_change_to_the_flavors_maps_and_a_restart_adopts_them() {
    let s = lab();
    let lab = &s.lab;
    let pins = format!("/sys/fs/bpf/lbctl/{}", lb_iface(1));
    let flavor = format!("{pins}/nic/program");
    // `--xdp-mode offload` with the flavor loaded for the host, not the
    // NIC (a test-only switch: a veth takes neither a device-bound load nor
    // a second program beside the full balancer).
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    let up = ["--xdp-mode", "offload", "--offload-without-nic", "--keep"];
    lab.start_lb(1, &up).unwrap();
    let status = ok(lab, 1, &["status"]);
    assert!(status.contains("offload flavor loaded for the host, not attached (test) + native (host)"), "{status}");
    assert!(status.contains("lb_balancer (id ") && status.contains("): host (native mode)"), "{status}");
    // Every change through the API reaches the flavor's maps too.
    ok(lab, 1, &["vip", "add", HTTP4, "--encap", "gue", "--stateless"]);
    for j in 1..=BACKENDS {
        ok(lab, 1, &["backend", "add", HTTP4, &backend_v4(j)]);
    }
    let every: std::collections::BTreeSet<std::net::IpAddr> =
        (1..=BACKENDS).map(|j| backend_v4(j).parse().unwrap()).collect();
    assert_eq!(flavor_backends(&flavor), every);
    ok(lab, 1, &["backend", "del", HTTP4, &backend_v4(1)]);
    let left = flavor_backends(&flavor);
    assert!(!left.is_empty() && !left.contains(&backend_v4(1).parse().unwrap()), "{left:?}");
    // The host's full balancer serves real traffic meanwhile.
    lab.route_through(&[1], VIP4).unwrap();
    assert!(lab.curl(&client_v4(0), "http://203.0.113.10/").unwrap().starts_with("be"));
    // `vip list` counts what both programs forwarded: the flavor's 100
    // test runs on top of the host's packets.
    let before = vip_packets(lab);
    flavor_backends(&flavor);
    assert!(vip_packets(lab) >= before + 100, "the flavor's counters are summed in");
    // A restart reuses the NIC's pinned maps (and brings them up to the
    // host's, which it adopts too): the new flavor forwards as before.
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    assert!(std::path::Path::new(&format!("{pins}/nic/RINGS")).exists(), "--keep leaves the NIC's maps pinned");
    lab.start_lb(1, &up[..3]).unwrap();
    assert!(ok(lab, 1, &["status"]).contains("adopted        true"));
    assert_eq!(flavor_backends(&flavor), left);
    // A stop without --keep leaves nothing pinned, the NIC's maps included.
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    assert!(!std::path::Path::new(&pins).exists(), "{pins} removed");
    assert!(!ip_link(&lb_ns(1)).contains("prog/xdp"), "nothing left attached");
}
