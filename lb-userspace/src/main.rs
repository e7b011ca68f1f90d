//! `lbctl`: runs the controller (`lbctl up`) and talks to it over its gRPC
//! socket (every other subcommand), or attaches the decap program on a
//! backend host (`lbctl decap`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use lb_common::{DEFAULT_CONN_TABLE_SIZE, DEFAULT_MTU, DEFAULT_RING_CAPACITY};
use lb_userspace::{
    api::pb::{
        self, backends_client::BackendsClient, stats_client::StatsClient, status_client::StatusClient,
        vips_client::VipsClient,
    },
    decap_cmd, netlink,
    up::{self, ModeChoice, UpOptions},
};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

const DEFAULT_SOCKET: &str = "/run/lbctl/lbctl.sock";

#[derive(Parser)]
#[command(name = "lbctl", version, about = "XDP L4 load balancer: controller and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(clap::Args, Clone)]
struct ClientOpts {
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
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller on IFACE in the foreground until SIGINT/SIGTERM.
    Up(UpArgs),
    /// Add, delete or list VIPs.
    Vip {
        #[command(subcommand)]
        command: VipCommand,
    },
    /// Add, delete, drain, re-weight or list the backends of a VIP.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
    },
    /// Bring the running state to a desired-state file, printing the changes.
    Apply {
        /// The desired state (TOML, see README).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
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
    /// Attach or detach the decap program on a backend host.
    Decap {
        #[command(subcommand)]
        command: DecapCommand,
    },
    /// Log every packet decision of the data plane (on) or stop (off), without reloading it.
    Debug {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): lbctl manpage > /usr/share/man/man1/lbctl.1
    Manpage,
}

#[derive(clap::Args)]
struct UpArgs {
    /// The NIC that receives VIP traffic and sends it on to backends.
    iface: String,
    /// XDP mode: auto tries native then generic; a forced mode that fails is an error.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    xdp_mode: ModeChoice,
    /// Desired state (TOML) applied at start.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// Conn-table entries (LRU).
    #[arg(long, default_value_t = DEFAULT_CONN_TABLE_SIZE)]
    conn_table_size: u32,
    /// Ring slots shared by all VIPs (each VIP takes twice its ring size).
    #[arg(long, default_value_t = DEFAULT_RING_CAPACITY)]
    ring_capacity: u32,
    /// On exit, leave the program attached and its maps pinned, so that the
    /// next `lbctl up` adopts them without interrupting traffic.
    #[arg(long)]
    keep: bool,
    /// bpffs directory for pins (the interface name is appended).
    #[arg(long, default_value = "/sys/fs/bpf/lbctl")]
    pin_dir: PathBuf,
    /// Directory of the state file used to restore state on restart.
    #[arg(long, default_value = "/run/lbctl")]
    state_dir: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Also serve the API on TCP at ADDR:PORT, with mutual TLS only (needs
    /// --tls-cert, --tls-key and --tls-ca; clients without a certificate
    /// signed by that CA are refused).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// SYN-flood guard: new flows per second per CPU remembered in the conn
    /// table; beyond it new flows are balanced but not remembered, so a flood
    /// cannot evict established flows. 0 = no limit.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000_000))]
    new_flow_limit: u32,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics ("off": none).
    #[arg(long, default_value = "127.0.0.1:9100")]
    metrics: String,
}

fn parse_metrics(text: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| format!("'{text}' is not ADDR:PORT (or off)"))
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

#[derive(Subcommand)]
enum VipCommand {
    /// Add a VIP: ADDR:PORT/PROTO (IPv6 as [2001:db8::10]:80/tcp; port 0 = every port).
    Add {
        vip: String,
        /// Flow hash: 5tuple, or src-ip for session affinity.
        #[arg(long, default_value = "5tuple")]
        hash: String,
        /// Maglev ring size (a prime).
        #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
        ring_size: u32,
    },
    /// Delete a VIP and its backends.
    Del { vip: String },
    /// List VIPs with their counters.
    List,
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add a backend to a VIP.
    Add {
        vip: String,
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Health check: none, tcp[:PORT], or http://HOST:PORT/PATH.
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
        /// HTTP checks: statuses that mean healthy (default 200-399).
        #[arg(long)]
        expect_status: Option<String>,
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

#[derive(Subcommand)]
enum DecapCommand {
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

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line; gRPC statuses show their message.
fn error_text(e: &anyhow::Error) -> String {
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

async fn run(cli: Cli) -> Result<()> {
    let client = cli.client;
    match cli.command {
        Command::Up(args) => {
            let tcp_api = match args.listen {
                None => None,
                Some(addr) => match (&client.tls_cert, &client.tls_key, &client.tls_ca) {
                    (Some(cert), Some(key), Some(ca)) => Some((
                        addr,
                        lb_userspace::api::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: ca.clone() },
                    )),
                    _ => bail!("--listen needs --tls-cert, --tls-key and --tls-ca: the TCP API speaks mutual TLS only"),
                },
            };
            run_up(args, client.socket, tcp_api).await
        }
        Command::Vip { command } => vip(command, &client).await,
        Command::Backend { command } => backend(command, &client).await,
        Command::Apply { file, dry_run } => {
            let toml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            // Check locally first so errors name the file.
            lb_userspace::desired::parse(&toml).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let reply = VipsClient::new(connect(&client).await?).apply(pb::ApplyRequest { toml, dry_run }).await?;
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
        Command::Status => {
            let s = StatusClient::new(connect(&client).await?).get_status(pb::Empty {}).await?.into_inner();
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
        Command::Stats { watch } => stats(watch, &client).await,
        Command::Explain { client_addr, vip } => {
            let r = StatsClient::new(connect(&client).await?)
                .explain(pb::ExplainRequest { client: client_addr.clone(), vip: vip.clone() })
                .await?
                .into_inner();
            if client.output == Format::Json {
                return print_json(&r);
            }
            match r.via.as_str() {
                "conn-table" => {
                    println!("{client_addr} -> {vip}: backend {} (conn table: an existing flow)", r.backend)
                }
                _ => println!(
                    "{client_addr} -> {vip}: backend {} (Maglev ring slot {} of hash {:#010x}: a new flow)",
                    r.backend, r.slot, r.hash
                ),
            }
            Ok(())
        }
        Command::Debug { state } => {
            let on = state == "on";
            StatusClient::new(connect(&client).await?).set_debug(pb::DebugRequest { on }).await?;
            println!("data-plane decision logging {state} (in the controller's log)");
            Ok(())
        }
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
        Command::Decap { command } => match command {
            DecapCommand::Up { iface, addresses, xdp_mode, pin_dir } => {
                let addrs = decap_cmd::up(&iface, &addresses, xdp_mode, &pin_dir).await?;
                let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                println!("decap attached to {iface} for {}", list.join(", "));
                Ok(())
            }
            DecapCommand::Down { iface, pin_dir } => {
                decap_cmd::down(&iface, &pin_dir)?;
                println!("decap detached from {iface}");
                Ok(())
            }
        },
    }
}

async fn run_up(
    args: UpArgs,
    socket: PathBuf,
    tcp_api: Option<(std::net::SocketAddr, lb_userspace::api::TlsFiles)>,
) -> Result<()> {
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
    if args.mtu < 1280 {
        bail!("--mtu {} is below 1280, the IPv6 minimum", args.mtu);
    }
    up::run(UpOptions {
        iface: args.iface,
        mode: args.xdp_mode,
        config: args.config,
        socket,
        next_hop_mac: args.next_hop_mac,
        encap_src_v4: v4,
        encap_src_v6: v6,
        mtu: args.mtu,
        conn_table_size: args.conn_table_size,
        ring_capacity: args.ring_capacity,
        keep: args.keep,
        pin_root: args.pin_dir,
        state_dir: args.state_dir,
        metrics: parse_metrics(&args.metrics).map_err(anyhow::Error::msg)?,
        new_flow_limit: args.new_flow_limit,
        tcp_api,
    })
    .await
}

async fn connect(opts: &ClientOpts) -> Result<Channel> {
    if let Some(server) = &opts.server {
        return connect_tls(server, opts).await;
    }
    let path = opts.socket.clone();
    if !path.exists() {
        bail!("no controller socket at {}: is `lbctl up` running? (--socket PATH)", path.display());
    }
    let channel = Endpoint::try_from("http://lbctl.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("cannot connect to {}", opts.socket.display()))?;
    Ok(channel)
}

/// The controller's TCP listener, with this client's certificate.
async fn connect_tls(server: &str, opts: &ClientOpts) -> Result<Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let (Some(cert), Some(key), Some(ca)) = (&opts.tls_cert, &opts.tls_key, &opts.tls_ca) else {
        bail!("--server needs --tls-cert, --tls-key and --tls-ca (the API speaks mutual TLS only)");
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let uri: Uri = server.parse().with_context(|| format!("--server '{server}' is not https://HOST:PORT"))?;
    let host = uri.host().context("--server has no host")?.trim_matches(|c| c == '[' || c == ']').to_string();
    let tls = ClientTlsConfig::new()
        .domain_name(host)
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?));
    let channel = Endpoint::from(uri)
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server} (TLS)"))?;
    Ok(channel)
}

async fn vip(command: VipCommand, client: &ClientOpts) -> Result<()> {
    let mut api = VipsClient::new(connect(client).await?);
    match command {
        VipCommand::Add { vip, hash, ring_size } => {
            let v = api.add_vip(pb::AddVipRequest { vip, hash, ring_size }).await?.into_inner();
            print_vips(&[v], client.output)
        }
        VipCommand::Del { vip } => {
            api.delete_vip(pb::VipRef { vip: vip.clone() }).await?;
            println!("deleted {vip}");
            Ok(())
        }
        VipCommand::List => print_vips(&api.list_vips(pb::Empty {}).await?.into_inner().vips, client.output),
    }
}

async fn backend(command: BackendCommand, client: &ClientOpts) -> Result<()> {
    let mut api = BackendsClient::new(connect(client).await?);
    let one = |b: tonic::Response<pb::Backend>| vec![b.into_inner()];
    let rows = match command {
        BackendCommand::Add { vip, address, weight, check, interval, timeout, rise, fall, expect_status } => {
            let ms = |t: Option<String>| -> Result<u64> {
                match t {
                    None => Ok(0),
                    Some(t) => {
                        Ok(humantime::parse_duration(&t).with_context(|| format!("duration '{t}'"))?.as_millis() as u64)
                    }
                }
            };
            let health = pb::HealthCheck {
                check,
                interval_ms: ms(interval)?,
                timeout_ms: ms(timeout)?,
                rise: rise.unwrap_or(0),
                fall: fall.unwrap_or(0),
                expect_status: expect_status.unwrap_or_default(),
            };
            one(api
                .add_backend(pb::AddBackendRequest { vip, address, weight: Some(weight), health: Some(health) })
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

async fn stats(watch: bool, client: &ClientOpts) -> Result<()> {
    let mut api = StatsClient::new(connect(client).await?);
    let mut previous: Option<(std::time::Instant, pb::StatsReply)> = None;
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
        previous = Some((std::time::Instant::now(), now));
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

fn print_vips(vips: &[pb::Vip], format: Format) -> Result<()> {
    if format == Format::Json {
        return print_json(&vips);
    }
    print_table(
        &["vip", "hash", "ring", "backends", "in ring", "packets", "bytes", "new flows"],
        vips.iter().map(|v| {
            let in_ring =
                if v.fail_open { format!("{} (FAIL OPEN)", v.active_backends) } else { v.active_backends.to_string() };
            vec![
                v.vip.clone(),
                v.hash.clone(),
                v.ring_size.to_string(),
                v.backends.to_string(),
                in_ring,
                v.packets.to_string(),
                v.bytes.to_string(),
                v.new_flows.to_string(),
            ]
        }),
    );
    Ok(())
}

fn print_backends(backends: &[pb::Backend], format: Format) -> Result<()> {
    if format == Format::Json {
        return print_json(&backends);
    }
    print_table(
        &["vip", "backend", "weight", "state", "health", "check", "packets", "bytes"],
        backends.iter().map(|b| {
            let state = if b.drained {
                "drained"
            } else if b.in_ring {
                "active"
            } else {
                "out of ring"
            };
            vec![
                b.vip.clone(),
                b.address.clone(),
                b.weight.to_string(),
                state.into(),
                b.health.clone(),
                b.check.clone(),
                b.packets.to_string(),
                b.bytes.to_string(),
            ]
        }),
    );
    Ok(())
}

fn print_table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_options_parse() {
        let cli =
            Cli::try_parse_from(["lbctl", "up", "eth0", "--metrics", "off", "--encap-src", "192.0.2.0/24"]).unwrap();
        let Command::Up(args) = cli.command else { panic!("not up") };
        assert_eq!(parse_metrics(&args.metrics), Ok(None));
        assert!(matches!(args.encap_src[0], IpPrefix::V4(_, 24)));
        assert!(parse_metrics("127.0.0.1:9100").unwrap().is_some());
        assert!(parse_metrics("localhost").is_err());
        assert!(parse_prefix("192.0.2.0/33").is_err());
        assert!(Cli::try_parse_from(["lbctl", "up", "eth0", "--next-hop-mac", "02:00"]).is_err());
    }
}
