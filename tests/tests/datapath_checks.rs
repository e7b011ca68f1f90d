//! End-to-end tests of checks that travel the data path: backends broken
//! in the ways that a check of the backend's own address cannot see (the
//! VIP gone from `lo`, the decap detached, another GUE port), and one
//! that drops the VIP's packets, which the passive signal catches. Each
//! with wrk on new connections through the VIP, and each repaired.
//! Needs root; the lab is built per test.

mod common;

use std::{
    io::{Read, Write},
    time::Instant,
};

use common::*;
use lb_lab::*;

const HTTPS4: &str = "203.0.113.10:443/tcp";

/// A data-path check: HTTP to the VIP, encapsulated to each backend.
const DATA_CHECK: [&str; 10] =
    ["--check", "http://lab/", "--check-path", "data", "--interval", "1s", "--timeout", "500ms", "--fall", "2"];

/// Both LB hosts report backend `j` of `vip` as `health`.
fn wait_health(lab: &Lab, vip: &str, j: usize, health: &str) -> std::time::Duration {
    let since = Instant::now();
    wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, vip, j) == health))
        .unwrap_or_else(|e| panic!("be{j} of {vip} is not {health} on every LB host: {e}"));
    since.elapsed()
}

/// The reason LB host `i` gives for backend `j` of `vip` being down.
fn reason(lab: &Lab, i: usize, vip: &str, j: usize) -> String {
    backend_row(lab, i, vip, j)["reason"].as_str().unwrap_or_default().to_string()
}

/// Probes of backend `j` of `vip` on LB host `i` so far, and how many
/// failed (from its /metrics).
fn probes(i: usize, vip: &str, j: usize) -> (u64, u64) {
    let page = scrape(i, &[]);
    let labels = format!("backend=\"{}\"", backend_in(vip, j));
    let value = |name: &str| -> u64 {
        page.lines()
            .find(|l| l.starts_with(name) && l.contains(&labels) && l.contains(&format!("vip=\"{vip}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    (value("lb_health_check_duration_seconds_count"), value("lb_health_check_failures"))
}

/// Waits until every backend of `vip` passed its data-path check three
/// times on both LB hosts, none failing: the checks really go through.
fn wait_checks_pass(vip: &str) {
    wait_for(PATIENCE, || (1..=LBS).all(|i| (1..=BACKENDS).all(|j| matches!(probes(i, vip, j), (n, 0) if n >= 3))))
        .unwrap_or_else(|e| {
            let seen: Vec<_> = (1..=BACKENDS).map(|j| probes(1, vip, j)).collect();
            panic!("the data-path checks of {vip} do not pass (probes, failures on lb1: {seen:?}): {e}")
        });
}

/// wrk for `secs` seconds on new connections (Connection: close) to `url`
/// from the client: (requests, errors of any kind, wrk's report).
fn wrk_new_connections(url: &str, secs: u32) -> (u64, u64, String) {
    let out =
        ns(CLIENT_NS, &["wrk", "-t1", "-c4", &format!("-d{secs}s"), "--timeout", "2s", "-H", "Connection: close", url])
            .unwrap();
    let number = |line: &str, key: &str| -> u64 {
        line.split(key).nth(1).map_or(0, |rest| {
            rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap_or(0)
        })
    };
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut errors = 0;
    for line in out.lines() {
        if line.contains("Socket errors:") {
            errors += ["connect", "read", "write", "timeout"].iter().map(|k| number(line, k)).sum::<u64>();
        }
        if line.contains("Non-2xx or 3xx responses:") {
            errors += number(line, "responses:");
        }
    }
    (requests, errors, out)
}

#[test]
fn a_backend_without_the_vip_on_lo_passes_the_plain_check_and_fails_the_data_path_check() {
    let s = lab();
    let lab = &s.lab;
    // The same backends behind four VIPs: HTTP over IPv4 and IPv6 and HTTPS
    // checked through the data path, echo checked the plain way (nginx on
    // the backend's own address).
    for vip in [HTTP4, HTTP6, HTTPS4, ECHO4] {
        all(lab, &["vip", "add", vip]);
    }
    add_backends(lab, HTTP4, &DATA_CHECK);
    add_backends(lab, HTTP6, &DATA_CHECK);
    let https = ["--check", "https://lab/", "--check-ca", BACKEND_CA];
    add_backends(lab, HTTPS4, &[&https[..], &DATA_CHECK[2..]].concat());
    add_backends(lab, ECHO4, &["--check", "http://lab/", "--interval", "1s", "--timeout", "500ms", "--fall", "2"]);
    for i in 1..=LBS {
        assert!(ok(lab, i, &["status"]).contains("data-path checks ready"), "lb{i} runs the probe program");
    }
    wait_checks_pass(HTTP4);
    wait_checks_pass(HTTP6);
    wait_checks_pass(HTTPS4);
    assert_no_errors("all backends serve");

    ns(&backend_ns(2), &["ip", "addr", "del", &format!("{VIP4}/32"), "dev", "lo"]).unwrap();
    ns(&backend_ns(2), &["ip", "addr", "del", &format!("{VIP6}/128"), "dev", "lo"]).unwrap();
    let detected = wait_health(lab, HTTP4, 2, "down");
    println!("be2 without the VIP on lo: out of the ring in {detected:?} (interval 1 s, timeout 500 ms, fall 2)");
    wait_health(lab, HTTP6, 2, "down");
    wait_health(lab, HTTPS4, 2, "down");
    for i in 1..=LBS {
        for vip in [HTTP4, HTTP6, HTTPS4] {
            let why = reason(lab, i, vip, 2);
            assert!(why.contains("timed out"), "lb{i} says why be2 of {vip} is down: {why}");
        }
        assert_eq!(backend_health(lab, i, ECHO4, 2), "up", "the plain check of be2 cannot see it");
    }
    assert_no_errors("be2 out");

    ns(&backend_ns(2), &["ip", "addr", "add", &format!("{VIP4}/32"), "dev", "lo"]).unwrap();
    ns(&backend_ns(2), &["ip", "addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"]).unwrap();
    let back = wait_health(lab, HTTP4, 2, "up");
    println!("be2 repaired: back in {back:?}");
    wait_health(lab, HTTP6, 2, "up");
    wait_health(lab, HTTPS4, 2, "up");
    assert_no_errors("be2 back");
}

/// `lbctl decap ARGS` on backend `j`.
fn decap(lab: &Lab, j: usize, args: &[&str]) {
    let iface = format!("be{j}-eth");
    let mut full = vec!["decap", args[0], iface.as_str()];
    full.extend_from_slice(&args[1..]);
    lab.lbctl_in(&backend_ns(j), &full).unwrap();
}

/// New connections through the VIP for a while: none may fail. wrk does
/// not count a connect that hangs (and stops while one does), so 120 new
/// connections of our own, each giving up after one repeated SYN (3 s),
/// must all get their answer too.
fn assert_no_errors(when: &str) {
    let (requests, errors, report) = wrk_new_connections("http://203.0.113.10/", 3);
    assert!(requests > 0 && errors == 0, "{when}: {requests} requests, {errors} errors: {report}");
    let failed: usize = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                (0..30)
                    .filter(|_| {
                        let answered = try_connect(sock(&client_v4(k), 0), sock(VIP4, 80)).and_then(|mut c| {
                            c.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")?;
                            let mut reply = String::new();
                            c.read_to_string(&mut reply)?;
                            Ok(reply.starts_with("HTTP/1.1 200"))
                        });
                        !matches!(answered, Ok(true))
                    })
                    .count()
            })
        })
        .map(|t| t.join().unwrap())
        .sum();
    assert_eq!(failed, 0, "{when}: {failed} of 120 new connections failed");
}

#[test]
fn a_detached_decap_and_another_gue_port_take_backends_out_in_turn_and_repairs_bring_them_back() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", HTTP4, "--encap", "gue"]);
    add_backends(lab, HTTP4, &DATA_CHECK);
    wait_checks_pass(HTTP4);
    assert_no_errors("all backends serve");

    // Fault 1: be3's decap detached. Its own address still answers.
    decap(lab, 3, &["down"]);
    let detected = wait_health(lab, HTTP4, 3, "down");
    println!("be3 with its decap detached: out in {detected:?}");
    assert_no_errors("be3 out");

    // Fault 2, with be3 still out: be1 decapsulates GUE on another port.
    decap(lab, 1, &["down"]);
    decap(lab, 1, &["up", "--xdp-mode", "native", "--gue-port", "6081"]);
    let detected = wait_health(lab, HTTP4, 1, "down");
    println!("be1 on GUE port 6081 (the LB hosts send to 6080): out in {detected:?}");
    assert_eq!((1..=LBS).map(|i| backend_health(lab, i, HTTP4, 2)).collect::<Vec<_>>(), ["up", "up"]);
    assert_no_errors("be1 and be3 out, be2 serving alone");

    // Repairs, in turn.
    decap(lab, 3, &["up", "--xdp-mode", "native"]);
    let back = wait_health(lab, HTTP4, 3, "up");
    println!("be3's decap attached again: back in {back:?}");
    decap(lab, 1, &["down"]);
    decap(lab, 1, &["up", "--xdp-mode", "native"]);
    let back = wait_health(lab, HTTP4, 1, "up");
    println!("be1 on port 6080 again: back in {back:?}");
    assert_no_errors("all repaired");
    for j in 1..=BACKENDS {
        let (served, _) = (1..=LBS).fold((0, 0), |acc, i| {
            let page = scrape(i, &[]);
            let line = format!("lb_backend_packets_total{{vip=\"{HTTP4}\",backend=\"{}\"}}", backend_v4(j));
            (acc.0 + sample(&page, &line) as u64, acc.1)
        });
        assert!(served > 0, "be{j} takes flows again");
    }
}

#[test]
fn a_backend_that_drops_the_vips_packets_is_ejected_by_the_passive_signal_and_returns_once_repaired() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", HTTP4]);
    // A plain check of the backend's own address (it keeps answering), and
    // the passive signal: 3 client SYN repeats in a 1 s interval take it out.
    let passive = ["--check", "http://lab/", "--interval", "1s", "--timeout", "500ms", "--fall", "2"];
    add_backends(lab, HTTP4, &[&passive[..], &["--eject-syn-repeats", "3"]].concat());
    assert_no_errors("all backends serve");

    // be2 drops every packet to the VIP; its own address keeps answering.
    drop_vip_packets(2);
    let broke = Instant::now();
    // New connections keep coming until be2 is out, 32 at a time; those
    // sent to be2 repeat their SYN after a second, then give up.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|k| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = try_connect(sock(&client_v4(k % 4), 0), sock(VIP4, 80));
                }
            })
        })
        .collect();
    let ejected = wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, HTTP4, 2) == "down"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    ejected.expect("the passive signal takes be2 out on both LB hosts");
    println!("be2 dropping the VIP's packets: ejected in {:?}", broke.elapsed());
    for i in 1..=LBS {
        let why = reason(lab, i, HTTP4, 2);
        assert!(why.contains("passive signal"), "lb{i} says why: {why}");
    }
    assert_no_errors("be2 ejected, still dropping");

    // Repaired during its hold: it returns when the hold ends.
    answer_the_vip(2);
    let back = wait_health(lab, HTTP4, 2, "up");
    println!("be2 repaired: back in {back:?} (hold 10 s, then rise 2 x 1 s)");
    assert_no_errors("be2 back");
}
