//! An edge site in network namespaces, for the demo, for people to try
//! things in, and for the end-to-end tests:
//!
//! ```text
//!  client (192.0.2.10-13, 2001:db8:c::10-13)
//!     |
//!  router --ECMP (L4 hash) for the VIPs--> lb1, lb2   (lbctl up, XDP native;
//!     |                                    lb2's link is a VLAN trunk, VLAN 100)
//!     |  <-- eBGP + BFD (BIRD): each LB host announces the VIP addresses
//!     |      its controller puts in kernel table 100 --'
//!     |  <------------- IP-in-IP (XDP_TX) -------------'
//!     +-- be1, be2, be3   (lbctl decap up; VIPs on lo; nginx; echo server)
//!          replies go from the VIP straight back to the client (DSR)
//! ```
//!
//! Everything uses documentation addresses and namespaces named `lbl-*`;
//! [`Lab::down`] removes all of it, and dropping a [`Lab`] calls it, so a
//! failed test cleans up too.

use std::{
    fs,
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub mod bird;

pub const VIP4: &str = "203.0.113.10";
pub const VIP6: &str = "2001:db8:f::10";
/// Where the lab keeps configs, logs, pid files, sockets and state.
pub const DIR: &str = "/run/lb-lab";
const PREFIX: &str = "lbl-";
pub const LBS: usize = 2;
/// The LB host whose link to the router is a VLAN trunk, and its VLAN.
/// The kernel here has no 802.1Q devices: both ends tag and untag what
/// their kernels send and receive with `lbctl lab-trunk` (tc programs, a
/// lab component); the balancer sees the frames tagged, as on a real trunk.
pub const TRUNK_LB: usize = 2;
pub const TRUNK_VLAN: u16 = 100;
pub const BACKENDS: usize = 3;
/// Port of the line echo server on every backend (TCP and UDP).
pub const ECHO_PORT: u16 = 9000;

pub fn client_v4(i: usize) -> String {
    format!("192.0.2.{}", 10 + i)
}
pub fn client_v6(i: usize) -> String {
    format!("2001:db8:c::{}", 10 + i)
}
pub fn backend_v4(j: usize) -> String {
    format!("198.51.100.{}", 16 * j + 2)
}
pub fn backend_v6(j: usize) -> String {
    format!("2001:db8:b{j}::2")
}
pub fn lb_ns(i: usize) -> String {
    format!("{PREFIX}lb{i}")
}
pub fn lb_iface(i: usize) -> String {
    format!("lb{i}-eth")
}
/// LB host `i`'s second, backend-facing link ([`Lab::give_backend_nic`]).
pub fn backend_nic(i: usize) -> String {
    format!("lb{i}-be")
}
pub fn backend_ns(j: usize) -> String {
    format!("{PREFIX}be{j}")
}
pub const CLIENT_NS: &str = "lbl-client";
/// Where the lab's Prometheus listens (the router's client-side address).
pub const PROMETHEUS_ADDR: &str = "192.0.2.1:9090";
pub const ROUTER_NS: &str = "lbl-router";

/// Runs a command; fails with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a namespace (`ip netns exec`).
pub fn ns(name: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", name];
    full.extend_from_slice(args);
    sh("ip", &full)
}

fn ip(name: &str, args: &str) -> Result<String> {
    let mut full = vec!["-n", name];
    full.extend(args.split_whitespace());
    sh("ip", &full)
}

fn sysctl(name: &str, settings: &[&str]) -> Result<()> {
    for s in settings {
        ns(name, &["sysctl", "-qw", s])?;
    }
    Ok(())
}

/// Runs `f` on a thread that has entered namespace `name`: sockets it makes
/// belong to that namespace and keep working from any thread afterwards.
pub fn in_ns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/var/run/netns/{name}");
    let file = fs::File::open(&path).with_context(|| format!("no namespace {name}"))?;
    let name = name.to_string();
    thread::spawn(move || {
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!("setns {name}: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {path} panicked"))?
}

/// A running lab. Dropping it tears everything down unless [`Lab::keep`].
pub struct Lab {
    pub lbctl: PathBuf,
    keep: bool,
}

impl Lab {
    /// Builds the topology and starts every process; on any failure,
    /// removes what it made. `log` receives a line per step.
    pub fn up(lbctl: &Path, log: &mut dyn FnMut(&str)) -> Result<Lab> {
        Lab::down()?;
        let lab = Lab { lbctl: lbctl.canonicalize().context("lbctl binary")?, keep: false };
        fs::create_dir_all(DIR)?;
        log("namespaces and links");
        lab.build_network()?;
        log("decap on backends and router, VIPs on the backends' lo");
        lab.start_decap()?;
        log("a CA and a certificate for the backends' HTTPS health port");
        make_backend_certificate()?;
        log("nginx and echo servers on the backends");
        for j in 1..=BACKENDS {
            lab.start_servers(j)?;
        }
        log("BIRD on the router and the LB hosts (eBGP + BFD)");
        bird::start_all()?;
        for i in 1..=LBS {
            log(&format!("lbctl up on lb{i}"));
            lab.start_lb(i, &[])?;
        }
        Ok(lab)
    }

    /// Leaves the lab running after this value is dropped.
    pub fn keep(mut self) {
        self.keep = true;
    }

    fn build_network(&self) -> Result<()> {
        let mut all = vec![CLIENT_NS.to_string(), ROUTER_NS.to_string()];
        all.extend((1..=LBS).map(lb_ns));
        all.extend((1..=BACKENDS).map(backend_ns));
        for n in &all {
            sh("ip", &["netns", "add", n])?;
            ip(n, "link set lo up")?;
        }
        let link = |a_ns: &str, a: &str, b_ns: &str, b: &str| -> Result<()> {
            sh("ip", &["link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns])?;
            ip(a_ns, &format!("link set {a} up"))?;
            ip(b_ns, &format!("link set {b} up")).map(drop)
        };
        // Client: MTU 1400 leaves room for the outer header on 1500 links.
        link(CLIENT_NS, "cl-eth", ROUTER_NS, "rt-cl")?;
        ip(CLIENT_NS, "link set cl-eth mtu 1400")?;
        ip(ROUTER_NS, "link set rt-cl mtu 1400")?;
        ip(ROUTER_NS, "addr add 192.0.2.1/24 dev rt-cl")?;
        ip(ROUTER_NS, "addr add 2001:db8:c::1/64 dev rt-cl nodad")?;
        for i in 0..4 {
            ip(CLIENT_NS, &format!("addr add {}/24 dev cl-eth", client_v4(i)))?;
            ip(CLIENT_NS, &format!("addr add {}/64 dev cl-eth nodad", client_v6(i)))?;
        }
        ip(CLIENT_NS, "route add default via 192.0.2.1")?;
        ip(CLIENT_NS, "-6 route add default via 2001:db8:c::1")?;
        // Local sockets leave checksums to offload; across XDP_TX on veth
        // they would arrive unfinished (PLATFORM.md). Real NICs do not.
        ns(CLIENT_NS, &["ethtool", "-K", "cl-eth", "tx", "off"])?;

        for i in 1..=LBS {
            let (n, dev, rt) = (lb_ns(i), lb_iface(i), format!("rt-lb{i}"));
            link(&n, &dev, ROUTER_NS, &rt)?;
            ip(ROUTER_NS, &format!("addr add 198.51.100.{}/30 dev {rt}", 4 * i - 3))?;
            ip(ROUTER_NS, &format!("addr add 2001:db8:a{i}::1/64 dev {rt} nodad"))?;
            ip(&n, &format!("addr add 198.51.100.{}/30 dev {dev}", 4 * i - 2))?;
            ip(&n, &format!("addr add 2001:db8:a{i}::2/64 dev {dev} nodad"))?;
            ip(&n, &format!("route add default via 198.51.100.{}", 4 * i - 3))?;
            ip(&n, &format!("-6 route add default via 2001:db8:a{i}::1"))?;
            if i == TRUNK_LB {
                self.trunk(&n, &dev, &rt)?;
            }
        }
        for j in 1..=BACKENDS {
            let (n, dev, rt) = (backend_ns(j), format!("be{j}-eth"), format!("rt-be{j}"));
            link(&n, &dev, ROUTER_NS, &rt)?;
            ip(ROUTER_NS, &format!("addr add 198.51.100.{}/28 dev {rt}", 16 * j + 1))?;
            ip(ROUTER_NS, &format!("addr add 2001:db8:b{j}::1/64 dev {rt} nodad"))?;
            ip(&n, &format!("addr add {}/28 dev {dev}", backend_v4(j)))?;
            ip(&n, &format!("addr add {}/64 dev {dev} nodad", backend_v6(j)))?;
            ip(&n, &format!("addr add {VIP4}/32 dev lo"))?;
            ip(&n, &format!("addr add {VIP6}/128 dev lo nodad"))?;
            // Replies leave straight for the client (DSR); its link has MTU
            // 1400, and an ICMPv6 "packet too big" about them would go to
            // the VIP, that is to the LB hosts: size them right from the start.
            ip(&n, &format!("route add default via 198.51.100.{} mtu 1400", 16 * j + 1))?;
            ip(&n, &format!("-6 route add default via 2001:db8:b{j}::1 mtu 1400"))?;
            // Packets for the VIP arrive on the backend link; replies leave
            // from the VIP by the default route (DSR).
            sysctl(&n, &["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])?;
        }
        sysctl(
            ROUTER_NS,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                // ECMP over L4 fields: flows spread over both LB hosts.
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
            ],
        )?;
        // No static routes to the VIPs: the LB hosts announce them (BGP).
        Ok(())
    }

    /// Makes the link between LB host namespace `n` (`dev`) and the router
    /// (`rt`) a VLAN trunk: tags in the frames on the wire (no transmit
    /// offload keeping them aside), none taken off in hardware on the LB
    /// side (`lbctl up --trunk` checks), both kernels' traffic tagged.
    fn trunk(&self, n: &str, dev: &str, rt: &str) -> Result<()> {
        ns(ROUTER_NS, &["ethtool", "-K", rt, "txvlan", "off"])?;
        ns(n, &["ethtool", "-K", dev, "txvlan", "off", "rxvlan", "off"])?;
        let vid = TRUNK_VLAN.to_string();
        self.lbctl_in(ROUTER_NS, &["lab-trunk", rt, "--vid", &vid])?;
        self.lbctl_in(n, &["lab-trunk", dev, "--vid", &vid]).map(drop)
    }

    /// The lab variant with two NICs: LB host `i` gets a second link to the
    /// router (`lb{i}-be`, 198.51.100.64/30 for i = 1), routes to the
    /// backends through it, and is restarted with `--backend-iface`, so
    /// clients' packets come in on its first link and leave for the
    /// backends on the second.
    pub fn give_backend_nic(&self, i: usize) -> Result<()> {
        let (n, dev, rt) = (lb_ns(i), backend_nic(i), format!("rt-lb{i}b"));
        let base = 64 + 4 * (i - 1);
        sh("ip", &["link", "add", &dev, "netns", &n, "type", "veth", "peer", "name", &rt, "netns", ROUTER_NS])?;
        ip(ROUTER_NS, &format!("addr add 198.51.100.{}/30 dev {rt}", base + 1))?;
        ip(&n, &format!("addr add 198.51.100.{}/30 dev {dev}", base + 2))?;
        ip(ROUTER_NS, &format!("link set {rt} up"))?;
        ip(&n, &format!("link set {dev} up"))?;
        for j in 1..=BACKENDS {
            ip(&n, &format!("route add 198.51.100.{}/28 via 198.51.100.{} dev {dev}", 16 * j, base + 1))?;
        }
        // Redirected frames reach a veth's peer only if it runs XDP too.
        let addr = format!("198.51.100.{}", base + 1);
        self.lbctl_in(ROUTER_NS, &["decap", "up", &rt, "--address", &addr])?;
        self.stop_lb(i, libc::SIGTERM)?;
        self.start_lb(i, &["--backend-iface", &dev]).map(drop)
    }

    /// Runs `lbctl ARGS` inside namespace `name`, keeping the host's mounts
    /// (bpffs) visible: nsenter enters the network namespace only.
    pub fn lbctl_in(&self, name: &str, args: &[&str]) -> Result<String> {
        let netns = format!("--net=/var/run/netns/{name}");
        let mut full = vec![netns.as_str(), self.lbctl.to_str().unwrap()];
        full.extend_from_slice(args);
        sh("nsenter", &full)
    }

    fn start_decap(&self) -> Result<()> {
        for j in 1..=BACKENDS {
            self.lbctl_in(&backend_ns(j), &["decap", "up", &format!("be{j}-eth"), "--xdp-mode", "native"])?;
        }
        // XDP_TX on a veth only delivers when the peer runs XDP too
        // (PLATFORM.md): the router's ends towards the LB hosts (which send
        // everything back out) and the backends (which pass GUE packets on
        // to their alternate) get the decap program, which passes
        // everything not addressed to it.
        for i in 1..=LBS {
            let addr = format!("198.51.100.{}", 4 * i - 3);
            self.lbctl_in(ROUTER_NS, &["decap", "up", &format!("rt-lb{i}"), "--address", &addr])?;
        }
        for j in 1..=BACKENDS {
            let addr = format!("198.51.100.{}", 16 * j + 1);
            self.lbctl_in(ROUTER_NS, &["decap", "up", &format!("rt-be{j}"), "--address", &addr])?;
        }
        Ok(())
    }

    /// The API socket of LB host `i`.
    pub fn socket(i: usize) -> String {
        format!("{DIR}/lb{i}.sock")
    }

    /// Starts `lbctl up` on LB host `i` in the background.
    pub fn start_lb(&self, i: usize, extra: &[&str]) -> Result<u32> {
        let socket = Lab::socket(i);
        let _ = fs::remove_file(&socket);
        let log = fs::OpenOptions::new().create(true).append(true).open(format!("{DIR}/lb{i}.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", lb_ns(i)))
            .arg(&self.lbctl)
            .args(["--socket", &socket, "up", &lb_iface(i)])
            .args(if extra.contains(&"--xdp-mode") { &[][..] } else { &["--xdp-mode", "native"][..] })
            .args(["--state-dir", &format!("{DIR}/state")])
            .args(["--encap-src", &format!("198.51.100.{}/32", 4 * i - 2)])
            .args(if extra.contains(&"--metrics") { vec![] } else { vec!["--metrics".into(), Lab::metrics_addr(i)] })
            // Routes for BIRD; a short drain keeps test stops quick.
            .args(if extra.contains(&"--announce-table") {
                vec![]
            } else {
                vec!["--announce-table".into(), bird::ANNOUNCE_TABLE.to_string()]
            })
            .args(if extra.contains(&"--drain-time") { &[][..] } else { &["--drain-time", "1s"][..] })
            .args(if i == TRUNK_LB { &["--trunk"][..] } else { &[][..] })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lbctl up")?;
        let pid = child.id();
        fs::write(format!("{DIR}/lb{i}.pid"), pid.to_string())?;
        wait_for(PATIENCE, || Path::new(&socket).exists())
            .with_context(|| format!("lbctl up on lb{i} did not open its socket; see {DIR}/lb{i}.log"))?;
        Ok(pid)
    }

    /// Where LB host `i` serves `/metrics`: its own link address, so that
    /// the lab's Prometheus (in the router) can scrape both LB hosts.
    pub fn metrics_addr(i: usize) -> String {
        format!("198.51.100.{}:9100", 4 * i - 2)
    }

    /// Starts Prometheus in the router namespace, scraping both LB hosts
    /// every second; returns its URL (reachable from the lab's namespaces).
    pub fn start_prometheus(&self) -> Result<String> {
        let dir = format!("{DIR}/prometheus");
        fs::create_dir_all(format!("{dir}/data"))?;
        let targets: Vec<String> = (1..=LBS).map(|i| format!("'{}'", Lab::metrics_addr(i))).collect();
        fs::write(
            format!("{dir}/prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: lbctl\n    \
                 static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let log = fs::File::create(format!("{dir}/prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ROUTER_NS, "prometheus"])
            .arg(format!("--config.file={dir}/prometheus.yml"))
            .arg(format!("--storage.tsdb.path={dir}/data"))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (apt package prometheus; cargo xtask setup installs it)")?;
        fs::write(format!("{dir}/prometheus.pid"), child.id().to_string())?;
        let url = format!("http://{PROMETHEUS_ADDR}");
        wait_for(PATIENCE, || ns(ROUTER_NS, &["curl", "-sf", "--max-time", "2", &format!("{url}/-/ready")]).is_ok())
            .with_context(|| format!("Prometheus did not get ready; see {dir}/prometheus.log"))?;
        Ok(url)
    }

    /// Sends `signal` to LB host `i`'s controller and waits for it to exit.
    pub fn stop_lb(&self, i: usize, signal: i32) -> Result<()> {
        let pid_file = format!("{DIR}/lb{i}.pid");
        let pid: i32 = fs::read_to_string(&pid_file)?.trim().parse()?;
        unsafe { libc::kill(pid, signal) };
        let mut status = 0;
        // Our own child: reap it. (After `lab up` in another process, it is
        // not our child; then just wait for it to vanish.)
        let start = Instant::now();
        while start.elapsed() < PATIENCE {
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid || (r < 0 && !running(pid)) {
                let _ = fs::remove_file(&pid_file);
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("lbctl on lb{i} (pid {pid}) did not exit")
    }

    /// A client command for LB host `i`: `lbctl --socket ... ARGS`.
    pub fn lbctl(&self, i: usize, args: &[&str]) -> Output {
        Command::new(&self.lbctl).args(["--socket", &Lab::socket(i)]).args(args).output().expect("lbctl runs")
    }

    /// Like [`Lab::lbctl`], on every LB host; fails if any fails.
    pub fn lbctl_all(&self, args: &[&str]) -> Result<()> {
        for i in 1..=LBS {
            let out = self.lbctl(i, args);
            if !out.status.success() {
                bail!("lbctl {} on lb{i}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(())
    }

    /// Starts nginx (HTTP on the VIPs, port 80) and the echo server
    /// (TCP and UDP, port 9000) on backend `j`.
    pub fn start_servers(&self, j: usize) -> Result<()> {
        let dir = format!("{DIR}/be{j}");
        fs::create_dir_all(format!("{dir}/tmp"))?;
        let conf = format!(
            "worker_processes 1;\ndaemon on;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  \
             fastcgi_temp_path {dir}/tmp;\n  uwsgi_temp_path {dir}/tmp;\n  scgi_temp_path {dir}/tmp;\n  \
             server {{\n    listen {VIP4}:80;\n    listen [{VIP6}]:80;\n    \
             listen {VIP4}:443 ssl;\n    listen [{VIP6}]:443 ssl;\n    \
             ssl_certificate {DIR}/tls/backend.pem;\n    ssl_certificate_key {DIR}/tls/backend.key;\n    \
             location / {{ default_type text/plain; return 200 \"be{j}\\n\"; }}\n  }}\n  \
             server {{\n    listen {b4}:80;\n    listen [{b6}]:80;\n    \
             listen {b4}:443 ssl;\n    listen [{b6}]:443 ssl;\n    \
             ssl_certificate {DIR}/tls/backend.pem;\n    ssl_certificate_key {DIR}/tls/backend.key;\n    \
             location / {{ default_type text/plain; return 200 \"be{j} health\\n\"; }}\n  }}\n}}\n",
            b4 = backend_v4(j),
            b6 = backend_v6(j),
        );
        fs::write(format!("{dir}/nginx.conf"), conf)?;
        ns(&backend_ns(j), &["nginx", "-c", &format!("{dir}/nginx.conf")])?;
        fs::write(format!("{DIR}/echo.py"), ECHO_SERVER)?;
        let log = fs::File::create(format!("{dir}/echo.log"))?;
        let ready = format!("{dir}/echo.ready");
        let _ = fs::remove_file(&ready);
        let child = Command::new("ip")
            .args(["netns", "exec", &backend_ns(j), "/usr/bin/python3", &format!("{DIR}/echo.py"), &format!("be{j}")])
            .args([ready.as_str(), VIP4, VIP6])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        fs::write(format!("{dir}/echo.pid"), child.id().to_string())?;
        wait_for(PATIENCE, || Path::new(&ready).exists())
            .with_context(|| format!("the echo server of be{j} did not start; see {dir}/echo.log"))
    }

    /// Stops nginx and the echo server of backend `j` (a dead backend).
    pub fn stop_servers(&self, j: usize) -> Result<()> {
        let dir = format!("{DIR}/be{j}");
        for pid_file in [format!("{dir}/nginx.pid"), format!("{dir}/echo.pid")] {
            kill_pid_file(&pid_file, libc::SIGTERM);
        }
        wait_for(PATIENCE, || !Path::new(&format!("{dir}/nginx.pid")).exists()).context("nginx did not stop")
    }

    /// Removes every namespace, process and pin the lab made. Idempotent.
    pub fn down() -> Result<()> {
        for i in 1..=LBS {
            kill_pid_file(&format!("{DIR}/lb{i}.pid"), libc::SIGKILL);
        }
        kill_pid_file(&format!("{DIR}/prometheus/prometheus.pid"), libc::SIGTERM);
        bird::stop_all();
        for j in 1..=BACKENDS {
            kill_pid_file(&format!("{DIR}/be{j}/nginx.pid"), libc::SIGTERM);
            kill_pid_file(&format!("{DIR}/be{j}/echo.pid"), libc::SIGKILL);
        }
        // Deleting a namespace destroys its veths and detaches their XDP
        // programs; the pins would keep links alive, so remove them first.
        for i in 1..=LBS {
            remove_dir(&format!("/sys/fs/bpf/lbctl/{}", lb_iface(i)));
            remove_dir(&format!("/sys/fs/bpf/lbctl-decap/rt-lb{i}"));
            remove_dir(&format!("/sys/fs/bpf/lbctl-decap/rt-lb{i}b"));
        }
        for j in 1..=BACKENDS {
            remove_dir(&format!("/sys/fs/bpf/lbctl-decap/be{j}-eth"));
            remove_dir(&format!("/sys/fs/bpf/lbctl-decap/rt-be{j}"));
        }
        remove_dir("/sys/fs/bpf/lbctl-decap/rt-cl");
        remove_dir(&format!("/sys/fs/bpf/lbctl-lab-trunk/rt-lb{TRUNK_LB}"));
        remove_dir(&format!("/sys/fs/bpf/lbctl-lab-trunk/{}", lb_iface(TRUNK_LB)));
        let listed = sh("ip", &["netns", "list"])?;
        for line in listed.lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(PREFIX)) {
                sh("ip", &["netns", "del", name])?;
            }
        }
        let _ = fs::remove_dir_all(DIR);
        Ok(())
    }

    /// One line per namespace and process, for `cargo xtask lab status`.
    pub fn status() -> Result<String> {
        let mut out = String::new();
        let listed = sh("ip", &["netns", "list"])?;
        let names: Vec<&str> =
            listed.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(PREFIX)).collect();
        if names.is_empty() {
            return Ok("the lab is down\n".into());
        }
        for n in names {
            let links = ip(n, "-br link")?;
            let xdp = ip(n, "link")?.lines().filter(|l| l.trim_start().starts_with("prog/xdp")).count();
            out.push_str(&format!(
                "{n:<12} links: {:<40} xdp programs: {xdp}\n",
                links.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect::<Vec<_>>().join(" ")
            ));
        }
        out.push_str(&bird::status());
        if pid_alive(&format!("{DIR}/prometheus/prometheus.pid")) {
            out.push_str(&format!("prometheus: running at http://{PROMETHEUS_ADDR} (in {ROUTER_NS})\n"));
        }
        for i in 1..=LBS {
            let alive = pid_alive(&format!("{DIR}/lb{i}.pid"));
            out.push_str(&format!(
                "lb{i} controller: {}  socket {}\n",
                if alive { "running" } else { "stopped" },
                Lab::socket(i)
            ));
        }
        Ok(out)
    }

    /// Sends the VIPs' traffic through exactly the LB hosts `hosts` (the
    /// others withdraw their routes: `lbctl announce withdraw`), and waits
    /// until the router's FIB says so for `addr`.
    pub fn route_through(&self, hosts: &[usize], addr: &str) -> Result<()> {
        for i in 1..=LBS {
            let action = if hosts.contains(&i) { "restore" } else { "withdraw" };
            let out = self.lbctl(i, &["announce", action]);
            anyhow::ensure!(out.status.success(), "lbctl announce {action}: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.wait_routes(addr, hosts)
    }

    /// Waits until the router's FIB sends `addr` to exactly `hosts`.
    pub fn wait_routes(&self, addr: &str, hosts: &[usize]) -> Result<()> {
        wait_for(PATIENCE, || bird::next_hops(addr) == hosts).with_context(|| {
            format!("the router does not route {addr} to LB hosts {hosts:?}: {:?}", bird::next_hops(addr))
        })
    }

    /// An HTTP GET from the client, from source address `src`.
    pub fn curl(&self, src: &str, url: &str) -> Result<String> {
        ns(CLIENT_NS, &["curl", "-sS", "--max-time", "3", "--interface", src, url])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            save_logs();
        }
        if !self.keep {
            if let Err(e) = Lab::down() {
                eprintln!("lab teardown failed: {e:#}");
            }
        }
    }
}

/// The CA that signs the backends' HTTPS certificate (for `--check-ca`).
pub const BACKEND_CA: &str = "/run/lb-lab/tls/ca.pem";
/// The name in the backends' certificate: `--check https://lab:443/`.
pub const BACKEND_TLS_NAME: &str = "lab";

/// A CA and a certificate it signs for [`BACKEND_TLS_NAME`], which nginx
/// serves on every backend's port 443 (the HTTPS health-check target).
fn make_backend_certificate() -> Result<()> {
    let dir = format!("{DIR}/tls");
    fs::create_dir_all(&dir)?;
    fs::write(
        format!("{dir}/backend.ext"),
        format!(
            "subjectAltName=DNS:{BACKEND_TLS_NAME}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\n"
        ),
    )?;
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let at = |f: &str| format!("{dir}/{f}");
    let mut ca = vec!["req", "-x509", "-days", "30", "-subj", "/CN=lb-lab backends CA"];
    ca.extend(key);
    let (ca_key, ca_pem) = (at("ca.key"), at("ca.pem"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_pem]);
    sh("openssl", &ca)?;
    let mut csr = vec!["req", "-subj", "/CN=lb-lab backend"];
    csr.extend(key);
    let (be_key, be_csr, be_pem, ext) = (at("backend.key"), at("backend.csr"), at("backend.pem"), at("backend.ext"));
    csr.extend(["-keyout", &be_key, "-out", &be_csr]);
    sh("openssl", &csr)?;
    sh(
        "openssl",
        &["x509", "-req", "-days", "30", "-in", &be_csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial"]
            .into_iter()
            .chain(["-extfile", &ext, "-out", &be_pem])
            .collect::<Vec<_>>(),
    )?;
    Ok(())
}

/// A failed test's lab logs outlive the lab: copied to a directory under
/// /tmp that is named on stderr.
fn save_logs() {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let keep = format!("/tmp/lb-lab-failed-{stamp}");
    let mut copied = 0;
    for dir in [DIR.to_string()].into_iter().chain((1..=BACKENDS).map(|j| format!("{DIR}/be{j}"))) {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") && fs::create_dir_all(&keep).is_ok() {
                let name = path.strip_prefix(DIR).unwrap_or(&path).to_string_lossy().replace('/', "-");
                copied += fs::copy(&path, format!("{keep}/{name}")).is_ok() as usize;
            }
        }
    }
    if copied > 0 {
        eprintln!("lab logs of the failed test kept in {keep}");
    }
}

fn remove_dir(dir: &str) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

pub(crate) fn pid_alive(pid_file: &str) -> bool {
    fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()).is_some_and(running)
}

/// Alive and not a zombie (an orphan's zombie may linger if nobody reaps it).
fn running(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    matches!(state, Some(s) if s != 'Z' && s != 'X')
}

/// Signals the process named in a pid file the lab wrote, then drops the file.
pub(crate) fn kill_pid_file(pid_file: &str, signal: i32) {
    if let Some(pid) = fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
        unsafe { libc::kill(pid, signal) };
        let start = Instant::now();
        while start.elapsed() < PATIENCE {
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            if !running(pid) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = fs::remove_file(pid_file);
}

/// How long a wait for a condition may last before it counts as failed:
/// far beyond what any step takes, so a loaded 2-core machine never fails a
/// test by being slow. Tests print the time a wait really took.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `ok` until it holds; fails after `limit`.
pub fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("not within {limit:?}")
}

/// Writes progress lines to stdout (for xtask).
pub fn print_step(line: &str) {
    println!("    {line}");
    let _ = std::io::stdout().flush();
}

/// Echo server of every backend: each TCP line comes back as
/// "NAME LINE"; each UDP datagram as "NAME DATAGRAM".
const ECHO_SERVER: &str = r#"
import os, socket, sys, threading
name, ready, addrs = sys.argv[1], sys.argv[2], sys.argv[3:]
PORT = 9000

def serve_tcp(conn):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(name.encode() + b" " + line)

def tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_tcp, args=(c,), daemon=True).start()

def udp(s):
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(name.encode() + b" " + data, peer)

# Bind everything first, then say so: the lab waits for the ready file.
for a in addrs:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((a, PORT)); t.listen(128)
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((a, PORT))
    threading.Thread(target=tcp, args=(t,), daemon=True).start()
    threading.Thread(target=udp, args=(u,), daemon=True).start()
open(ready, "w").close()
threading.Event().wait()
"#;
