//! `lbctl decap up|down|status`: the decap program on a backend host.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Result;
use lb_userspace::{decap_cmd, up::ModeChoice};

use super::{
    output::{print_json, print_table},
    Format,
};

#[derive(clap::Subcommand)]
pub enum DecapCommand {
    /// Attach the decap program to IFACE (returns at once; stays attached).
    Up {
        iface: String,
        /// Outer destinations to decapsulate (default: IFACE's addresses).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        /// UDP port of GUE packets (the LB hosts' `up --gue-port`); 0: only IP-in-IP.
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
        gue_port: u16,
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
    /// The decap program's counters on IFACE: packets decapsulated, and GUE
    /// packets passed on to their alternate (the second chance).
    Status {
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/lbctl-decap")]
        pin_dir: PathBuf,
    },
}

pub async fn run(command: DecapCommand, output: Format) -> Result<()> {
    match command {
        DecapCommand::Up { iface, addresses, gue_port, xdp_mode, pin_dir } => {
            let addrs = decap_cmd::up(&iface, &addresses, gue_port, xdp_mode, &pin_dir).await?;
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            let gue = if gue_port == 0 { "no GUE".to_string() } else { format!("GUE on UDP {gue_port}") };
            println!("decap attached to {iface} for {} ({gue})", list.join(", "));
        }
        DecapCommand::Status { iface, pin_dir } => {
            let counters = decap_cmd::status(&iface, &pin_dir)?;
            if output == Format::Json {
                let map: std::collections::BTreeMap<_, _> = counters.into_iter().collect();
                return print_json(&map);
            }
            print_table(&["counter", "value"], counters.into_iter().map(|(k, v)| vec![k.to_string(), v.to_string()]));
        }
        DecapCommand::Down { iface, pin_dir } => {
            decap_cmd::down(&iface, &pin_dir)?;
            println!("decap detached from {iface}");
        }
    }
    Ok(())
}
