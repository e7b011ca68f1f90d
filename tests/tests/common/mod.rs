//! What every end-to-end test file needs: the lab, lbctl on its LB hosts,
//! client connections from the client namespace, and long-lived streams.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_lab::*;

/// One lab at a time: the tests share namespace names.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub struct Setup {
    pub lab: Lab,
    _serial: MutexGuard<'static, ()>,
}

pub fn lbctl_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "-q", "-p", "lb-userspace", "--bin", "lbctl"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building lbctl failed");
    root.join("target/debug/lbctl")
}

pub fn lab() -> Setup {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::up(&lbctl_binary(), &mut |_| {}).expect("lab up");
    Setup { lab, _serial: serial }
}

/// Runs lbctl on LB host `i`; panics with its stderr if it fails.
pub fn ok(lab: &Lab, i: usize, args: &[&str]) -> String {
    let out = lab.lbctl(i, args);
    assert!(out.status.success(), "lbctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn all(lab: &Lab, args: &[&str]) {
    lab.lbctl_all(args).unwrap();
}

pub const HTTP4: &str = "203.0.113.10:80/tcp";

pub const ECHO4: &str = "203.0.113.10:9000/tcp";

pub const UDP4: &str = "203.0.113.10:9000/udp";

pub const HTTP6: &str = "[2001:db8:f::10]:80/tcp";

pub const ECHO6: &str = "[2001:db8:f::10]:9000/tcp";

pub const UDP6: &str = "[2001:db8:f::10]:9000/udp";

/// Every lab backend on `vip`, on both LB hosts, with `extra` args; then
/// waits until both LB hosts announce it and the router has both routes.
pub fn add_backends(lab: &Lab, vip: &str, extra: &[&str]) {
    for j in 1..=BACKENDS {
        let addr = backend_in(vip, j);
        let mut args = vec!["backend", "add", vip, &addr];
        args.extend_from_slice(extra);
        all(lab, &args);
    }
    lab.wait_routes(address_of(vip), &[1, 2]).unwrap();
}

/// The address of a VIP written ADDR:PORT/PROTO or [ADDR]:PORT/PROTO.
pub fn address_of(vip: &str) -> &str {
    let addr_port = vip.split('/').next().unwrap();
    addr_port.rsplit_once(':').unwrap().0.trim_start_matches('[').trim_end_matches(']')
}

/// A TCP connection from the client namespace, from `src`.
pub fn connect(src: SocketAddr, dst: SocketAddr) -> TcpStream {
    try_connect(src, dst).unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"))
}

pub fn try_connect(src: SocketAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    in_ns(CLIENT_NS, move || {
        let socket = match src {
            SocketAddr::V4(_) => libc_socket(libc::AF_INET),
            SocketAddr::V6(_) => libc_socket(libc::AF_INET6),
        };
        // Give up after about 3 s instead of the kernel's two minutes.
        set_syn_retries(&socket, 1);
        bind_and_connect(socket, src, dst)
    })
    .unwrap()
}

/// How often a connect sends its SYN again before it gives up.
pub fn set_syn_retries(socket: &std::os::fd::OwnedFd, retries: i32) {
    use std::os::fd::AsRawFd;
    unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_SYNCNT, &retries as *const i32 as *const _, 4)
    };
}

/// `nft -f` of `rules` in namespace `netns` (as a file: one transaction).
pub fn nft(netns: &str, name: &str, rules: &str) {
    let path = format!("{DIR}/{name}.nft");
    std::fs::write(&path, rules).unwrap();
    ns(netns, &["nft", "-f", &path]).unwrap();
}

/// Cuts lb1 off in the router without a carrier change (which would tell
/// the router at once): every packet to or from lb1 (BFD, BGP and the
/// traffic both ways) is dropped; only BFD can notice.
pub fn cut_lb1() {
    let cut = "table inet cut {
      chain cut_forward { type filter hook forward priority 0; iifname \"rt-lb1\" drop; oifname \"rt-lb1\" drop; }
      chain cut_input { type filter hook input priority 0; iifname \"rt-lb1\" drop; }
      chain cut_output { type filter hook output priority 0; oifname \"rt-lb1\" drop; }
    }";
    nft(ROUTER_NS, "cut", cut);
}

/// Undoes [`cut_lb1`].
pub fn heal_lb1() {
    ns(ROUTER_NS, &["nft", "delete", "table", "inet", "cut"]).unwrap();
}

pub fn libc_socket(family: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// std has no bind-before-connect for TCP; do it on a raw socket so the
/// test chooses the source port (and so knows the flow).
pub fn bind_and_connect(fd: std::os::fd::OwnedFd, src: SocketAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let one: i32 = 1;
    unsafe { libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const i32 as *const _, 4) };
    let (sa, len) = sockaddr(src);
    if unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (da, dlen) = sockaddr(dst);
    if unsafe { libc::connect(raw, &da as *const _ as *const libc::sockaddr, dlen) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

pub fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (storage, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (storage, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// Sends a line on an echo connection; returns the backend that answered.
pub fn echo(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap_or_else(|e| panic!("no echo of {line:?}: {e}"));
    let (backend, rest) = reply.trim_end().split_once(' ').expect("NAME LINE");
    assert_eq!(rest, line);
    backend.to_string()
}

/// A global counter of LB host `i`, from `lbctl stats`.
pub fn counter(lab: &Lab, i: usize, name: &str) -> u64 {
    let stats = ok(lab, i, &["stats"]);
    let line = stats.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("no {name}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

pub fn sock(addr: &str, port: u16) -> SocketAddr {
    let ip: std::net::IpAddr = addr.parse().unwrap();
    SocketAddr::new(ip, port)
}

/// Long-lived TCP connections to the echo VIP, one line each in turn until
/// stopped. A connection breaks when a line is not echoed, or echoed by
/// another backend than its first.
pub struct Streams {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rounds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The longest round so far, in microseconds.
    longest_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    worker: std::thread::JoinHandle<Vec<Result<String, String>>>,
}

impl Streams {
    /// `n` connections from the four client addresses (ports from `first_port`).
    pub fn start(n: usize, first_port: u16) -> Streams {
        let mut conns: Vec<(SocketAddr, TcpStream, String)> = (0..n)
            .map(|k| {
                let src = sock(&client_v4(k % 4), first_port + k as u16);
                let mut c = connect(src, sock(VIP4, ECHO_PORT));
                let owner = echo(&mut c, "hello");
                (src, c, owner)
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let longest_us = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, rounds2, longest2) = (stop.clone(), rounds.clone(), longest_us.clone());
        let worker = std::thread::spawn(move || {
            let mut broken: Vec<Option<String>> = vec![None; conns.len()];
            let mut round = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                for (k, (src, c, owner)) in conns.iter_mut().enumerate() {
                    if broken[k].is_some() {
                        continue;
                    }
                    let line = format!("{k} {round}");
                    let _ = c.write_all(format!("{line}\n").as_bytes());
                    let mut reply = String::new();
                    let got = BufReader::new(&mut *c).read_line(&mut reply);
                    let want = format!("{owner} {line}\n");
                    if !matches!(got, Ok(n) if n > 0) || reply != want {
                        broken[k] = Some(format!("{src} on {owner}: round {round}: {got:?} {reply:?}"));
                    }
                }
                round += 1;
                rounds2.store(round, std::sync::atomic::Ordering::SeqCst);
                longest2.fetch_max(started.elapsed().as_micros() as u64, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            conns.iter().zip(broken).map(|((_, _, owner), b)| b.map_or(Ok(owner.clone()), Err)).collect()
        });
        Streams { stop, rounds, longest_us, worker }
    }

    /// The longest time one round over every connection took.
    pub fn longest_stall(&self) -> Duration {
        Duration::from_micros(self.longest_us.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Waits until every connection has sent `n` more lines.
    pub fn more_rounds(&self, n: usize) {
        let from = self.rounds.load(std::sync::atomic::Ordering::SeqCst);
        wait_for(PATIENCE, || {
            self.rounds.load(std::sync::atomic::Ordering::SeqCst) >= from + n || self.worker.is_finished()
        })
        .unwrap();
    }

    /// Stops; returns each connection's backend, or how it broke.
    pub fn finish(self) -> Vec<Result<String, String>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.worker.join().unwrap()
    }
}

/// The second-chance counters of every backend's decap program.
pub fn redirected(lab: &Lab) -> u64 {
    (1..=BACKENDS)
        .map(|j| {
            let out = lab.lbctl_in(&backend_ns(j), &["-o", "json", "decap", "status", &format!("be{j}-eth")]).unwrap();
            let counters: serde_json::Value = serde_json::from_str(&out).unwrap();
            counters["redirected"].as_u64().unwrap()
        })
        .sum()
}

/// Ends the streams: not one connection may have broken. Returns the
/// backend each connection was on, in order.
pub fn none_broke(streams: Streams) -> Vec<String> {
    let results = streams.finish();
    assert!(broken(&results).is_empty(), "broken connections: {:#?}", broken(&results));
    results.into_iter().map(Result::unwrap).collect()
}

pub fn broken(results: &[Result<String, String>]) -> Vec<&String> {
    results.iter().filter_map(|r| r.as_ref().err()).collect()
}

/// Brings up the echo VIP with `vip_args` on both LB hosts, be1 and be2
/// behind it (one API call each: two declared generations), and 40
/// connections streaming through it by the LB hosts `through`, opened
/// under a ring that is only moments old.
pub fn streams_on(lab: &Lab, vip_args: &[&str], first_port: u16, through: &[usize]) -> Streams {
    let mut args = vec!["vip", "add", ECHO4];
    args.extend_from_slice(vip_args);
    all(lab, &args);
    for j in 1..=2 {
        all(lab, &["backend", "add", ECHO4, &backend_v4(j)]);
    }
    lab.route_through(through, VIP4).unwrap();
    let streams = Streams::start(40, first_port);
    streams.more_rounds(2);
    streams
}

/// `curl ARGS http://<metrics of LB host i>/metrics` from inside LB host `i`.
pub fn scrape(i: usize, args: &[&str]) -> String {
    let url = format!("http://{}/metrics", Lab::metrics_addr(i));
    let mut full = vec!["curl", "-sS", "--max-time", "10"];
    full.extend_from_slice(args);
    full.push(&url);
    ns(&lb_ns(i), &full).unwrap()
}

/// The value of one sample in a Prometheus text page.
pub fn sample(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name_and_labels} in\n{page}"))
        .parse()
        .unwrap()
}

/// The ring changes of the second-chance tests: a backend added, another
/// removed, a third re-weighted, on both LB hosts, each followed by a few
/// rounds of every connection.
pub fn ring_changes(lab: &Lab, streams: &Streams) {
    all(lab, &["backend", "add", ECHO4, &backend_v4(3)]);
    streams.more_rounds(3);
    all(lab, &["backend", "del", ECHO4, &backend_v4(1)]);
    streams.more_rounds(3);
    all(lab, &["backend", "set-weight", ECHO4, &backend_v4(2), "3"]);
    streams.more_rounds(3);
}

/// The health column of lab backend `j` of `vip` on LB host `i`, from
/// `lbctl -o json backend list`.
pub fn backend_health(lab: &Lab, i: usize, vip: &str, j: usize) -> String {
    backend_row(lab, i, vip, j)["health"].as_str().unwrap().to_string()
}

/// Backend `j` of `vip` as LB host `i`'s `backend list -o json` shows it.
pub fn backend_row(lab: &Lab, i: usize, vip: &str, j: usize) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&ok(lab, i, &["-o", "json", "backend", "list", vip])).unwrap();
    let want = backend_in(vip, j);
    list.as_array().unwrap().iter().find(|b| b["address"] == want.as_str()).expect("the backend is listed").clone()
}

/// The address of lab backend `j` in `vip`'s family.
pub fn backend_in(vip: &str, j: usize) -> String {
    if vip.starts_with('[') {
        backend_v6(j)
    } else {
        backend_v4(j)
    }
}

/// Backend `j` drops every packet to the VIP after its decap (nftables);
/// its own address keeps answering. [`answer_the_vip`] undoes it.
pub fn drop_vip_packets(j: usize) {
    let rule = format!(
        "table inet blackhole {{\n  chain input {{\n    type filter hook input priority 0;\n    \
         ip daddr {VIP4} drop;\n  }}\n}}\n"
    );
    nft(&backend_ns(j), "blackhole", &rule);
}

pub fn answer_the_vip(j: usize) {
    ns(&backend_ns(j), &["nft", "delete", "table", "inet", "blackhole"]).unwrap();
}

/// A CA that signs a server certificate for 127.0.0.1 and a client
/// certificate, written as PEM files under `dir`; returns (ca, cert, key)
/// paths for the server and the client.
pub fn make_pki(dir: &str, name: &str) -> [String; 5] {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let write = |file: &str, text: String| {
        let path = format!("{dir}/{name}-{file}");
        std::fs::write(&path, text).unwrap();
        path
    };
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&server_key, &ca).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["lbctl-client".to_string()]).unwrap().signed_by(&client_key, &ca).unwrap();
    [
        write("ca.pem", ca.pem()),
        write("server.pem", server.pem()),
        write("server.key", server_key.serialize_pem()),
        write("client.pem", client.pem()),
        write("client.key", client_key.serialize_pem()),
    ]
}

/// The backend `lbctl explain` names, as the lab's backend name (be1..).
pub fn explained(lab: &Lab, i: usize, client: &str, vip: &str) -> String {
    let out = ok(lab, i, &["-o", "json", "explain", client, vip]);
    let addr = out.split("\"backend\": \"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let j = (1..=BACKENDS).find(|&j| backend_v4(j) == addr || backend_v6(j) == addr).expect("a lab backend");
    format!("be{j}")
}

/// `n` new echo connections, one line each, from ports `first_port`...;
/// returns how many failed.
pub fn new_connections(n: u16, first_port: u16) -> usize {
    (0..n)
        .filter(|k| {
            let src = sock(&client_v4(*k as usize % 4), first_port + k);
            let Ok(mut c) = try_connect(src, sock(VIP4, ECHO_PORT)) else { return true };
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut reply = String::new();
            let sent = c.write_all(b"new\n").is_ok();
            let read = BufReader::new(&mut c).read_line(&mut reply).is_ok();
            !(sent && read && reply.ends_with(" new\n"))
        })
        .count()
}
