//! `cargo xtask demo`: the lab up, VIPs configured through lbctl, real HTTP
//! from many client addresses and ports, the spread over backends, the LB's
//! counters, a health-check failover and recovery, a backend without its
//! VIP caught by the data-path checks, and the lab removed.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_lab::{client_v4, client_v6, wait_for, Lab};

use crate::step;

pub fn demo(root: &Path, lbctl: &Path) -> Result<()> {
    let started = Instant::now();
    println!("==> lab up: client, router (ECMP by BGP), lb1, lb2, be1..be3");
    let lab = Lab::up(lbctl, &mut lb_lab::print_step)?;
    let config = root.join("examples/lab.toml");
    step("configure both LB hosts: lbctl apply -f examples/lab.toml", || {
        let mut printed = String::new();
        for i in 1..=lb_lab::LBS {
            let out = lab.lbctl(i, &["apply", "-f", config.to_str().unwrap()]);
            if !out.status.success() {
                bail!("apply on lb{i}: {}", String::from_utf8_lossy(&out.stderr));
            }
            if i == 1 {
                printed = String::from_utf8_lossy(&out.stdout).lines().map(|l| format!("    {l}\n")).collect();
            }
        }
        print!("{printed}");
        Ok("applied on lb1 and lb2".into())
    })?;
    step("both LB hosts announce the VIPs over BGP (BIRD); the router's routes", || {
        for vip in [lb_lab::VIP4, lb_lab::VIP6] {
            lab.wait_routes(vip, &[1, 2])?;
            let family = if vip.contains(':') { "-6" } else { "-4" };
            let route = lb_lab::ns(lb_lab::ROUTER_NS, &["ip", family, "route", "show", vip])?;
            print!("{}", route.lines().map(|l| format!("    {l}\n")).collect::<String>());
        }
        Ok("two next hops each (ECMP)".into())
    })?;
    step("200 HTTP requests over IPv4 from 4 client addresses (weights 1:1:2)", || {
        print_spread(&spread(&lab, 200, false)?);
        Ok("done".into())
    })?;
    step("40 HTTP requests over IPv6", || {
        print_spread(&spread(&lab, 40, true)?);
        Ok("done".into())
    })?;
    step("the LB hosts' counters (lbctl vip list)", || {
        for i in 1..=lb_lab::LBS {
            println!("    lb{i}:");
            let out = lab.lbctl(i, &["vip", "list"]);
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                println!("      {l}");
            }
        }
        Ok("ECMP spread the flows over both LB hosts".into())
    })?;
    step("failover: stop nginx on be3 and wait for the health checks", || {
        lab.stop_servers(3)?;
        let t = Instant::now();
        wait_for(Duration::from_secs(5), || backend_is(&lab, "198.51.100.50", "down"))?;
        println!(
            "    be3 out of the ring on both LB hosts after {:.1} s (interval 500ms x fall 2)",
            t.elapsed().as_secs_f64()
        );
        let counts = spread(&lab, 100, false)?;
        print_spread(&counts);
        if counts.contains_key("be3") {
            bail!("be3 answered while down");
        }
        Ok("every request answered by be1 and be2".into())
    })?;
    step("recovery: start be3 again", || {
        lab.start_servers(3)?;
        let t = Instant::now();
        wait_for(Duration::from_secs(5), || backend_is(&lab, "198.51.100.50", "up"))?;
        println!("    be3 back after {:.1} s (rise 2)", t.elapsed().as_secs_f64());
        print_spread(&spread(&lab, 100, false)?);
        Ok("be3 serves again".into())
    })?;
    step("data-path checks: be2 loses the VIP from its lo (its own address still answers)", || {
        let be2 = lb_lab::backend_ns(2);
        let vip = format!("{}/32", lb_lab::VIP4);
        lb_lab::ns(&be2, &["ip", "addr", "del", &vip, "dev", "lo"])?;
        let t = Instant::now();
        wait_for(Duration::from_secs(5), || backend_is(&lab, "198.51.100.34", "down"))?;
        println!("    be2 out of the ring on both LB hosts after {:.1} s", t.elapsed().as_secs_f64());
        let counts = spread(&lab, 100, false)?;
        print_spread(&counts);
        lb_lab::ns(&be2, &["ip", "addr", "add", &vip, "dev", "lo"])?;
        wait_for(Duration::from_secs(5), || backend_is(&lab, "198.51.100.34", "up"))?;
        if counts.contains_key("be2") {
            bail!("be2 answered without the VIP");
        }
        Ok("the check to the VIP through be2 failed; the VIP back on lo, be2 is up again".into())
    })?;
    step("tear down", || {
        drop(lab);
        Ok("namespaces, processes and pins removed".into())
    })?;
    println!("demo finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Whether every LB host reports `addr` in `state` ("down" or "up").
fn backend_is(lab: &Lab, addr: &str, state: &str) -> bool {
    (1..=lb_lab::LBS).all(|i| {
        let out = lab.lbctl(i, &["backend", "list", "203.0.113.10:80/tcp"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(addr) && l.split_whitespace().any(|w| w == state))
    })
}

/// `n` HTTP requests, each a new connection, round-robin over the client's
/// addresses; counts the answering backends (nginx returns its name).
fn spread(lab: &Lab, n: usize, ipv6: bool) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for k in 0..n {
        let (src, url) = if ipv6 {
            (client_v6(k % 4), "http://[2001:db8:f::10]/")
        } else {
            (client_v4(k % 4), "http://203.0.113.10/")
        };
        let body = lab.curl(&src, url)?;
        *counts.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    Ok(counts)
}

fn print_spread(counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    for (backend, n) in counts {
        let bar = "#".repeat(n * 40 / total.max(1));
        println!("    {backend}: {n:>4} ({:>5.1}%) {bar}", *n as f64 * 100.0 / total as f64);
    }
}
