//! `lbctl history export|import`: the declared ring history that every LB
//! host of a tier must share for GUE alternates to name the same backends.

use std::{io::Read, path::PathBuf};

use anyhow::{Context, Result};
use lb_userspace::api::pb::{self, vips_client::VipsClient};

use super::{client::connect, output::print_table, ClientOpts, Format};

#[derive(clap::Subcommand)]
pub enum HistoryCommand {
    /// Print every VIP's ring history as JSON (the file `import` reads).
    Export,
    /// Make this host's ring history another host's export (FILE, or - for
    /// stdin). Apply the same desired state first: each VIP must have the
    /// backends and weights of its newest generation. All or nothing.
    Import { file: PathBuf },
    /// The ring history of every VIP: fingerprints, age and backends.
    Show,
}

pub async fn run(command: HistoryCommand, client: &ClientOpts) -> Result<()> {
    let mut api = VipsClient::new(connect(client).await?);
    match command {
        HistoryCommand::Export => {
            let history = api.export_history(pb::Empty {}).await?.into_inner();
            println!("{}", serde_json::to_string_pretty(&history)?);
            Ok(())
        }
        HistoryCommand::Import { file } => {
            let text = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
                text
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let history: pb::RingHistory = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a ring history (`lbctl history export` writes one)", file.display())
            })?;
            let now = api.import_history(history).await?.into_inner();
            print_history(&now, client.output)
        }
        HistoryCommand::Show => print_history(&api.export_history(pb::Empty {}).await?.into_inner(), client.output),
    }
}

fn print_history(history: &pb::RingHistory, format: Format) -> Result<()> {
    if format == Format::Json {
        return super::output::print_json(history);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    print_table(
        &["vip", "generation", "fingerprint", "age", "backends"],
        history.vips.iter().flat_map(|v| {
            v.generations.iter().enumerate().map(move |(i, g)| {
                let backends: Vec<String> = g.backends.iter().map(|b| format!("{}*{}", b.address, b.weight)).collect();
                vec![
                    v.vip.clone(),
                    if i == 0 { "current".into() } else { format!("-{i}") },
                    g.fingerprint.clone(),
                    format!("{}s", now.saturating_sub(g.since_unix)),
                    backends.join(" "),
                ]
            })
        }),
    );
    Ok(())
}
