//! `lbctl decap up|down`: the decap program on a backend host.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Result;
use lb_userspace::{decap_cmd, up::ModeChoice};

#[derive(clap::Subcommand)]
pub enum DecapCommand {
    /// Attach the decap program to IFACE (returns at once; stays attached).
    Up {
        iface: String,
        /// Outer destinations to decapsulate (default: IFACE's addresses).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
        xdp_mode: ModeChoice,
        #[arg(long, default_value = "/sys/fs/bpf/lbctl-decap")]
        pin_dir: PathBuf,
    },
    /// Detach the decap program from IFACE.
    Down {
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/lbctl-decap")]
        pin_dir: PathBuf,
    },
}

pub async fn run(command: DecapCommand) -> Result<()> {
    match command {
        DecapCommand::Up { iface, addresses, xdp_mode, pin_dir } => {
            let addrs = decap_cmd::up(&iface, &addresses, xdp_mode, &pin_dir).await?;
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            println!("decap attached to {iface} for {}", list.join(", "));
        }
        DecapCommand::Down { iface, pin_dir } => {
            decap_cmd::down(&iface, &pin_dir)?;
            println!("decap detached from {iface}");
        }
    }
    Ok(())
}
