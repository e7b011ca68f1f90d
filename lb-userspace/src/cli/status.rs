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
        ("adopted", s.adopted.to_string()),
        ("next-hop MAC", s.next_hop_mac.clone()),
        ("encap source", format!("{} {}", s.encap_src_v4, s.encap_src_v6)),
        ("MTU", s.mtu.to_string()),
        ("conn table", s.conn_table_size.to_string()),
        ("VIPs", s.vips.to_string()),
        ("backends", s.backends.to_string()),
        ("failing open", fail_open),
        ("debug logging", if s.debug { "on" } else { "off" }.to_string()),
        ("uptime", format!("{} s", s.uptime_seconds)),
        ("version", s.version.clone()),
    ] {
        println!("{k:<14} {v}");
    }
    Ok(())
}

pub async fn debug(state: &str, client: &ClientOpts) -> Result<()> {
    let on = state == "on";
    StatusClient::new(connect(client).await?).set_debug(pb::DebugRequest { on }).await?;
    println!("data-plane decision logging {state} (in the controller's log)");
    Ok(())
}
