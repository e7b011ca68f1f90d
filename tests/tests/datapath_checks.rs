//! End-to-end tests of checks that travel the data path: backends broken
//! in the ways that a check of the backend's own address cannot see (the
//! VIP gone from `lo`, the decap detached, another GUE port), and one
//! that drops the VIP's packets, which the passive signal catches. Each
//! with wrk on new connections through the VIP, and each repaired.
//! Needs root; the lab is built per test.

mod common;

use std::time::Instant;

use common::*;
use lb_lab::*;

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
    let list: serde_json::Value = serde_json::from_str(&ok(lab, i, &["-o", "json", "backend", "list", vip])).unwrap();
    let want = backend_v4(j);
    let row = list.as_array().unwrap().iter().find(|b| b["address"] == want.as_str()).unwrap();
    row["reason"].as_str().unwrap_or_default().to_string()
}

/// Probes of backend `j` of `vip` on LB host `i` so far, and how many
/// failed (from its /metrics).
fn probes(i: usize, vip: &str, j: usize) -> (u64, u64) {
    let page = scrape(i, &[]);
    let labels = format!("backend=\"{}\"", backend_v4(j));
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
    // The same backends behind two VIPs: HTTP checked through the data
    // path, echo checked the plain way (nginx on the backend's address).
    all(lab, &["vip", "add", HTTP4]);
    all(lab, &["vip", "add", ECHO4]);
    add_backends(lab, HTTP4, &DATA_CHECK);
    add_backends(lab, ECHO4, &["--check", "http://lab/", "--interval", "1s", "--timeout", "500ms", "--fall", "2"]);
    wait_checks_pass(HTTP4);
    let (requests, errors, report) = wrk_new_connections("http://203.0.113.10/", 2);
    assert!(requests > 0 && errors == 0, "all backends serve before the break: {report}");

    ns(&backend_ns(2), &["ip", "addr", "del", &format!("{VIP4}/32"), "dev", "lo"]).unwrap();
    let detected = wait_health(lab, HTTP4, 2, "down");
    println!("be2 without the VIP on lo: out of the ring in {detected:?} (interval 1 s, timeout 500 ms, fall 2)");
    for i in 1..=LBS {
        let why = reason(lab, i, HTTP4, 2);
        assert!(why.contains("timed out"), "lb{i} says why: {why}");
        assert_eq!(backend_health(lab, i, ECHO4, 2), "up", "the plain check of be2 cannot see it");
    }
    let (requests, errors, report) = wrk_new_connections("http://203.0.113.10/", 3);
    assert!(requests > 0, "{report}");
    assert_eq!(errors, 0, "no new connection fails once be2 is out: {report}");

    ns(&backend_ns(2), &["ip", "addr", "add", &format!("{VIP4}/32"), "dev", "lo"]).unwrap();
    let back = wait_health(lab, HTTP4, 2, "up");
    println!("be2 repaired: back in {back:?}");
}
