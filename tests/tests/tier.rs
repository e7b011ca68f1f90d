//! End-to-end tests of a tier of LB hosts whose histories differ: state
//! that survives a clean stop, the declared ring history every host shares
//! (GUE alternates), a host joined empty, and every fault an operator meets
//! in one run with real clients. Needs root; the lab is built per test.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;
use lb_lab::*;

#[test]
fn gue_second_chance_keeps_every_connection_through_ring_changes_on_a_stateless_vip() {
    let s = lab();
    let lab = &s.lab;
    let streams = streams_on(lab, &["--encap", "gue", "--stateless"], 52000, &[1, 2]);
    ring_changes(lab, &streams);
    let results = none_broke(streams);
    let on = |b: &str| results.iter().filter(|r| *r == b).count();
    println!("40 connections: {} on be1 (removed), {} on be2; {} redirected", on("be1"), on("be2"), redirected(lab));
    assert!(on("be1") > 0 && on("be2") > 0, "connections on both first backends");
    assert!(redirected(lab) > 0, "the backends passed packets on to their alternates");
    assert_eq!(counter(lab, 1, "conn_hit") + counter(lab, 2, "conn_hit"), 0, "a stateless VIP never hits the table");
    // explain names the removed be1 among the alternates of a connection
    // left on it, and the metrics count the packets that carried one.
    let k = results.iter().position(|r| r == "be1").unwrap();
    let client = sock(&client_v4(k % 4), 52000 + k as u16).to_string();
    let explained = ok(lab, 1, &["explain", &client, ECHO4]);
    let hops = explained.lines().find(|l| l.contains("alternate hop")).unwrap_or_else(|| panic!("{explained}"));
    assert!(hops.contains(&backend_v4(1)), "{explained}");
    let alternates: f64 = (1..=LBS).map(|i| sample(&scrape(i, &[]), "lb_gue_alternate_total")).sum();
    assert!(alternates > 0.0, "lb_gue_alternate_total");
    let list = ok(lab, 1, &["vip", "list"]);
    assert!(list.lines().any(|l| l.contains(ECHO4) && l.contains(" gue ") && l.contains(" stateless ")), "{list}");
}

/// The ring changes with every flow through lb1, then every flow moved to
/// lb2 (whose conn table never saw them); returns the connections' results.
fn changes_then_ecmp_move(lab: &Lab, vip_args: &[&str], first_port: u16) -> Vec<Result<String, String>> {
    let streams = streams_on(lab, vip_args, first_port, &[1]);
    ring_changes(lab, &streams);
    lab.route_through(&[2], VIP4).unwrap();
    streams.more_rounds(5);
    streams.finish()
}

#[test]
fn gue_second_chance_keeps_connections_moved_to_another_lb_host_after_ring_changes() {
    for (vip_args, port) in [(&["--encap", "gue"][..], 53000), (&["--encap", "gue", "--stateless"][..], 54000)] {
        let s = lab();
        let results = changes_then_ecmp_move(&s.lab, vip_args, port);
        let broken = broken(&results);
        println!("{vip_args:?}: {} of 40 connections broke after the changes and the move", broken.len());
        assert!(broken.is_empty(), "{vip_args:?}: {broken:#?}");
    }
    // The baseline: IP-in-IP, where lb2 can only follow its ring.
    let s = lab();
    let results = changes_then_ecmp_move(&s.lab, &[], 55000);
    println!("IP-in-IP baseline: {} of 40 connections broke after the changes and the move", broken(&results).len());
}

/// The echo VIP with `vip_args` on both LB hosts, its backends added one API
/// call at a time (each a declared generation: the youngest rings there
/// are), traffic through both LB hosts.
fn young_tier(lab: &Lab, vip_args: &[&str], backend_args: &[&str]) {
    let mut args = vec!["vip", "add", ECHO4];
    args.extend_from_slice(vip_args);
    all(lab, &args);
    for j in 1..=BACKENDS {
        let addr = backend_v4(j);
        let mut args = vec!["backend", "add", ECHO4, &addr];
        args.extend_from_slice(backend_args);
        all(lab, &args);
    }
    lab.route_through(&[1, 2], VIP4).unwrap();
}

/// The tier's desired state as `young_tier` and `weights` (be1, be2, be3)
/// made it, as a file for `lbctl apply` and `up --config`.
fn tier_toml(vip_args: &[&str], weights: [u32; 3], check: &str) -> String {
    let encap = if vip_args.contains(&"gue") { "gue" } else { "ipip" };
    let stateless = vip_args.contains(&"--stateless");
    let mut text = format!("[[vip]]\nvip = \"{ECHO4}\"\nencap = \"{encap}\"\nstateless = {stateless}\n");
    for (j, weight) in (1..=BACKENDS).zip(weights) {
        text += &format!("\n[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\n{check}", backend_v4(j));
    }
    let path = format!("{DIR}/tier.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The VIP list of LB host `i` without its counters: what two hosts that
/// agree have in common.
fn vip_identity(lab: &Lab, i: usize) -> Vec<String> {
    let list: serde_json::Value = serde_json::from_str(&ok(lab, i, &["-o", "json", "vip", "list"])).unwrap();
    let keys = ["vip", "hash", "ring_size", "encap", "stateless", "ring_fingerprint", "history_fingerprints"];
    list.as_array().unwrap().iter().map(|v| keys.map(|k| format!("{k}={}", v[k])).join(" ")).collect()
}

#[test]
fn moved_connections_keep_their_backend_however_young_the_ring_and_after_two_changes_a_second_apart() {
    let mut port = 20000;
    for vip_args in [&["--encap", "gue"][..], &["--encap", "gue", "--stateless"][..], &[][..]] {
        for changes in [1, 2] {
            if vip_args.is_empty() && changes == 2 {
                continue;
            }
            let s = lab();
            let lab = &s.lab;
            young_tier(lab, vip_args, &[]);
            // 80 connections opened at once on rings only moments old.
            let streams = Streams::start(80, port);
            port += 100;
            streams.more_rounds(2);
            all(lab, &["backend", "set-weight", ECHO4, &backend_v4(2), "2"]);
            if changes == 2 {
                // As a flapping check or a quick correction does.
                std::thread::sleep(Duration::from_secs(1));
                all(lab, &["backend", "set-weight", ECHO4, &backend_v4(3), "3"]);
            }
            streams.more_rounds(3);
            lab.route_through(&[2], VIP4).unwrap();
            streams.more_rounds(5);
            let results = streams.finish();
            let broken = broken(&results);
            println!(
                "{vip_args:?}, {changes} ring change(s), then every flow moved to lb2: {} of 80 connections broke{}",
                broken.len(),
                if vip_args.is_empty() { " (IP-in-IP baseline, not asserted)" } else { "" }
            );
            if !vip_args.is_empty() {
                assert!(broken.is_empty(), "{vip_args:?}, {changes} change(s): {broken:#?}");
            }
        }
    }
}

#[test]
fn a_clean_stop_keeps_every_vip_backend_drain_and_maintenance_added_through_the_api() {
    let s = lab();
    let lab = &s.lab;
    ok(lab, 1, &["vip", "add", ECHO4, "--encap", "gue"]);
    ok(lab, 1, &["vip", "add", HTTP4, "--hash", "src-ip"]);
    for j in 1..=BACKENDS {
        let addr = backend_v4(j);
        ok(lab, 1, &["backend", "add", ECHO4, &addr, "--check", "tcp:80", "--interval", "500ms", "--timeout", "500ms"]);
        ok(lab, 1, &["backend", "add", HTTP4, &addr]);
    }
    ok(lab, 1, &["backend", "set-weight", ECHO4, &backend_v4(2), "3"]);
    ok(lab, 1, &["backend", "drain", HTTP4, &backend_v4(3)]);
    // Two backends added and removed: the history names them, retired.
    for gone in ["198.51.100.201", "198.51.100.202"] {
        ok(lab, 1, &["backend", "add", HTTP4, gone]);
        ok(lab, 1, &["backend", "del", HTTP4, gone]);
    }
    ok(lab, 1, &["announce", "withdraw"]);
    let backends = |i: usize| {
        [ECHO4, HTTP4].map(|vip| {
            let list: serde_json::Value =
                serde_json::from_str(&ok(lab, i, &["-o", "json", "backend", "list", vip])).unwrap();
            let keys = ["vip", "address", "weight", "drained", "check", "in_ring"];
            list.as_array().unwrap().iter().map(|b| keys.map(|k| format!("{k}={}", b[k])).join(" ")).collect::<Vec<_>>()
        })
    };
    let (vips, before) = (vip_identity(lab, 1), backends(1));
    assert_eq!(vips.len(), 2);
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    lab.start_lb(1, &[]).unwrap();
    assert_eq!(vip_identity(lab, 1), vips, "the same VIPs, rings and ring history");
    assert_eq!(backends(1), before, "the same backends, weights, drains and checks");
    let status = ok(lab, 1, &["status"]);
    assert!(status.contains("withdrawn for maintenance"), "maintenance survives: {status}");
    let log = std::fs::read_to_string(format!("{DIR}/lb1.log")).unwrap();
    assert!(log.contains("saved state replayed"), "{log}");
    // Announced again on request, and it serves.
    ok(lab, 1, &["announce", "restore"]);
    lab.wait_routes(VIP4, &[1]).unwrap();
    let mut c = connect(sock(&client_v4(0), 21000), sock(VIP4, ECHO_PORT));
    echo(&mut c, "after a clean restart");
}

#[test]
fn an_upgrade_across_a_map_layout_change_replays_the_old_releases_state_file() {
    let s = lab();
    let lab = &s.lab;
    // A state file the previous layout's lbctl wrote (layout 3, before the
    // ring history): a GUE VIP with checked backends, one re-weighted, and
    // an IP-in-IP VIP with a drained backend. Stopped cleanly, upgraded.
    lab.stop_lb(1, libc::SIGTERM).unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/state-layout-3.json");
    std::fs::copy(fixture, format!("{DIR}/state/{}.json", lb_iface(1))).unwrap();
    lab.start_lb(1, &[]).unwrap();
    let list: serde_json::Value = serde_json::from_str(&ok(lab, 1, &["-o", "json", "backend", "list", ECHO4])).unwrap();
    let rows: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("{} {} {} {}", b["address"], b["weight"], b["drained"], b["check"]))
        .collect();
    let want: Vec<String> = (1..=BACKENDS)
        .map(|j| format!("\"{}\" {} false \"tcp:80\"", backend_v4(j), if j == 2 { 3 } else { 1 }))
        .collect();
    assert_eq!(rows, want);
    let http = ok(lab, 1, &["backend", "list", HTTP4]);
    assert!(http.lines().any(|l| l.contains(&backend_v4(3)) && l.contains("drained")), "{http}");
    let log = std::fs::read_to_string(format!("{DIR}/lb1.log")).unwrap();
    assert!(log.contains("saved state replayed"), "{log}");
    // The old file's "down" verdicts (its host had no route to the
    // backends) hold until this lab's checks bring them up; then it serves.
    wait_for(PATIENCE, || (1..=BACKENDS).all(|j| backend_health(lab, 1, ECHO4, j) == "up")).unwrap();
    lab.route_through(&[1], VIP4).unwrap();
    let mut c = connect(sock(&client_v4(1), 21100), sock(VIP4, ECHO_PORT));
    echo(&mut c, "after the upgrade");
    // The next save is in this release's layout.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/state/{}.json", lb_iface(1))).unwrap()).unwrap();
    assert_eq!(saved["layout"], 7);
}

#[test]
fn under_ip_netns_exec_lbctl_up_refuses_pins_that_would_vanish_and_says_what_to_do() {
    let s = lab();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lb_ns(1), s.lab.lbctl.to_str().unwrap()])
        .args(["--socket", &format!("{DIR}/netns-exec.sock"), "up", "lo", "--metrics", "off"])
        .args(["--state-dir", &format!("{DIR}/netns-exec"), "--pin-dir", "/sys/fs/bpf/lbctl-netns-exec"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("mount namespace of its own") && stderr.contains("nsenter --net="), "{stderr}");
}

#[test]
fn an_empty_lb_host_joined_with_the_tiers_history_forwards_every_moved_connection() {
    for vip_args in [&["--encap", "gue"][..], &["--encap", "gue", "--stateless"][..]] {
        let s = lab();
        let lab = &s.lab;
        young_tier(lab, vip_args, &[]);
        let streams = Streams::start(80, 22000);
        streams.more_rounds(2);
        all(lab, &["backend", "set-weight", ECHO4, &backend_v4(2), "2"]);
        streams.more_rounds(2);
        // lb2 is replaced by a host with an empty state directory.
        lab.stop_lb(2, libc::SIGTERM).unwrap();
        std::fs::remove_file(format!("{DIR}/state/{}.json", lb_iface(2))).unwrap();
        // The README's procedures: the peer's history, the same desired state.
        let history = format!("{DIR}/history.json");
        std::fs::write(&history, ok(lab, 1, &["history", "export"])).unwrap();
        if vip_args.contains(&"--stateless") {
            // A tier driven by API calls: start withdrawn, make the calls,
            // import the history, compare, announce.
            lab.start_lb(2, &["--withdrawn"]).unwrap();
            let refused = |why: &str| {
                let out = lab.lbctl(2, &["history", "import", &history]);
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(!out.status.success() && stderr.contains(why), "{stderr}");
            };
            refused("no VIP");
            let mut args = vec!["vip", "add", ECHO4];
            args.extend_from_slice(vip_args);
            ok(lab, 2, &args);
            refused("apply the same desired state first");
            for (j, weight) in [(1, "1"), (2, "2"), (3, "1")] {
                ok(lab, 2, &["backend", "add", ECHO4, &backend_v4(j), "--weight", weight]);
            }
            assert_ne!(vip_identity(lab, 2), vip_identity(lab, 1), "other change sets, another history");
            ok(lab, 2, &["history", "import", &history]);
            assert!(ok(lab, 2, &["status"]).contains("withdrawn for maintenance"));
            assert_eq!(vip_identity(lab, 2), vip_identity(lab, 1), "the hosts agree: rings and history");
            ok(lab, 2, &["announce", "restore"]);
        } else {
            let toml = tier_toml(vip_args, [1, 2, 1], "");
            lab.start_lb(2, &["--config", &toml, "--join", &history]).unwrap();
            assert_eq!(vip_identity(lab, 2), vip_identity(lab, 1), "the hosts agree: rings and history");
        }
        lab.wait_routes(VIP4, &[1, 2]).unwrap();
        streams.more_rounds(3);
        lab.route_through(&[2], VIP4).unwrap();
        streams.more_rounds(5);
        let results = streams.finish();
        let broken = broken(&results);
        println!("{vip_args:?}: a new lb2 joined, every flow moved to it: {} of 80 connections broke", broken.len());
        assert!(broken.is_empty(), "{vip_args:?}: {broken:#?}");
    }
}

/// New connections from the four client addresses, on two threads, each
/// echoing one line, until stopped. Each failure is kept with the fault
/// under way at the time.
struct NewConnections {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    fault: Arc<Mutex<String>>,
    workers: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl NewConnections {
    fn start() -> NewConnections {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let fault = Arc::new(Mutex::new("none".to_string()));
        let workers = (0..2u64)
            .map(|worker| {
                let (stop, made, fault) = (stop.clone(), made.clone(), fault.clone());
                std::thread::spawn(move || {
                    in_ns(CLIENT_NS, move || {
                        let mut failures = Vec::new();
                        let mut n = worker;
                        while !stop.load(Ordering::SeqCst) {
                            let src = sock(&client_v4((n % 4) as usize), 0);
                            if let Err(e) = one_exchange(src, n) {
                                failures.push(format!("during '{}': {src}: {e}", fault.lock().unwrap()));
                            }
                            n += 2;
                            made.fetch_add(1, Ordering::SeqCst);
                        }
                        failures
                    })
                    .unwrap()
                })
            })
            .collect();
        NewConnections { stop, made, fault, workers }
    }

    fn during(&self, fault: &str) {
        println!("fault: {fault}");
        *self.fault.lock().unwrap() = fault.to_string();
    }

    /// Stops; returns how many connections were made and the failures.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        (self.made.load(Ordering::SeqCst), failures)
    }
}

/// One new connection to the echo VIP: connect, a line echoed, a close
/// without TIME_WAIT (an RST), so that tens of thousands fit.
fn one_exchange(src: SocketAddr, n: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let socket = libc_socket(libc::AF_INET);
    // A SYN lost to a fault is sent again (1 s, 3 s); no more.
    set_syn_retries(&socket, 2);
    let mut c = bind_and_connect(socket, src, sock(VIP4, ECHO_PORT))?;
    let line = format!("new {n}");
    c.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&mut c).read_line(&mut reply)?;
    if !reply.trim_end().ends_with(&format!(" {line}")) {
        return Err(std::io::Error::other(format!("echo {reply:?}")));
    }
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const _,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    Ok(())
}

/// Waits until every LB host of `hosts` sees be3 of ECHO4 `health`.
fn wait_health(lab: &Lab, hosts: &[usize], health: &str) {
    wait_for(PATIENCE, || hosts.iter().all(|&i| backend_health(lab, i, ECHO4, 3) == health))
        .unwrap_or_else(|_| panic!("be3 is not {health} on LB hosts {hosts:?}"));
}

/// Serving on LB host `i` again after a start: its controller answers and
/// the router sends it flows.
fn serving_again(lab: &Lab, i: usize) {
    wait_for(PATIENCE, || ok(lab, i, &["announce", "status"]).contains("announcing, 1 route(s)")).unwrap();
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
}

/// Every fault of the tier, one after another, while 40 long-lived
/// connections stream and new ones open all along. Returns the broken
/// long-lived connections, the new connections made and their failures.
fn chaos(lab: &Lab, vip_args: &[&str], first_port: u16) -> (Vec<String>, u64, Vec<String>) {
    let check = ["--check", "tcp:80", "--interval", "300ms", "--timeout", "300ms", "--rise", "2", "--fall", "2"];
    young_tier(lab, vip_args, &check);
    let check_toml = "check = \"tcp:80\"\ninterval = \"300ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2\n";
    let streams = Streams::start(40, first_port);
    let fresh = NewConnections::start();
    streams.more_rounds(3);

    fresh.during("re-weight on both");
    all(lab, &["backend", "set-weight", ECHO4, &backend_v4(2), "2"]);
    streams.more_rounds(3);

    fresh.during("lb1 SIGKILL, started again");
    lab.stop_lb(1, libc::SIGKILL).unwrap();
    lab.start_lb(1, &[]).unwrap();
    serving_again(lab, 1);
    streams.more_rounds(3);

    fresh.during("lb2 SIGTERM, started again, its desired state applied again");
    lab.stop_lb(2, libc::SIGTERM).unwrap();
    lab.start_lb(2, &[]).unwrap();
    let toml = tier_toml(vip_args, [1, 2, 1], check_toml);
    assert!(ok(lab, 2, &["apply", "-f", &toml]).contains("no changes"), "the replayed state is the desired one");
    serving_again(lab, 2);
    streams.more_rounds(3);

    fresh.during("lb1 cut off in the router (BFD)");
    cut_lb1();
    lab.wait_routes(VIP4, &[2]).unwrap();
    streams.more_rounds(3);
    fresh.during("lb1 healed");
    heal_lb1();
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    streams.more_rounds(3);

    fresh.during("BIRD on lb2 killed");
    bird::kill_lb(2, libc::SIGKILL);
    lab.wait_routes(VIP4, &[1]).unwrap();
    streams.more_rounds(3);
    fresh.during("BIRD on lb2 started again");
    bird::start_lb(2).unwrap();
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    streams.more_rounds(3);

    fresh.during("be3's health port blocked");
    let block = |name: &str, from: &str| {
        let rule = format!(
            "table inet {name} {{\n  chain input {{\n    type filter hook input priority 0;\n    \
             {from} tcp dport 80 ip daddr {} drop;\n  }}\n}}\n",
            backend_v4(3)
        );
        nft(&backend_ns(3), name, &rule);
    };
    block("health", "");
    wait_health(lab, &[1, 2], "down");
    streams.more_rounds(3);
    fresh.during("be3's health port unblocked");
    ns(&backend_ns(3), &["nft", "delete", "table", "inet", "health"]).unwrap();
    wait_health(lab, &[1, 2], "up");
    streams.more_rounds(3);

    fresh.during("be3's checks from lb1 blocked: the hosts disagree; lb2 withdrawn and restored meanwhile");
    block("disagree", "ip saddr 198.51.100.2");
    wait_health(lab, &[1], "down");
    wait_health(lab, &[2], "up");
    ok(lab, 2, &["announce", "withdraw"]);
    lab.wait_routes(VIP4, &[1]).unwrap();
    streams.more_rounds(3);
    ok(lab, 2, &["announce", "restore"]);
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    streams.more_rounds(3);
    fresh.during("be3's checks from lb1 unblocked");
    ns(&backend_ns(3), &["nft", "delete", "table", "inet", "disagree"]).unwrap();
    wait_health(lab, &[1, 2], "up");
    streams.more_rounds(3);

    fresh.during("lb1 in maintenance, a re-weight, lb1 restored");
    ok(lab, 1, &["announce", "withdraw"]);
    lab.wait_routes(VIP4, &[2]).unwrap();
    all(lab, &["backend", "set-weight", ECHO4, &backend_v4(2), "1"]);
    streams.more_rounds(3);
    ok(lab, 1, &["announce", "restore"]);
    lab.wait_routes(VIP4, &[1, 2]).unwrap();
    streams.more_rounds(3);

    fresh.during("after the faults");
    streams.more_rounds(3);
    let (made, failures) = fresh.finish();
    let broken = broken(&streams.finish()).into_iter().cloned().collect();
    (broken, made, failures)
}

#[test]
fn chaos_every_fault_in_sequence_breaks_no_connection_on_gue_vips() {
    let mut port = 23000;
    for vip_args in [&["--encap", "gue"][..], &["--encap", "gue", "--stateless"][..], &[][..]] {
        let s = lab();
        let started = Instant::now();
        let (broken, made, failures) = chaos(&s.lab, vip_args, port);
        port += 100;
        println!(
            "{vip_args:?}: {} of 40 long-lived connections broke; {} of {made} new connections failed ({} s){}",
            broken.len(),
            failures.len(),
            started.elapsed().as_secs(),
            if vip_args.is_empty() { " (IP-in-IP baseline, not asserted)" } else { "" }
        );
        for f in failures.iter().take(10) {
            println!("  {f}");
        }
        if !vip_args.is_empty() {
            assert!(broken.is_empty(), "{vip_args:?}: broken long-lived connections: {broken:#?}");
            assert!(failures.is_empty(), "{vip_args:?}: new connections failed: {failures:#?}");
            assert!(made > 1000, "new connections were made all along: {made}");
        }
    }
}
