//! Tables and JSON for the client subcommands.

use anyhow::Result;
use lb_userspace::api::pb;
use serde::Serialize;

use super::Format;

pub fn print_vips(vips: &[pb::Vip], format: Format) -> Result<()> {
    if format == Format::Json {
        return print_json(&vips);
    }
    print_table(
        &[
            "vip",
            "hash",
            "ring",
            "encap",
            "state",
            "backends",
            "in ring",
            "packets",
            "bytes",
            "new flows",
            "fingerprint",
            "history",
            "announced",
        ],
        vips.iter().map(|v| {
            let in_ring =
                if v.fail_open { format!("{} (FAIL OPEN)", v.active_backends) } else { v.active_backends.to_string() };
            vec![
                v.vip.clone(),
                v.hash.clone(),
                v.ring_size.to_string(),
                v.encap.clone(),
                vip_state(v),
                v.backends.to_string(),
                in_ring,
                v.packets.to_string(),
                v.bytes.to_string(),
                v.new_flows.to_string(),
                v.ring_fingerprint.clone(),
                short_fingerprints(&v.history_fingerprints),
                v.announced.clone(),
            ]
        }),
    );
    Ok(())
}

/// Conn table or not, and a QUIC VIP's connection-ID layout.
fn vip_state(v: &pb::Vip) -> String {
    let table = if v.stateless { "stateless" } else { "conntrack" };
    match &v.quic {
        Some(q) if q.enabled => {
            format!("{table}, quic (config {}, server id {}B, nonce {}B)", q.config_id, q.server_id_len, q.nonce_len)
        }
        _ => table.into(),
    }
}

/// The history's fingerprints, newest first, by their first 8 digits
/// (`-o json` has them whole).
fn short_fingerprints(fingerprints: &[String]) -> String {
    let short: Vec<&str> = fingerprints.iter().map(|f| f.get(..8).unwrap_or(f)).collect();
    short.join(",")
}

pub fn print_backends(backends: &[pb::Backend], format: Format) -> Result<()> {
    if format == Format::Json {
        return print_json(&backends);
    }
    // QUIC VIPs' backends have server IDs: a column of their own, last.
    let quic = backends.iter().any(|b| !b.server_id.is_empty());
    let mut headers =
        vec!["vip", "backend", "weight", "state", "health", "check", "packets", "bytes", "syn repeats", "reason"];
    if quic {
        headers.push("server id");
    }
    print_table(
        &headers,
        backends.iter().map(|b| {
            let state = if b.drained {
                "drained"
            } else if b.in_ring {
                "active"
            } else {
                "out of ring"
            };
            let mut row = vec![
                b.vip.clone(),
                b.address.clone(),
                b.weight.to_string(),
                state.into(),
                b.health.clone(),
                b.check.clone(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.syn_repeats.to_string(),
                b.reason.clone(),
            ];
            if quic {
                row.push(b.server_id.clone());
            }
            row
        }),
    );
    Ok(())
}

pub fn print_table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

pub fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
