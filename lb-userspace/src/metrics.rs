//! Prometheus text exposition (format 0.0.4) at `/metrics`, served by
//! `lbctl up --metrics ADDR:PORT`. Counters are read from the data plane's
//! per-CPU maps at scrape time and summed over CPUs.

use std::{fmt::Write as _, sync::Arc};

use lb_common::stat;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{info, warn};

use crate::{controller::Controller, health::LATENCY_BUCKETS};

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctrl: Arc<Controller>) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    loop {
        let (mut stream, _) = listener.accept().await?;
        let ctrl = Arc::clone(&ctrl);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n]);
            let (status, body) = if line.starts_with("GET /metrics") {
                match render(&ctrl) {
                    Ok(body) => ("200 OK", body),
                    Err(e) => {
                        warn!(error = %e, "cannot render metrics");
                        ("500 Internal Server Error", format!("{e}\n"))
                    }
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// Label values are escaped as the text format asks (`\`, `"`, newline).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(ctrl: &Controller) -> Result<String, crate::controller::ApiError> {
    let mut out = String::new();
    let mut guard = ctrl.lock();
    let st = &mut *guard;
    let global = st.dp.global_stats()?;

    family(&mut out, "lb_packets_total", "counter", "Packets seen by the XDP program, by outcome.");
    for (i, name) in stat::NAMES.iter().enumerate().take(stat::OUTCOMES) {
        let _ = writeln!(out, "lb_packets_total{{outcome=\"{name}\"}} {}", global[i]);
    }
    family(&mut out, "lb_conn_lookups_total", "counter", "VIP packets by conn-table result (hit: known flow).");
    let _ = writeln!(out, "lb_conn_lookups_total{{result=\"hit\"}} {}", global[stat::CONN_HIT]);
    let _ = writeln!(out, "lb_conn_lookups_total{{result=\"miss\"}} {}", global[stat::CONN_MISS]);
    family(
        &mut out,
        "lb_new_flows_untracked_total",
        "counter",
        "New flows not remembered: SYN-flood guard over its rate.",
    );
    let _ = writeln!(out, "lb_new_flows_untracked_total {}", global[stat::CONN_UNTRACKED]);

    let (entries, capacity) = st.dp.conn_count()?;
    family(&mut out, "lb_conn_table_entries", "gauge", "Flows in the conn table.");
    let _ = writeln!(out, "lb_conn_table_entries {entries}");
    family(&mut out, "lb_conn_table_capacity", "gauge", "Conn-table size (LRU: full tables evict).");
    let _ = writeln!(out, "lb_conn_table_capacity {capacity}");

    let vips: Vec<_> = st.services.vips().cloned().collect();
    let mut vip_lines = [String::new(), String::new(), String::new(), String::new()];
    let mut backend_lines = [String::new(), String::new(), String::new(), String::new()];
    for v in &vips {
        let name = label(&v.spec.vip.to_string());
        let s = st.dp.vip_stats(v.id)?;
        let _ = writeln!(vip_lines[0], "lb_vip_packets_total{{vip=\"{name}\"}} {}", s.packets);
        let _ = writeln!(vip_lines[1], "lb_vip_bytes_total{{vip=\"{name}\"}} {}", s.bytes);
        let _ = writeln!(vip_lines[2], "lb_vip_new_flows_total{{vip=\"{name}\"}} {}", s.new_flows);
        let _ = writeln!(vip_lines[3], "lb_vip_fail_open{{vip=\"{name}\"}} {}", v.fail_open as u8);
        for (addr, b) in &v.backends {
            let labels = format!("vip=\"{name}\",backend=\"{addr}\"");
            let s = st.dp.backend_stats(b.id)?;
            let checked = st.checks.get(&(v.spec.vip, *addr));
            let up = checked.map(|c| c.tracker.healthy).unwrap_or(true);
            let _ = writeln!(backend_lines[0], "lb_backend_packets_total{{{labels}}} {}", s.packets);
            let _ = writeln!(backend_lines[1], "lb_backend_bytes_total{{{labels}}} {}", s.bytes);
            let _ = writeln!(backend_lines[2], "lb_backend_up{{{labels}}} {}", up as u8);
            let _ = writeln!(backend_lines[3], "lb_backend_in_ring{{{labels}}} {}", v.in_ring(b) as u8);
        }
    }
    let vip_families = [
        ("lb_vip_packets_total", "counter", "Packets for a VIP."),
        ("lb_vip_bytes_total", "counter", "Bytes (IP packet length) for a VIP."),
        ("lb_vip_new_flows_total", "counter", "Flows balanced by the VIP's Maglev ring."),
        ("lb_vip_fail_open", "gauge", "1 when every backend is down and the VIP serves with all of them."),
    ];
    for ((name, kind, help), lines) in vip_families.iter().zip(&vip_lines) {
        family(&mut out, name, kind, help);
        out.push_str(lines);
    }
    let backend_families = [
        ("lb_backend_packets_total", "counter", "Packets forwarded to a backend."),
        ("lb_backend_bytes_total", "counter", "Bytes (inner IP length) forwarded to a backend."),
        ("lb_backend_up", "gauge", "Health-check verdict: 1 up (or unchecked), 0 down."),
        ("lb_backend_in_ring", "gauge", "1 when the backend takes new flows."),
    ];
    for ((name, kind, help), lines) in backend_families.iter().zip(&backend_lines) {
        family(&mut out, name, kind, help);
        out.push_str(lines);
    }

    family(&mut out, "lb_health_check_duration_seconds", "histogram", "Health-check probe latency.");
    for ((vip, addr), c) in &st.checks {
        let labels = format!("vip=\"{}\",backend=\"{addr}\"", label(&vip.to_string()));
        let h = &c.tracker.latency;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
            let _ = writeln!(out, "lb_health_check_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "lb_health_check_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "lb_health_check_duration_seconds_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "lb_health_check_duration_seconds_count{{{labels}}} {}", h.count);
    }
    family(&mut out, "lb_health_check_failures_total", "counter", "Failed health-check probes.");
    for ((vip, addr), c) in &st.checks {
        let labels = format!("vip=\"{}\",backend=\"{addr}\"", label(&vip.to_string()));
        let _ = writeln!(out, "lb_health_check_failures_total{{{labels}}} {}", c.tracker.failures);
    }

    family(&mut out, "lb_ring_swaps_total", "counter", "Maglev rings built and made live.");
    let _ = writeln!(out, "lb_ring_swaps_total {}", st.services.ring_swaps);
    family(&mut out, "lb_ring_swap_duration_seconds_total", "counter", "Time spent building and swapping rings.");
    let _ = writeln!(out, "lb_ring_swap_duration_seconds_total {}", st.services.ring_swap_seconds);
    family(&mut out, "lb_build_info", "gauge", "The controller's version and interface.");
    let _ = writeln!(
        out,
        "lb_build_info{{version=\"{}\",interface=\"{}\",xdp_mode=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        label(&ctrl.info.interface),
        label(&ctrl.info.xdp_mode)
    );
    Ok(out)
}
