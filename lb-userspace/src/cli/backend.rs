//! `lbctl backend add|del|drain|set-weight|list`.

use anyhow::{Context, Result};
use lb_userspace::api::pb::{self, backends_client::BackendsClient};

use super::{client::connect, output::print_backends, ClientOpts};

#[derive(clap::Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a VIP.
    Add {
        vip: String,
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Health check: none, tcp[:PORT], http://HOST:PORT/PATH or https://HOST:PORT/PATH.
        #[arg(long, default_value = "none")]
        check: String,
        /// Check interval (e.g. 2s, 500ms).
        #[arg(long)]
        interval: Option<String>,
        /// Check timeout.
        #[arg(long)]
        timeout: Option<String>,
        /// Successes in a row to bring a backend up.
        #[arg(long)]
        rise: Option<u32>,
        /// Failures in a row to take it down.
        #[arg(long)]
        fall: Option<u32>,
        /// HTTP(S) checks: statuses that mean healthy (default 200-399).
        #[arg(long)]
        expect_status: Option<String>,
        /// HTTPS checks: PEM file of the CA(s) that sign the backend's
        /// certificate (default: the system's CA store).
        #[arg(long, value_name = "FILE")]
        check_ca: Option<std::path::PathBuf>,
        /// HTTPS checks: take any certificate (self-signed backends).
        #[arg(long, conflicts_with = "check_ca")]
        check_insecure: bool,
        /// Which way the check goes: direct (to the backend's own address)
        /// or data (to the VIP, encapsulated to this backend as the VIP's
        /// packets are; the answer comes back from the VIP by DSR).
        #[arg(long, value_name = "direct|data", default_value = "direct")]
        check_path: String,
        /// Passive signal: this many client SYN repeats for flows sent to
        /// the backend within one check interval take it out at once (0:
        /// off). It is held out 10 s, doubled each time in a row (up to
        /// 5 min), then comes back by its check's rise.
        #[arg(long, value_name = "N", default_value_t = 0)]
        eject_syn_repeats: u32,
        /// QUIC VIPs: the backend's server ID in hex (default: the last
        /// octets of its address, as many as the VIP's server IDs have).
        #[arg(long, value_name = "HEX")]
        server_id: Option<String>,
    },
    /// Remove a backend: its flows move to others.
    Del { vip: String, address: String },
    /// Drain a backend: it keeps its flows and gets no new ones.
    Drain { vip: String, address: String },
    /// Change a backend's weight (0 behaves like drain).
    SetWeight { vip: String, address: String, weight: u32 },
    /// List the backends of a VIP with health and counters.
    List { vip: String },
}

pub async fn run(command: BackendCommand, client: &ClientOpts) -> Result<()> {
    let mut api = BackendsClient::new(connect(client).await?);
    let one = |b: tonic::Response<pb::Backend>| vec![b.into_inner()];
    let rows = match command {
        BackendCommand::Add {
            vip,
            address,
            weight,
            check,
            interval,
            timeout,
            rise,
            fall,
            expect_status,
            check_ca,
            check_insecure,
            check_path,
            eject_syn_repeats,
            server_id,
        } => {
            let check_ca_pem = match check_ca {
                None => String::new(),
                Some(path) => {
                    std::fs::read_to_string(&path).with_context(|| format!("reading --check-ca {}", path.display()))?
                }
            };
            let health = pb::HealthCheck {
                check,
                interval_ms: millis(interval)?,
                timeout_ms: millis(timeout)?,
                rise: rise.unwrap_or(0),
                fall: fall.unwrap_or(0),
                expect_status: expect_status.unwrap_or_default(),
                check_ca_pem,
                check_insecure,
                check_path,
                eject_syn_repeats,
            };
            one(api
                .add_backend(pb::AddBackendRequest {
                    vip,
                    address,
                    weight: Some(weight),
                    health: Some(health),
                    server_id: server_id.unwrap_or_default(),
                })
                .await?)
        }
        BackendCommand::Del { vip, address } => {
            api.delete_backend(pb::BackendRef { vip: vip.clone(), address: address.clone() }).await?;
            println!("deleted {address} from {vip}");
            return Ok(());
        }
        BackendCommand::Drain { vip, address } => one(api.drain_backend(pb::BackendRef { vip, address }).await?),
        BackendCommand::SetWeight { vip, address, weight } => {
            one(api.set_weight(pb::SetWeightRequest { vip, address, weight }).await?)
        }
        BackendCommand::List { vip } => api.list_backends(pb::VipRef { vip }).await?.into_inner().backends,
    };
    print_backends(&rows, client.output)
}

/// A duration flag in milliseconds; 0 (unset) lets the controller choose.
fn millis(text: Option<String>) -> Result<u64> {
    match text {
        None => Ok(0),
        Some(t) => Ok(humantime::parse_duration(&t).with_context(|| format!("duration '{t}'"))?.as_millis() as u64),
    }
}
