//! End-to-end tests of health: active checks (TCP, HTTP, HTTPS with a
//! CA or a pinned certificate), failing open, and the passive signal of
//! SYNs that come again. Needs root; the lab is built per test.

mod common;

use std::time::Instant;

use common::*;
use lb_lab::*;

#[test]
fn a_dead_backend_leaves_after_fall_failed_checks_and_returns_after_rise() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    add_backends(
        lab,
        ECHO4,
        &["--check", "http://lab:80/", "--interval", "1s", "--timeout", "1s", "--rise", "2", "--fall", "2"],
    );
    // A connection on a backend that stays alive.
    let (port, keeper) = (46000..46100)
        .map(|p| (p, explained(lab, 1, &sock(&client_v4(1), p).to_string(), ECHO4)))
        .find(|(_, b)| b != "be2")
        .unwrap();
    let mut kept = connect(sock(&client_v4(1), port), sock(VIP4, ECHO_PORT));
    assert_eq!(echo(&mut kept, "before"), keeper);

    lab.stop_servers(2).unwrap();
    let killed = Instant::now();
    wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, ECHO4, 2) == "down"))
        .expect("be2 marked down on both LB hosts");
    // A loaded machine can time out the others' probes too; new flows
    // avoid be2 once it is out of the ring and the VIP does not fail open.
    wait_for(PATIENCE, || (1..=LBS).all(|i| !ok(lab, i, &["vip", "list"]).contains("FAIL OPEN")))
        .expect("be1 and be3 in service");
    // interval x fall = 800 ms, plus jitter and probe time: printed, not
    // asserted (a loaded machine is slower; the verdict is what counts).
    println!("be2 out of the ring {:?} after it died (interval 1 s x fall 2)", killed.elapsed());
    for i in 1..=LBS {
        let log = std::fs::read_to_string(format!("{DIR}/lb{i}.log")).unwrap();
        let line = log.lines().find(|l| l.contains("backend is down") && l.contains(&backend_v4(2))).unwrap();
        assert!(line.contains("refused"), "the log gives the failed check's reason: {line}");
    }
    for n in 0..40u16 {
        let mut c = connect(sock(&client_v4((n % 4) as usize), 47000 + n), sock(VIP4, ECHO_PORT));
        assert_ne!(echo(&mut c, "new"), "be2");
    }
    assert_eq!(echo(&mut kept, "during"), keeper, "other backends' connections are untouched");

    lab.start_servers(2).unwrap();
    wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, ECHO4, 2) == "up"))
        .expect("be2 back up after rise checks");
    let back = (48000..48200u16).any(|p| {
        let mut c = connect(sock(&client_v4(2), p), sock(VIP4, ECHO_PORT));
        echo(&mut c, "again") == "be2"
    });
    assert!(back, "new flows reach be2 again");
}

#[test]
fn all_backends_down_fails_open_and_says_so() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", HTTP4]);
    add_backends(lab, HTTP4, &["--check", "tcp:80", "--interval", "300ms", "--timeout", "300ms", "--fall", "1"]);
    // Keep the echo servers: only nginx (the checked port) goes away.
    for j in 1..=BACKENDS {
        ns(&backend_ns(j), &["sh", "-c", &format!("kill $(cat {DIR}/be{j}/nginx.pid)")]).unwrap();
    }
    wait_for(PATIENCE, || (1..=LBS).all(|i| ok(lab, i, &["vip", "list"]).contains("3 (FAIL OPEN)")))
        .expect("the VIP fails open with all three backends in its ring");
    for i in 1..=LBS {
        let status = ok(lab, i, &["status"]);
        assert!(status.contains(&format!("failing open   {HTTP4}")), "{status}");
    }
    let log = std::fs::read_to_string(format!("{DIR}/lb1.log")).unwrap();
    assert!(log.contains("failing open"), "logged");
    // New flows still reach a backend: its kernel answers the SYN to the
    // dead port with a RST from the VIP (refused), where a dropped packet
    // would time out.
    let err = try_connect(sock(&client_v4(0), 52000), sock(VIP4, 80)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn https_health_checks_verify_the_backend_certificate_and_say_why_not() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", HTTP4]);
    let [wrong_ca, ..] = make_pki(&format!("{DIR}/pki"), "wrong");
    let url = format!("https://{BACKEND_TLS_NAME}:443/");
    let timing = ["--interval", "500ms", "--timeout", "500ms", "--fall", "2"];
    let add = |j: usize, trust: &[&str]| {
        let addr = backend_v4(j);
        let mut args = vec!["backend", "add", HTTP4, &addr, "--check", &url];
        args.extend_from_slice(trust);
        args.extend_from_slice(&timing);
        all(lab, &args);
    };
    add(1, &["--check-ca", BACKEND_CA]);
    add(2, &["--check-ca", &wrong_ca]);
    add(3, &["--check-insecure"]);
    // Wrong CA: down, with the TLS reason in `backend list`.
    wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, HTTP4, 2) == "down"))
        .expect("the backend whose certificate the check cannot verify goes down");
    let table = ok(lab, 1, &["backend", "list", HTTP4]);
    let row = table.lines().find(|l| l.contains(&backend_v4(2))).unwrap();
    assert!(row.contains("TLS: invalid peer certificate: not signed by a trusted CA"), "{table}");
    // Trusted CA and --check-insecure: still up after three probes; with
    // fall 2, that takes passing ones (a loaded machine may time one out).
    let probes = |page: &str, j: usize, what: &str| {
        let labels = format!("{{vip=\"{HTTP4}\",backend=\"{}\"}}", backend_v4(j));
        sample(page, &format!("lb_health_check_{what}{labels}"))
    };
    wait_for(PATIENCE, || {
        let page = scrape(1, &[]);
        [1, 3].iter().all(|&j| probes(&page, j, "duration_seconds_count") >= 3.0)
    })
    .expect("three probes of be1 and be3");
    let page = scrape(1, &[]);
    for j in [1, 3] {
        assert_eq!(backend_health(lab, 1, HTTP4, j), "up", "be{j}");
        assert!(probes(&page, j, "failures_total") < probes(&page, j, "duration_seconds_count"), "be{j} passed");
    }
    assert!(probes(&page, 2, "failures_total") >= 2.0);
    // be2 switches to a certificate made as a new user makes one
    // (`openssl req -x509`: self-signed, CA:TRUE), and the check names that
    // very file: pinned, so up.
    let pinned = format!("{DIR}/pki/self-signed.pem");
    let key = format!("{DIR}/pki/self-signed.key");
    let (subject, san) = (format!("/CN={BACKEND_TLS_NAME}"), format!("subjectAltName=DNS:{BACKEND_TLS_NAME}"));
    let args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject, "-addext", &san];
    sh("openssl", &[&args[..], &["-keyout", &key, "-out", &pinned]].concat()).unwrap();
    assert!(sh("openssl", &["x509", "-in", &pinned, "-noout", "-text"]).unwrap().contains("CA:TRUE"));
    std::fs::copy(&pinned, format!("{DIR}/tls/backend.pem")).unwrap();
    std::fs::copy(&key, format!("{DIR}/tls/backend.key")).unwrap();
    ns(&backend_ns(2), &["nginx", "-c", &format!("{DIR}/be2/nginx.conf"), "-s", "reload"]).unwrap();
    all(lab, &["backend", "del", HTTP4, &backend_v4(2)]);
    add(2, &["--check-ca", &pinned]);
    wait_for(PATIENCE, || (1..=LBS).all(|i| backend_health(lab, i, HTTP4, 2) == "up"))
        .expect("a self-signed CA:TRUE certificate named by --check-ca is pinned");
}

#[test]
fn a_backend_that_drops_the_vips_packets_shows_syn_repeats_while_its_check_stays_up() {
    let s = lab();
    let lab = &s.lab;
    all(lab, &["vip", "add", ECHO4]);
    add_backends(lab, ECHO4, &["--check", "tcp:80", "--interval", "500ms", "--timeout", "500ms"]);
    lab.route_through(&[1], VIP4).unwrap();
    // be2 drops everything to the VIP after decapsulation; its own address
    // (the check's) still answers.
    drop_vip_packets(2);
    // Connections whose flows the ring gives be2 time out (their SYN is
    // sent again in a second); the others work.
    let mut failed = 0;
    for p in 0..12u16 {
        let src = sock(&client_v4((p % 4) as usize), 49000 + p);
        let to_be2 = explained(lab, 1, &src.to_string(), ECHO4) == "be2";
        match try_connect(src, sock(VIP4, ECHO_PORT)) {
            Ok(mut c) => assert!(!to_be2 && echo(&mut c, "hi") != "be2"),
            Err(_) => {
                assert!(to_be2, "only be2's flows fail");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "some flows went to be2");
    let rows: Vec<serde_json::Value> = (1..=BACKENDS).map(|j| backend_row(lab, 1, ECHO4, j)).collect();
    let repeats = |j: usize| {
        let row = &rows[j - 1];
        (row["syn_repeats"].as_u64().unwrap(), row["health"].as_str().unwrap().to_string())
    };
    println!(
        "{failed} connections to be2 timed out; SYN repeats: be1 {:?}, be2 {:?}, be3 {:?}",
        repeats(1),
        repeats(2),
        repeats(3)
    );
    assert!(repeats(2).0 >= failed as u64, "each failed connection's SYN came again at least once");
    assert_eq!(repeats(2).1, "up", "the plain check does not see it");
    assert_eq!((repeats(1).0, repeats(3).0), (0, 0));
    let metric = format!("lb_backend_syn_repeats_total{{vip=\"{ECHO4}\",backend=\"{}\"}}", backend_v4(2));
    assert_eq!(sample(&scrape(1, &[]), &metric), repeats(2).0 as f64);
}
