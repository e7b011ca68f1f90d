//! `lbctl status` and `lbctl debug on|off`.

use anyhow::Result;
use lb_userspace::api::pb::{self, status_client::StatusClient};

use super::{client::connect, output::print_json, ClientOpts, Format};

pub async fn status(client: &ClientOpts) -> Result<()> {
    let s = StatusClient::new(connect(client).await?).get_status(pb::Empty {}).await?.into_inner();
    if client.output == Format::Json {
        return print_json(&s);
    }
    let fail_open = if s.fail_open_vips.is_empty() { "none".to_string() } else { s.fail_open_vips.join(", ") };
    for (k, v) in [
        ("interface", s.interface.clone()),
        ("xdp mode", s.xdp_mode.clone()),
        ("backends via", backends_via(&s)),
        ("VLANs", vlans(&s)),
        ("adopted", s.adopted.to_string()),
        ("next-hop MAC", s.next_hop_mac.clone()),
        ("encap source", format!("{} {}", s.encap_src_v4, s.encap_src_v6)),
        ("MTU", s.mtu.to_string()),
        ("conn table", s.conn_table_size.to_string()),
        ("VIPs", s.vips.to_string()),
        ("backends", s.backends.to_string()),
        ("failing open", fail_open),
        ("debug logging", if s.debug { "on" } else { "off" }.to_string()),
        ("announce", announce_summary(&s)),
        ("programs", if s.programs.is_empty() { "none attached".into() } else { s.programs.join("; ") }),
        ("health checks", checks_summary(&s)),
        ("data-path checks", s.data_path_checks.clone()),
        ("uptime", format!("{} s", s.uptime_seconds)),
        ("version", s.version.clone()),
    ] {
        println!("{k:<14} {v}");
    }
    Ok(())
}

/// Where packets for backends leave.
fn backends_via(s: &pb::StatusReply) -> String {
    if s.backend_interface.is_empty() {
        format!("{} (XDP_TX)", s.interface)
    } else {
        format!("{} (XDP_REDIRECT: two NICs)", s.backend_interface)
    }
}

/// The trunk settings: tags are balanced either way.
fn vlans(s: &pb::StatusReply) -> String {
    let trunk =
        if s.trunk { "trunk (the NIC leaves tags in the frame)" } else { "tagged frames balanced as they come" };
    if s.vlan_map.is_empty() {
        trunk.to_string()
    } else {
        format!("{trunk}; forwarded on VLAN {}", s.vlan_map.join(", "))
    }
}

/// Checks, the probes that run them, and whether probes keep their time.
fn checks_summary(s: &pb::StatusReply) -> String {
    if s.checks == 0 {
        return "none".into();
    }
    format!(
        "{} checks in {} probe tasks (a target checked alike in several VIPs is probed once); \
         probes start late by {:.1} ms at the 99th percentile",
        s.checks, s.probe_tasks, s.probe_lateness_p99_ms
    )
}

/// `lbctl announce withdraw|restore|status`.
#[derive(clap::Subcommand)]
pub enum AnnounceCommand {
    /// Withdraw every route (out of ECMP) and keep forwarding: maintenance.
    Withdraw,
    /// Announce again what can serve.
    Restore,
    /// The announce table and the routes it holds.
    Status,
}

pub async fn announce(command: AnnounceCommand, client: &ClientOpts) -> Result<()> {
    let mut api = StatusClient::new(connect(client).await?);
    let s = match command {
        AnnounceCommand::Withdraw => api.set_announce(pb::AnnounceRequest { withdraw: true }).await?,
        AnnounceCommand::Restore => api.set_announce(pb::AnnounceRequest { withdraw: false }).await?,
        AnnounceCommand::Status => api.get_status(pb::Empty {}).await?,
    }
    .into_inner();
    if client.output == Format::Json {
        #[derive(serde::Serialize)]
        struct Announce<'a> {
            table: u32,
            maintenance: bool,
            announced: &'a [String],
            error: &'a str,
        }
        return print_json(&Announce {
            table: s.announce_table,
            maintenance: s.announce_maintenance,
            announced: &s.announced,
            error: &s.announce_error,
        });
    }
    println!("{}", announce_summary(&s));
    for addr in &s.announced {
        println!("  {addr}");
    }
    Ok(())
}

/// One line: where routes go and in what state.
fn announce_summary(s: &pb::StatusReply) -> String {
    if s.announce_table == 0 {
        return "off (no --announce-table)".into();
    }
    let state = if s.announce_maintenance { "withdrawn for maintenance" } else { "announcing" };
    let error =
        if s.announce_error.is_empty() { String::new() } else { format!("; last update failed: {}", s.announce_error) };
    format!("table {}, {state}, {} route(s){error}", s.announce_table, s.announced.len())
}

pub async fn debug(state: &str, client: &ClientOpts) -> Result<()> {
    let on = state == "on";
    StatusClient::new(connect(client).await?).set_debug(pb::DebugRequest { on }).await?;
    println!("data-plane decision logging {state} (in the controller's log)");
    Ok(())
}
