//! `cargo xtask bench [--quick] [--json PATH]`: Maglev builds (criterion),
//! then the runner in `tests/benches/bench.rs` (data plane, control plane,
//! lab). Prints one table with ratios to the floors measured in the same
//! run, and writes all numbers to one JSON file.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{run, step};

const MAGLEV: [(&str, &str); 3] = [
    ("m65537_n100", "maglev.build_ms.m65537_n100"),
    ("m65537_n1000", "maglev.build_ms.m65537_n1000"),
    ("m655373_n10000", "maglev.build_ms.m655373_n10000"),
];

pub fn bench(root: &Path, quick: bool, json: Option<&Path>) -> Result<()> {
    let mut results: BTreeMap<String, f64> = BTreeMap::new();
    step("Maglev ring builds (criterion)", || {
        let time = if quick {
            ["--warm-up-time", "1", "--measurement-time", "2"]
        } else {
            ["--warm-up-time", "2", "--measurement-time", "5"]
        };
        run(Command::new("cargo")
            .current_dir(root)
            .args(["bench", "-q", "-p", "lb-userspace", "--bench", "maglev", "--"])
            .args(time))?;
        for (id, key) in MAGLEV {
            let path = root.join(format!("target/criterion/maglev_build/{id}/new/estimates.json"));
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let ns = v["median"]["point_estimate"].as_f64().context("criterion estimate without a median")?;
            results.insert(key.to_string(), ns / 1e6);
        }
        Ok("done".into())
    })?;
    crate::build_lbctl(root)?;
    step("data plane, control plane and lab benchmarks", || {
        let partial = root.join("target/bench-partial.json");
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root).args(["bench", "-q", "-p", "lb-tests", "--bench", "bench", "--", "--json"]).arg(&partial);
        if quick {
            cmd.arg("--quick");
        }
        run(&mut cmd)?;
        let more: BTreeMap<String, f64> = serde_json::from_str(&std::fs::read_to_string(&partial)?)?;
        results.extend(more);
        Ok("done".into())
    })?;
    print_table(&results);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(r: &BTreeMap<String, f64>) {
    let get = |k: &str| r.get(k).copied().unwrap_or(f64::NAN);
    let floor_pass = get("dataplane.floor_pass_ns");
    let floor_tx = get("dataplane.floor_tx_ns");
    let undo = get("dataplane.floor_restore_ns") - floor_tx;
    println!();
    println!("{:<34} {:>10} {:>10} {:>10}  vs floor", "per packet (ns)", "median", "min", "max");
    for (key, floor, forwards) in [
        ("dataplane.floor_pass_ns", floor_pass, false),
        ("dataplane.floor_tx_ns", floor_tx, false),
        ("dataplane.floor_restore_ns", floor_tx, false),
        ("dataplane.v4_established_ns", floor_tx, true),
        ("dataplane.v6_established_ns", floor_tx, true),
        ("dataplane.v4_udp_ns", floor_tx, true),
        ("dataplane.v4_new_flow_ns", floor_tx, true),
        ("dataplane.v4_new_flow_full_table_ns", floor_tx, true),
        ("dataplane.v4_syn_repeat_ns", floor_tx, true),
        ("dataplane.gue_stateless_established_ns", floor_tx, true),
        ("dataplane.gue_stateless_new_flow_ns", floor_tx, true),
        ("dataplane.gue_conntrack_established_ns", floor_tx, true),
        ("dataplane.offload_gue_stateless_established_ns", floor_tx, true),
        ("dataplane.offload_gue_stateless_new_flow_ns", floor_tx, true),
        ("dataplane.non_vip_ns", floor_pass, false),
        ("dataplane.non_ip_ns", floor_pass, false),
        ("dataplane.probe_egress_unmarked_ns", floor_pass, false),
    ] {
        let v = get(key);
        // Forwarding paths run the bench build: take its undo step off.
        let net = if forwards { v - undo } else { v };
        let note = if forwards {
            format!("{:.2}x tx floor ({net:.0} ns without the bench undo step)", net / floor)
        } else {
            format!("{:.2}x", v / floor)
        };
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>10.1}  {note}",
            key.trim_start_matches("dataplane."),
            v,
            get(&format!("{key}.min")),
            get(&format!("{key}.max"))
        );
    }
    for family in ["v4", "v6"] {
        let key = format!("dataplane.conn_bytes_per_flow_{family}");
        let name = key.trim_start_matches("dataplane.");
        println!("{name:<34} {:>10.1} bytes per tracked flow (kernel memory accounting)", get(&key));
    }
    for load in ["25", "50", "100"] {
        let key = format!("conn_table.kept_pct_at_{load}pct_load");
        println!("{key:<34} {:>10.1} % of the flows still held", get(&key));
    }
    println!("{:<34} {:>10.0} instructions", "balancer_xlated_insns", get("dataplane.balancer_xlated_insns"));
    println!();
    for (_, key) in MAGLEV {
        println!("{:<34} {:>10.2} ms", key, get(key));
    }
    println!("{:<34} {:>10.2} ms", "control.update_to_dataplane_ms", get("control.update_to_dataplane_ms"));
    let (lb, floor) = (get("e2e.lb_pps"), get("e2e.floor_pps"));
    println!("{:<34} {:>10.0} pps  ({:.2}x the bounce-only floor, {floor:.0} pps)", "e2e.lb_pps", lb, lb / floor);
    let floor_mpps = get("per_core.floor_restore_mpps");
    for (key, value) in
        r.iter().filter(|(k, _)| k.starts_with("per_core.") && !k.contains(".min") && !k.contains(".max"))
    {
        println!("{key:<34} {value:>10.2} Mpps on one core ({:.2}x the floor)", value / floor_mpps);
    }
    // The control plane's goals at 512 VIPs x 100 backends (issue 23).
    const GOALS: [(&str, f64); 4] = [
        ("apply_from_empty_ms", 2000.0),
        ("one_backend_add_ms", 10.0),
        ("noop_reapply_ms", 100.0),
        ("sigkill_adopt_ms", 1000.0),
    ];
    for (key, value) in r.iter().filter(|(k, _)| k.starts_with("scale.")) {
        let unit = if key.ends_with("_mib") { "MiB" } else { "ms" };
        let goal = GOALS.iter().find(|(name, _)| key.ends_with(name)).map(|(_, goal)| {
            let verdict = if *value <= *goal { "met" } else { "MISSED" };
            format!("  (goal <= {goal:.0} ms: {verdict})")
        });
        println!("{key:<34} {value:>10.1} {unit}{}", goal.unwrap_or_default());
    }
    for (key, value) in r.iter().filter(|(k, _)| k.starts_with("checks.")) {
        let unit = match key.rsplit('.').next().unwrap_or_default() {
            "controller_cpu_cores" => "cores",
            "probe_lateness_p99_ms" => "ms",
            _ => "",
        };
        println!("{key:<56} {value:>10.2} {unit}");
    }
    let (lb_rps, ha) = (get("e2e.http_rps_lb"), get("e2e.http_rps_haproxy"));
    println!("{:<34} {:>10.0} req/s ({:.2}x HAProxy TCP mode, {ha:.0} req/s)", "e2e.http_rps_lb", lb_rps, lb_rps / ha);
}
