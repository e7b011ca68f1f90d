//! Health checks by the thousand: one controller (the scale bench's site)
//! checking 10,000 backends over TCP every second, each answered by a
//! listener in the same namespace (the targets are local there through
//! routes). Printed: the controller's CPU, how late probes start (p99,
//! from `lbctl status`), the file descriptors it holds; then the same
//! 10,000 checks on 100 backends shared by 100 VIPs, which the controller
//! runs as 100 probes.

use std::{
    fmt::Write as _,
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_lab::sh;
use lb_userspace::api::pb;

use crate::{
    connect,
    scale::{Site, DIR, NETNS},
    Results,
};

const VIPS: usize = 100;
const BACKENDS: usize = 100;

const DISTINCT_TARGETS: &str = "2001:db8:b::/48";
const SHARED_TARGETS: &str = "2001:db8:c::/48";

/// Backend `b` of VIP `v` (shared: every VIP has the same 100).
fn backend(v: usize, b: usize, shared: bool) -> String {
    if shared {
        format!("2001:db8:c::{b:x}")
    } else {
        format!("2001:db8:b::{v:x}:{b:x}")
    }
}

fn desired(shared: bool) -> String {
    let mut toml = String::new();
    for v in 0..VIPS {
        let _ = writeln!(toml, "[[vip]]\nvip = \"[2001:db8::10]:{}/tcp\"\nring_size = 251", 1000 + v);
        for b in 1..=BACKENDS {
            let _ = writeln!(
                toml,
                "[[vip.backend]]\naddress = \"{}\"\ncheck = \"tcp:80\"\ninterval = \"1s\"\ntimeout = \"500ms\"",
                backend(v, b, shared)
            );
        }
    }
    toml
}

/// Accepts and closes connections on [::]:80 in the site's namespace, on a
/// thread of its own, until the process ends.
fn answer_checks() -> anyhow::Result<()> {
    let ns = std::fs::File::open(format!("/var/run/netns/{NETNS}"))?;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bound = (|| {
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(std::net::TcpListener::bind("[::]:80")?)
        })();
        match bound {
            Ok(listener) => {
                let _ = ready_tx.send(Ok(()));
                for stream in listener.incoming() {
                    drop(stream);
                }
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready.recv()?
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): utime is the 14th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<f64> = after.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / ticks
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub fn checks(r: &mut Results, lbctl: PathBuf, quick: bool) -> anyhow::Result<()> {
    let window = Duration::from_secs(if quick { 10 } else { 30 });
    eprintln!("health checks at scale: {} checks of TCP every 1 s, measured over {window:?}", VIPS * BACKENDS);
    let mut site = Site::new(lbctl)?;
    // The targets are local through routes of type local (any address in
    // them answers), not 10,000 addresses: with those on an interface the
    // kernel's source address selection, not the controller, would be
    // what is measured.
    for prefix in [DISTINCT_TARGETS, SHARED_TARGETS] {
        sh("ip", &["-n", NETNS, "-6", "route", "add", "local", prefix, "dev", "lo"])?;
    }
    sh("ip", &["-n", NETNS, "addr", "add", "2001:db8:a::1/128", "dev", "lo", "nodad"])?;
    answer_checks()?;
    let socket = format!("{DIR}/lb.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for shared in [false, true] {
        let name = if shared { "shared_targets" } else { "distinct_targets" };
        // A controller of its own for each, so the lateness is this run's.
        let pid = site.start_afresh()?;
        let (checks, tasks, lateness, cpu, fds, failed) = rt.block_on(async {
            let mut vip_api = pb::vips_client::VipsClient::new(connect(&socket).await?);
            let mut status = pb::status_client::StatusClient::new(connect(&socket).await?);
            let mut health = pb::health_client::HealthClient::new(connect(&socket).await?);
            vip_api.apply(pb::ApplyRequest { toml: desired(shared), dry_run: false }).await?;
            // One interval for every check to have started, then the window.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (cpu_before, t) = (cpu_seconds(pid), Instant::now());
            let mut fds = 0;
            while t.elapsed() < window {
                fds = fds.max(open_fds(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let cpu = (cpu_seconds(pid) - cpu_before) / t.elapsed().as_secs_f64();
            let s = status.get_status(pb::Empty {}).await?.into_inner();
            anyhow::ensure!(s.backends as usize == VIPS * BACKENDS, "{} backends", s.backends);
            let rounds = health.list_health(pb::Empty {}).await?.into_inner().backends;
            let too_few = rounds.iter().filter(|c| c.checks < window.as_secs()).count();
            anyhow::ensure!(too_few == 0, "{too_few} checks ran fewer than {} rounds", window.as_secs());
            let failed: u64 = rounds.iter().map(|c| c.failures).sum();
            let errors: std::collections::BTreeSet<&str> =
                rounds.iter().map(|c| c.last_error.as_str()).filter(|e| !e.is_empty()).collect();
            if !errors.is_empty() {
                eprintln!("  failed rounds' last errors: {errors:?}");
            }
            anyhow::Ok((s.checks, s.probe_tasks, s.probe_lateness_p99_ms, cpu, fds, failed))
        })?;
        let key = |what: &str| format!("checks.{}x{BACKENDS}_{name}.{what}", VIPS);
        r.insert(key("checks"), checks as f64);
        r.insert(key("probe_tasks"), tasks as f64);
        r.insert(key("controller_cpu_cores"), cpu);
        r.insert(key("probe_lateness_p99_ms"), lateness);
        r.insert(key("max_open_fds"), fds as f64);
        r.insert(key("failed_rounds"), failed as f64);
        eprintln!(
            "  {name}: {checks} checks in {tasks} probe tasks; controller CPU {:.0}% of a core; \
             probes late by {lateness:.1} ms (p99); at most {fds} fds open; {failed} rounds failed",
            cpu * 100.0
        );
    }
    // The client's connections close before the controller is stopped.
    drop(rt);
    drop(site);
    Ok(())
}
