//! `lbctl apply -f FILE`: bring the running state to a desired-state file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lb_userspace::api::pb::{self, vips_client::VipsClient};

use super::{client::connect, output::print_json, ClientOpts, Format};

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The desired state (TOML, see README).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Only print what would change.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(args: ApplyArgs, client: &ClientOpts) -> Result<()> {
    let toml = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    // Check locally first so errors name the file.
    lb_userspace::desired::parse(&toml).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let announce = lb_userspace::desired::parse_announce(&toml).map_err(|e| anyhow::anyhow!("{e}"))?;
    if announce != Default::default() {
        eprintln!("note: the [announce] section is read by `lbctl up --config` at start; apply leaves it alone");
    }
    let reply = VipsClient::new(connect(client).await?).apply(pb::ApplyRequest { toml, dry_run: args.dry_run }).await?;
    let changes = reply.into_inner().changes;
    if client.output == Format::Json {
        return print_json(&changes);
    }
    if changes.is_empty() {
        println!("no changes");
    }
    for c in changes {
        println!("{c}");
    }
    Ok(())
}
