//! `lbctl up IFACE`: the controller, in the foreground.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Result};
use clap::ValueEnum;
use lb_common::{DEFAULT_CONN_TABLE_SIZE, DEFAULT_MTU, DEFAULT_RING_CAPACITY};
use lb_userspace::{
    api::TlsFiles,
    netlink,
    up::{self, ModeChoice, UpOptions},
};

use super::ClientOpts;

#[derive(clap::Args)]
pub struct UpArgs {
    /// The NIC that receives VIP traffic and sends it on to backends.
    iface: String,
    /// XDP mode: auto tries native then generic; a forced mode that fails is
    /// an error. offload: the offload flavor on the NIC (hardware mode) for
    /// stateless VIPs, the full balancer on the host (native) for the rest.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    xdp_mode: ModeChoice,
    /// Desired state (TOML) applied at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Join a tier: import this ring history (`lbctl history export > FILE`
    /// on a running LB host) after --config and before announcing, so flows
    /// moved here keep their alternates. Its VIPs need the same desired state.
    #[arg(long, value_name = "FILE")]
    join: Option<PathBuf>,
    /// With --announce-table: start withdrawn (as `lbctl announce withdraw`),
    /// announcing nothing until `lbctl announce restore`.
    #[arg(long)]
    withdrawn: bool,
    /// MAC of the next hop towards backends; default: the default gateway's, kept fresh.
    #[arg(long, value_parser = netlink::parse_mac)]
    next_hop_mac: Option<[u8; 6]>,
    /// Outer source prefix(es), e.g. 192.0.2.0/24 or 2001:db8:ffff::/64 (may be given twice);
    /// flow-hash bits fill the host part. Default: the interface's address.
    #[arg(long, value_parser = parse_prefix)]
    encap_src: Vec<IpPrefix>,
    /// MTU of the path to backends (outer packet size from the IP header on).
    #[arg(long, default_value_t = DEFAULT_MTU)]
    mtu: u32,
    /// Conn-table entries (16 bytes each; hold at most half as many flows, see the README).
    #[arg(long, default_value_t = DEFAULT_CONN_TABLE_SIZE)]
    conn_table_size: u32,
    /// Ring slots shared by all VIPs, 2 bytes each (each VIP is sure of two
    /// rings, live and next, rounded up to a multiple of 4 slots; its
    /// history rings take what room is left). The default holds 512 VIPs
    /// of ring size 65537.
    #[arg(long, default_value_t = DEFAULT_RING_CAPACITY)]
    ring_capacity: u32,
    /// On exit, leave the program attached and its maps pinned, so that the
    /// next `lbctl up` adopts them without interrupting traffic.
    #[arg(long)]
    keep: bool,
    /// bpffs directory for pins (the interface name is appended).
    #[arg(long, default_value = "/sys/fs/bpf/lbctl")]
    pin_dir: PathBuf,
    /// Directory of the state file (IFACE.json): what a restart adopts, or
    /// replays on a fresh program after a clean stop or a reboot.
    #[arg(long, default_value = "/var/lib/lbctl")]
    state_dir: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Also serve the API on TCP at ADDR:PORT, with mutual TLS only (needs
    /// --tls-cert, --tls-key and --tls-ca; clients without a certificate
    /// signed by that CA are refused).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// SYN-flood guard: new flows per second per CPU remembered in the conn
    /// table; beyond it new flows are balanced but not remembered, so a flood
    /// cannot evict established flows. 0 = no limit.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000_000))]
    new_flow_limit: u32,
    /// UDP destination port of GUE packets (VIPs with --encap gue); the
    /// backends' `lbctl decap up --gue-port` must match.
    #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    gue_port: u16,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics ("off": none).
    #[arg(long, default_value = "127.0.0.1:9100", value_parser = parse_metrics)]
    metrics: Metrics,
    /// Keep a host route (proto 252) for each VIP address that can serve in
    /// kernel routing table N, for a routing daemon to announce (BIRD,
    /// FRR); withdrawn on stop (not with --keep).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe))]
    announce_table: Option<u32>,
    /// With --announce-table: on SIGTERM/SIGINT, withdraw the routes, then
    /// keep forwarding this long before detaching (a second signal cuts it
    /// short). Default 5s.
    #[arg(long, value_parser = parse_duration)]
    drain_time: Option<std::time::Duration>,
    /// Two NICs: packets for backends leave through this interface
    /// (XDP_REDIRECT), towards the gateway of its routes; clients' packets
    /// come in on IFACE, and answers to clients leave there.
    #[arg(long, value_name = "IFACE")]
    backend_iface: Option<String>,
    /// The interface is a VLAN trunk: refuse to start if the NIC takes
    /// VLAN tags off in hardware (rx-vlan-offload), which would hide them
    /// from XDP. Tagged frames (802.1Q, QinQ) are balanced either way.
    #[arg(long)]
    trunk: bool,
    /// IN=OUT: forwarded packets that came tagged VLAN IN leave for the
    /// backends tagged VLAN OUT (the inner tag of a QinQ pair); may be
    /// given for several VLANs; implies --trunk.
    #[arg(long, value_parser = lb_userspace::vlan::parse_mapping, value_name = "IN=OUT")]
    vlan_map: Vec<(u16, u16)>,
    /// Test only: run the offload flavor on the host instead of the full
    /// balancer (stateless VIPs only; everything else goes to the kernel).
    #[arg(long, hide = true)]
    offload_flavor_on_host: bool,
    /// Test only, with --xdp-mode offload: load the flavor for the host, do
    /// not attach it, pin its program at PIN_DIR/IFACE/nic/program.
    #[arg(long, hide = true)]
    offload_without_nic: bool,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("'{text}' is not a duration like 5s or 500ms: {e}"))
}

/// `--metrics`: an address, or off.
#[derive(Clone, Copy, Debug)]
struct Metrics(Option<SocketAddr>);

fn parse_metrics(text: &str) -> Result<Metrics, String> {
    if text == "off" {
        return Ok(Metrics(None));
    }
    text.parse().map(|a| Metrics(Some(a))).map_err(|_| format!("'{text}' is not ADDR:PORT (or off)"))
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug)]
enum IpPrefix {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

fn parse_prefix(text: &str) -> Result<IpPrefix, String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let addr: IpAddr = addr.parse().map_err(|_| format!("'{text}' is not ADDR/LEN"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = if len.is_empty() { max } else { len.parse().map_err(|_| format!("'{text}': bad prefix length"))? };
    if len > max {
        return Err(format!("'{text}': prefix length above {max}"));
    }
    Ok(match addr {
        IpAddr::V4(a) => IpPrefix::V4(a, len),
        IpAddr::V6(a) => IpPrefix::V6(a, len),
    })
}

pub async fn run(args: UpArgs, client: &ClientOpts) -> Result<()> {
    let tcp_api = match args.listen {
        None => None,
        Some(addr) => match (&client.tls_cert, &client.tls_key, &client.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Some((addr, TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: ca.clone() }))
            }
            _ => bail!("--listen needs --tls-cert, --tls-key and --tls-ca: the TCP API speaks mutual TLS only"),
        },
    };
    if args.mtu < 1280 {
        bail!("--mtu {} is below 1280, the IPv6 minimum", args.mtu);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    let mut v4 = None;
    let mut v6 = None;
    for p in &args.encap_src {
        match *p {
            IpPrefix::V4(a, l) => v4 = Some((a, l)),
            IpPrefix::V6(a, l) => v6 = Some((a, l)),
        }
    }
    up::run(UpOptions {
        iface: args.iface,
        mode: args.xdp_mode,
        config: args.config,
        join: args.join,
        withdrawn: args.withdrawn,
        socket: client.socket.clone(),
        next_hop_mac: args.next_hop_mac,
        encap_src_v4: v4,
        encap_src_v6: v6,
        mtu: args.mtu,
        conn_table_size: args.conn_table_size,
        ring_capacity: args.ring_capacity,
        keep: args.keep,
        pin_root: args.pin_dir,
        state_dir: args.state_dir,
        metrics: args.metrics.0,
        new_flow_limit: args.new_flow_limit,
        announce_table: args.announce_table,
        drain_time: args.drain_time,
        offload_flavor: args.offload_flavor_on_host,
        offload_without_nic: args.offload_without_nic,
        gue_port: args.gue_port,
        tcp_api,
        backend_iface: args.backend_iface,
        trunk: args.trunk || !args.vlan_map.is_empty(),
        vlan_map: args.vlan_map,
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    #[test]
    fn up_options_parse() {
        let cli =
            Cli::try_parse_from(["lbctl", "up", "eth0", "--metrics", "off", "--encap-src", "192.0.2.0/24"]).unwrap();
        let crate::cli::Command::Up(args) = cli.command else { panic!("not up") };
        assert!(args.metrics.0.is_none());
        assert!(matches!(args.encap_src[0], IpPrefix::V4(_, 24)));
        assert!(parse_metrics("127.0.0.1:9100").unwrap().0.is_some());
        assert!(parse_metrics("localhost").is_err());
        assert!(parse_prefix("192.0.2.0/33").is_err());
        assert!(Cli::try_parse_from(["lbctl", "up", "eth0", "--next-hop-mac", "02:00"]).is_err());
    }
}
