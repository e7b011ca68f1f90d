//! The `lbctl` command line: the top-level definition and dispatch. Each
//! command group has its own module; `client` reaches the controller and
//! `output` prints tables and JSON.

mod apply;
mod backend;
mod client;
mod decap;
mod history;
mod offload;
mod output;
mod stats;
mod status;
mod up;
mod vip;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

const DEFAULT_SOCKET: &str = "/run/lbctl/lbctl.sock";

#[derive(Parser)]
#[command(name = "lbctl", version, about = "XDP L4 load balancer: controller and client")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientOpts,
}

impl Cli {
    /// `lbctl up`: a long-running daemon, not a command whose output may
    /// be cut short by `| head`.
    pub fn is_controller(&self) -> bool {
        matches!(self.command, Command::Up(_))
    }
}

/// How a client subcommand reaches the controller, and how it prints.
#[derive(clap::Args, Clone)]
pub struct ClientOpts {
    /// The controller's API socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Reach the controller over TCP instead (https://HOST:PORT, mutual
    /// TLS): needs --tls-cert, --tls-key (this client's) and --tls-ca.
    #[arg(long, global = true)]
    server: Option<String>,
    /// PEM certificate: the client's with --server, the server's with `up --listen`.
    #[arg(long, global = true)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true)]
    tls_key: Option<PathBuf>,
    /// PEM CA: the one that signed the server's certificate (client side),
    /// or the clients' (`up --listen`).
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller on IFACE in the foreground until SIGINT/SIGTERM.
    Up(up::UpArgs),
    /// Add, delete or list VIPs.
    Vip {
        #[command(subcommand)]
        command: vip::VipCommand,
    },
    /// Add, delete, drain, re-weight or list the backends of a VIP.
    Backend {
        #[command(subcommand)]
        command: backend::BackendCommand,
    },
    /// Bring the running state to a desired-state file, printing the changes.
    Apply(apply::ApplyArgs),
    /// Show, export or import the declared ring history (GUE alternates).
    History {
        #[command(subcommand)]
        command: history::HistoryCommand,
    },
    /// The controller's interface, mode, next hop, VIPs and fail-open state.
    Status,
    /// Counters: global reasons, per VIP and per backend.
    Stats {
        /// Refresh every second with rates, until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Which backend a client's flow to a VIP goes to, and why.
    Explain {
        /// The client, ADDR:PORT ([2001:db8::1]:40000 for IPv6).
        client_addr: String,
        /// The VIP, ADDR:PORT/PROTO.
        vip: String,
    },
    /// Attach, detach or read the decap program on a backend host.
    Decap {
        #[command(subcommand)]
        command: decap::DecapCommand,
    },
    /// Take this LB host out of ECMP and back (the routes of --announce-table), or show them.
    Announce {
        #[command(subcommand)]
        command: status::AnnounceCommand,
    },
    /// Log every packet decision of the data plane (on) or stop (off), without reloading it.
    Debug {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// What an XDP offload JIT (the nfp driver's) would refuse in a program
    /// this lbctl carries: helpers, maps, stack, instructions, rules.
    OffloadCheck(offload::OffloadCheckArgs),
    /// Lab only: tag and untag every frame the kernel sends and receives on
    /// IFACE with VLAN VID (the lab's trunk; its kernel has no VLAN devices).
    #[command(hide = true)]
    LabTrunk {
        iface: String,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4094))]
        vid: u16,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): lbctl manpage > /usr/share/man/man1/lbctl.1
    Manpage,
}

pub async fn run(cli: Cli) -> Result<()> {
    let client = cli.client;
    match cli.command {
        Command::Up(args) => up::run(args, &client).await,
        Command::Vip { command } => vip::run(command, &client).await,
        Command::Backend { command } => backend::run(command, &client).await,
        Command::Apply(args) => apply::run(args, &client).await,
        Command::History { command } => history::run(command, &client).await,
        Command::Status => status::status(&client).await,
        Command::Stats { watch } => stats::stats(watch, &client).await,
        Command::Explain { client_addr, vip } => stats::explain(client_addr, vip, &client).await,
        Command::Debug { state } => status::debug(&state, &client).await,
        Command::Announce { command } => status::announce(command, &client).await,
        Command::OffloadCheck(args) => offload::run(args, client.output),
        Command::Decap { command } => decap::run(command, client.output).await,
        Command::LabTrunk { iface, vid } => lb_userspace::lab_trunk::attach(&iface, vid),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "lbctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpage => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}

/// An error and its causes on one line; gRPC statuses show their message.
pub fn error_text(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return status.message().to_string();
    }
    // Libraries often repeat their source in their own message: keep each
    // cause only if the text so far does not already say it.
    let mut text = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
