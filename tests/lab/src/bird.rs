//! BIRD 2 in the lab: the router peers over eBGP (with BFD) with both LB
//! hosts and installs what they announce as ECMP routes; each LB host's
//! BIRD imports the VIP routes its controller keeps in kernel table
//! [`ANNOUNCE_TABLE`] and announces them. One daemon per namespace, each
//! with its own control socket: `birdc -s /run/lb-lab/bird-lbl-router.ctl
//! show route`.

use std::{fs, process::Command};

use anyhow::{Context, Result};

use crate::{lb_ns, ns, wait_for, DIR, LBS, PATIENCE, ROUTER_NS};

/// The kernel table the lab's controllers announce into (`--announce-table`).
pub const ANNOUNCE_TABLE: u32 = 100;
const ROUTER_AS: u32 = 65000;
/// Both LB hosts share an AS, so the router sees equal paths and merges
/// them into one multipath route.
const LB_AS: u32 = 65001;

/// BFD at 100 ms x 3 and fast session retries (the defaults wait minutes).
const COMMON: &str = "protocol device {}
protocol bfd {
  interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };
}
";
const TIMERS: &str = "bfd on;\n  hold time 9; keepalive time 3;\n  connect delay time 1; connect retry time 2; \
                      error wait time 1, 2;";

pub fn socket(netns: &str) -> String {
    format!("{DIR}/bird-{netns}.ctl")
}

fn pid_file(netns: &str) -> String {
    format!("{DIR}/bird-{netns}.pid")
}

fn router_config() -> String {
    let mut c = format!("router id 198.51.100.1;\n{COMMON}");
    // Into the router's main table: every path, merged (ECMP).
    for family in ["ipv4", "ipv6"] {
        c += &format!("protocol kernel {{\n  {family} {{ export where source = RTS_BGP; }};\n  merge paths on;\n}}\n");
    }
    for i in 1..=LBS {
        let peers = [
            ("ipv4", format!("198.51.100.{}", 4 * i - 3), format!("198.51.100.{}", 4 * i - 2)),
            ("ipv6", format!("2001:db8:a{i}::1"), format!("2001:db8:a{i}::2")),
        ];
        for (family, local, neighbor) in peers {
            c += &format!(
                "protocol bgp lb{i}_{family} {{\n  local {local} as {ROUTER_AS};\n  neighbor {neighbor} as {LB_AS};\n  \
                 {TIMERS}\n  {family} {{ import all; export none; }};\n}}\n"
            );
        }
    }
    c
}

fn lb_config(i: usize) -> String {
    let mut c = format!("router id 198.51.100.{};\n{COMMON}", 4 * i - 2);
    // The controller's routes (written by another program: `learn`).
    for family in ["ipv4", "ipv6"] {
        c += &format!(
            "protocol kernel vips_{family} {{\n  {family} {{ import all; export none; }};\n  kernel table {ANNOUNCE_TABLE};\n  \
             learn;\n}}\n"
        );
    }
    let peers = [
        ("ipv4", format!("198.51.100.{}", 4 * i - 2), format!("198.51.100.{}", 4 * i - 3)),
        ("ipv6", format!("2001:db8:a{i}::2"), format!("2001:db8:a{i}::1")),
    ];
    for (family, local, neighbor) in peers {
        c += &format!(
            "protocol bgp tor_{family} {{\n  local {local} as {LB_AS};\n  neighbor {neighbor} as {ROUTER_AS};\n  \
             {TIMERS}\n  {family} {{ import none; export where proto = \"vips_{family}\"; }};\n}}\n"
        );
    }
    c
}

/// Starts BIRD in `netns` with `config`.
fn start(netns: &str, config: &str) -> Result<()> {
    let conf = format!("{DIR}/bird-{netns}.conf");
    fs::write(&conf, config)?;
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "bird", "-c", &conf, "-s", &socket(netns), "-P", &pid_file(netns)])
        .output()
        .context("starting bird (apt package bird2; cargo xtask setup installs it)")?;
    anyhow::ensure!(out.status.success(), "bird in {netns}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Starts every daemon and waits for every BGP session to be established.
pub fn start_all() -> Result<()> {
    start(ROUTER_NS, &router_config())?;
    for i in 1..=LBS {
        start(&lb_ns(i), &lb_config(i))?;
    }
    wait_for(PATIENCE, || sessions_up(ROUTER_NS) == 2 * LBS)
        .with_context(|| format!("BGP sessions did not come up: {}", birdc(ROUTER_NS, "show protocols")))
}

/// Established BGP sessions of the daemon in `netns`.
pub fn sessions_up(netns: &str) -> usize {
    birdc(netns, "show protocols").lines().filter(|l| l.contains(" BGP ") && l.contains("Established")).count()
}

pub fn birdc(netns: &str, command: &str) -> String {
    let out = Command::new("birdc").args(["-s", &socket(netns)]).args(command.split(' ')).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Kills the daemon of LB host `i` with `signal` (SIGKILL: no goodbye to
/// its peers; only BFD tells the router).
pub fn kill_lb(i: usize, signal: i32) {
    crate::kill_pid_file(&pid_file(&lb_ns(i)), signal);
}

/// Starts the daemon of LB host `i` again, as the lab first started it.
pub fn start_lb(i: usize) -> Result<()> {
    start(&lb_ns(i), &lb_config(i))
}

/// Stops the daemon in `netns` (if running).
pub fn stop(netns: &str) {
    crate::kill_pid_file(&pid_file(netns), libc::SIGTERM);
}

pub fn stop_all() {
    stop(ROUTER_NS);
    for i in 1..=LBS {
        stop(&lb_ns(i));
    }
}

pub fn status() -> String {
    let mut out = String::new();
    for n in std::iter::once(ROUTER_NS.to_string()).chain((1..=LBS).map(lb_ns)) {
        let running = crate::pid_alive(&pid_file(&n));
        let state = if running { format!("{} BGP sessions up", sessions_up(&n)) } else { "stopped".into() };
        out += &format!("bird in {n}: {state}  (birdc -s {} show route)\n", socket(&n));
    }
    out
}

/// The LB hosts the router's FIB sends `addr` to (by next-hop address).
pub fn next_hops(addr: &str) -> Vec<usize> {
    let family = if addr.contains(':') { "-6" } else { "-4" };
    let routes = ns(ROUTER_NS, &["ip", family, "route", "show", addr]).unwrap_or_default();
    let mut hosts: Vec<usize> = (1..=LBS)
        .filter(|i| {
            let v4 = format!("via 198.51.100.{} ", 4 * i - 2);
            let v6 = format!("via 2001:db8:a{i}::2 ");
            routes.contains(&v4) || routes.contains(&v6)
        })
        .collect();
    hosts.sort();
    hosts
}
