//! `lbctl stats [--watch]` and `lbctl explain`.

use std::time::{Duration, Instant};

use anyhow::Result;
use lb_userspace::api::pb::{self, stats_client::StatsClient};

use super::{
    client::connect,
    output::{print_backends, print_json, print_table, print_vips},
    ClientOpts, Format,
};

pub async fn stats(watch: bool, client: &ClientOpts) -> Result<()> {
    let mut api = StatsClient::new(connect(client).await?);
    let mut previous: Option<(Instant, pb::StatsReply)> = None;
    loop {
        let now = api.get_stats(pb::Empty {}).await?.into_inner();
        if client.output == Format::Json {
            print_json(&now)?;
        } else if let (true, Some((at, before))) = (watch, &previous) {
            print!("\x1b[2J\x1b[H");
            print_rates(&now, before, at.elapsed().as_secs_f64());
        } else {
            print_table(&["counter", "value"], now.global.iter().map(|c| vec![c.name.clone(), c.value.to_string()]));
            println!();
            print_vips(&now.vips, Format::Table)?;
            println!();
            print_backends(&now.backends, Format::Table)?;
        }
        if !watch {
            return Ok(());
        }
        previous = Some((Instant::now(), now));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Per-second rates between two samples, in 80 columns.
fn print_rates(now: &pb::StatsReply, before: &pb::StatsReply, secs: f64) {
    let rate = |a: u64, b: u64| format!("{:.0}", a.saturating_sub(b) as f64 / secs.max(0.001));
    let bps = |a: u64, b: u64| format!("{:.0}", a.saturating_sub(b) as f64 * 8.0 / secs.max(0.001));
    print_table(
        &["vip", "pps", "bps", "new flows/s"],
        now.vips.iter().map(|v| {
            let b = before.vips.iter().find(|x| x.vip == v.vip).cloned().unwrap_or_default();
            vec![v.vip.clone(), rate(v.packets, b.packets), bps(v.bytes, b.bytes), rate(v.new_flows, b.new_flows)]
        }),
    );
    println!();
    print_table(
        &["vip", "backend", "health", "pps", "bps"],
        now.backends.iter().map(|x| {
            let b =
                before.backends.iter().find(|y| y.vip == x.vip && y.address == x.address).cloned().unwrap_or_default();
            vec![x.vip.clone(), x.address.clone(), x.health.clone(), rate(x.packets, b.packets), bps(x.bytes, b.bytes)]
        }),
    );
}

pub async fn explain(client_addr: String, vip: String, client: &ClientOpts) -> Result<()> {
    let r = StatsClient::new(connect(client).await?)
        .explain(pb::ExplainRequest { client: client_addr.clone(), vip: vip.clone() })
        .await?
        .into_inner();
    if client.output == Format::Json {
        return print_json(&r);
    }
    match r.via.as_str() {
        "conn-table" => println!("{client_addr} -> {vip}: backend {} (conn table: an existing flow)", r.backend),
        _ => println!(
            "{client_addr} -> {vip}: backend {} (Maglev ring slot {} of hash {:#010x}: a new flow)",
            r.backend, r.slot, r.hash
        ),
    }
    if !r.alternates.is_empty() {
        println!(
            "  alternate hop {} (the ring history's backends, carried in GUE by TCP after the SYN)",
            r.alternates.join(", then ")
        );
    }
    Ok(())
}
