//! `lbctl up IFACE`: load (or adopt) the balancer, attach it, apply the
//! desired state, serve the API until SIGINT/SIGTERM, then clean up.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode};
use tracing::{info, warn};

use crate::{
    announce::{self, Announcer, RouteTable},
    api,
    controller::{Controller, RunInfo, Saved, State, STATE_LAYOUT},
    dataplane::{Dataplane, LoadOptions},
    desired,
    netlink::{self, Netlink},
    nic::{self, NicProgram},
    probe_path::ProbePaths,
    services::{Services, Settings},
    state_file::StateFile,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// Native (driver) mode, falling back to generic.
    Auto,
    Native,
    Generic,
    Offload,
}

pub struct UpOptions {
    pub iface: String,
    pub mode: ModeChoice,
    pub config: Option<PathBuf>,
    /// A ring history another LB host exported, imported after `config`.
    pub join: Option<PathBuf>,
    /// Announce nothing until `lbctl announce restore`.
    pub withdrawn: bool,
    pub socket: PathBuf,
    pub next_hop_mac: Option<[u8; 6]>,
    pub encap_src_v4: Option<(Ipv4Addr, u8)>,
    pub encap_src_v6: Option<(Ipv6Addr, u8)>,
    pub mtu: u32,
    pub conn_table_size: u32,
    pub ring_capacity: u32,
    pub keep: bool,
    /// bpffs directory for pins; the interface name is appended.
    pub pin_root: PathBuf,
    /// Directory of the state file `IFACE.json`.
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// SYN-flood guard (new flows remembered per second per CPU; 0 = off).
    pub new_flow_limit: u32,
    /// UDP destination port of GUE packets.
    pub gue_port: u16,
    /// An API listener on TCP, mutual TLS only.
    pub tcp_api: Option<(std::net::SocketAddr, api::TlsFiles)>,
    /// The kernel routing table that gets a route per serving VIP address
    /// (else the config file's `[announce] table`, if any).
    pub announce_table: Option<u32>,
    /// How long to forward after withdrawing the routes on a stop (else the
    /// config file's, else [`DEFAULT_DRAIN_TIME`]).
    pub drain_time: Option<Duration>,
    /// Two NICs: encapsulated packets leave through this one.
    pub backend_iface: Option<String>,
    /// A VLAN trunk: the NIC must leave tags in the frame.
    pub trunk: bool,
    /// Ingress VLAN -> egress VLAN of forwarded packets.
    pub vlan_map: Vec<(u16, u16)>,
    /// Test only: the offload flavor instead of the full balancer.
    pub offload_flavor: bool,
    /// Test only, with [`ModeChoice::Offload`]: the flavor is loaded for the
    /// host and not attached (a veth cannot run it beside the full
    /// balancer); its program is pinned for tests to run frames through.
    pub offload_without_nic: bool,
}

/// How long a stopping controller forwards after withdrawing its routes.
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(5);

pub async fn run(opts: UpOptions) -> Result<()> {
    let from_file = match &opts.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            desired::parse_announce(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => desired::AnnounceSettings::default(),
    };
    let announce_table = opts.announce_table.or(from_file.table);
    let drain_time = opts.drain_time.or(from_file.drain_time).unwrap_or(DEFAULT_DRAIN_TIME);
    if opts.offload_without_nic && opts.mode != ModeChoice::Offload {
        bail!("--offload-without-nic goes with --xdp-mode offload");
    }
    let ifindex = netlink::if_index(&opts.iface)
        .with_context(|| format!("no interface '{}' in this network namespace", opts.iface))?;
    let backend_ifindex = check_interfaces(&opts)?;
    ensure_bpffs(&opts.pin_root)?;
    let pin_dir = opts.pin_root.join(&opts.iface);
    let link_pin = pin_dir.join("link");
    std::fs::create_dir_all(&opts.state_dir)?;
    let state_file = opts.state_dir.join(format!("{}.json", opts.iface));

    // Adopt what a previous controller left running, if it left its state;
    // else start a fresh program and replay the state file, if any.
    let (saved, saved_to) = read_state(&state_file)?;
    let adopted = match &saved {
        Some(Saved { layout, .. }) if link_pin.exists() => {
            if *layout != STATE_LAYOUT {
                bail!(
                    "{} holds the maps of an lbctl with another layout ({layout}; this one's is {STATE_LAYOUT}): \
                     they cannot be adopted. Stop that balancer cleanly (SIGTERM, without --keep): its state \
                     file stays, and this lbctl replays it on a fresh program",
                    pin_dir.display()
                );
            }
            true
        }
        _ => {
            if pin_dir.exists() {
                warn!(dir = %pin_dir.display(), "removing pins without a state file: starting afresh");
                remove_pins(&pin_dir);
            }
            false
        }
    };
    let maintenance = opts.withdrawn || saved.as_ref().is_some_and(|s| s.maintenance);
    let (conn_table_size, ring_capacity) = match &saved {
        Some(s) if adopted => (s.conn_table_size, s.ring_capacity),
        _ => (opts.conn_table_size, opts.ring_capacity),
    };
    std::fs::create_dir_all(&pin_dir)?;
    // --xdp-mode offload: the flavor is loaded for the NIC first (the
    // clearest failure, before anything changes); the full balancer runs on
    // the host in driver mode for what the NIC passes up.
    let nic = match opts.mode {
        ModeChoice::Offload => match load_nic(&opts, ifindex, ring_capacity, &pin_dir) {
            Ok(nic) => Some(nic),
            Err(e) => {
                if !adopted {
                    remove_pins(&pin_dir);
                }
                return Err(e);
            }
        },
        _ => None,
    };
    let mut dp = Dataplane::load(LoadOptions {
        conn_table_size,
        ring_capacity,
        bench_restore: false,
        offload_flavor: opts.offload_flavor,
        pin_dir: Some(pin_dir.clone()),
    })?;
    for &(from, to) in &opts.vlan_map {
        dp.set_vlan_egress(from, to)?;
        info!(from, to, "forwarded packets from VLAN {from} leave on VLAN {to}");
    }
    let nl = Netlink::open()?;
    let next_hop_mac = match opts.next_hop_mac {
        Some(mac) => mac,
        None => resolve_next_hop(&nl, backend_ifindex).await?,
    };
    let addrs = nl.addresses(ifindex).await.unwrap_or_default();
    let settings = Settings {
        next_hop_mac,
        encap_src_v4: opts.encap_src_v4.unwrap_or_else(|| default_source_v4(&addrs)),
        encap_src_v6: opts.encap_src_v6.unwrap_or_else(|| default_source_v6(&addrs)),
        mtu: opts.mtu,
        debug: false,
        new_flow_limit: opts.new_flow_limit,
        gue_port: opts.gue_port,
        egress_mac: match backend_ifindex {
            Some(index) => Some(nl.link_mac(index).await?.context("the backend interface has no MAC address")?),
            None => None,
        },
    };
    if let Some(index) = backend_ifindex {
        dp.set_egress(index)?;
        info!(
            interface = opts.backend_iface.as_deref(),
            "packets for backends leave through the backend interface (XDP_REDIRECT)"
        );
    }
    let (services, checks, replay) = match saved {
        Some(saved) if adopted => {
            let mut services = Services::restore(saved.services, &dp);
            services.set_settings(&mut dp, settings)?;
            (services, saved.checks.into_iter().map(|(v, a, c)| ((v, a), c)).collect(), None)
        }
        saved => (Services::new(&mut dp, settings)?, Default::default(), saved),
    };
    // Without a saved state the pins were removed above, so this attaches
    // afresh; with one it replaces the running program behind its link.
    // The host first: until the NIC runs its part, the host does it all.
    let host_mode = if opts.mode == ModeChoice::Offload { ModeChoice::Native } else { opts.mode };
    let mut xdp_mode = attach_pinned(dp.program(), &opts.iface, host_mode, &link_pin)?;
    if let Some(nic) = nic {
        match start_nic(&mut dp, nic, &opts, ifindex, &pin_dir) {
            Ok(nic_mode) => xdp_mode = format!("{nic_mode} + {xdp_mode} (host)"),
            Err(e) => {
                if !adopted {
                    remove_pins(&pin_dir);
                }
                return Err(e.context(cannot_offload(&opts.iface)));
            }
        }
    } else if pin_dir.join(NIC_DIR).exists() {
        // A previous controller ran the flavor on the NIC; nothing would
        // write its maps now, so it goes (the host does it all already).
        remove_pins(&pin_dir.join(NIC_DIR));
        info!("the offload flavor left on the NIC by the previous controller is detached");
    }
    info!(interface = %opts.iface, mode = %xdp_mode, adopted, "balancer attached");
    let per_vip = lb_common::RESERVED_RINGS_PER_VIP * lb_common::ring_stride(lb_common::DEFAULT_RING_SIZE);
    info!(
        ring_capacity,
        ring_mib = ring_capacity / (512 * 1024),
        vips = ring_capacity / per_vip,
        "the ring capacity holds this many VIPs of the default ring size (more: --ring-capacity)"
    );
    // Decision logs (`lbctl debug on`) arrive through aya-log's ring buffer
    // and go out through the log crate into tracing.
    match dp.logger() {
        Ok(logger) => {
            tokio::spawn(forward_logs(logger));
        }
        Err(e) => warn!(error = %e, "no data-plane decision logs: `lbctl debug on` will log nothing"),
    }

    // The data-path checks' egress program, where the VIPs' packets leave:
    // without it the balancer runs, and data-path checks fail saying why.
    let probes = ProbePaths::attach(opts.backend_iface.as_deref().unwrap_or(&opts.iface));
    if let Some(why) = probes.unavailable() {
        warn!("{why}");
    }
    let info = RunInfo {
        interface: opts.iface.clone(),
        xdp_mode,
        adopted,
        conn_table_size,
        fixed_next_hop: opts.next_hop_mac.is_some(),
        backend_interface: opts.backend_iface.clone(),
        trunk: opts.trunk,
        vlan_map: opts.vlan_map.clone(),
    };
    let announcer = match announce_table {
        Some(table) => {
            let routes = RouteTable::open(table).context("--announce-table")?;
            Some(Arc::new(Announcer::new(routes, maintenance)))
        }
        None => None,
    };
    let ctrl = Controller::new(State::new(dp, services, checks, probes), saved_to, ring_capacity, info, announcer);
    if let Some(saved) = replay {
        // Nothing is announced yet. A state that does not fit (a smaller
        // --ring-capacity, say) stops the start and stays as it was.
        if let Err(e) = ctrl.replay(&saved) {
            remove_pins(&pin_dir);
            bail!(
                "cannot replay {} on a fresh program: {e}. Nothing was changed; fix the cause (or move the \
                 file away to start empty) and start again",
                state_file.display()
            );
        }
    }
    if let Some(path) = &opts.config {
        apply_config(&ctrl, path)?;
        tokio::spawn(reapply_on_sighup(Arc::clone(&ctrl), path.clone()));
    }
    if let Some(path) = &opts.join {
        // Before anything is announced: flows that ECMP moves here find the
        // tier's alternates from the first packet on.
        if let Err(e) = join(&ctrl, path) {
            remove_pins(&pin_dir);
            return Err(e.context("--join: nothing is announced; start again once it is fixed"));
        }
    }
    // Save once so that a restart adopts even an unchanged balancer.
    ctrl.save_now();
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr} (--metrics ADDR:PORT or off)"))?;
        tokio::spawn(crate::metrics::serve(listener, Arc::clone(&ctrl)));
    }
    ctrl.start_checks();
    // Announced only now: the program is attached and the config applied.
    if let Some(announcer) = ctrl.announcer.clone() {
        let c = Arc::clone(&ctrl);
        info!(table = announcer.table(), proto = announce::ROUTE_PROTOCOL, "announcing serving VIP addresses");
        tokio::spawn(async move { announcer.run(|| c.serving_addresses()).await });
    }
    if !ctrl.info.fixed_next_hop {
        tokio::spawn(refresh_next_hop(Arc::clone(&ctrl), nl, backend_ifindex));
    }

    // One signal stops every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    if let Some((addr, files)) = &opts.tcp_api {
        let tls = api::server_tls(files)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the API"))?;
        info!(%addr, "serving the API over TCP, mutual TLS only");
        tokio::spawn(api::serve_tcp(Arc::clone(&ctrl), listener, tls, stopped(stop_rx.clone())));
    }
    info!(socket = %opts.socket.display(), "serving the API");
    // Connected clients get a grace to finish their calls; one that keeps
    // its connection open (a stuck or forgotten client) does not hold the
    // stop up.
    let stop_then_grace = stopped(stop_rx.clone());
    let grace = async {
        stop_then_grace.await;
        tokio::time::sleep(API_STOP_GRACE).await;
    };
    let served = tokio::select! {
        served = api::serve(Arc::clone(&ctrl), &opts.socket, stopped(stop_rx)) => served,
        _ = grace => {
            warn!(grace = ?API_STOP_GRACE, "API clients still connected after the grace; stopping without them");
            Ok(())
        }
    };
    if let (Some(announcer), false) = (&ctrl.announcer, opts.keep) {
        withdraw_and_drain(announcer, drain_time).await;
    }
    ctrl.stop_checks();
    let _ = std::fs::remove_file(&opts.socket);
    if opts.keep {
        info!("--keep: the program stays attached with its maps; `lbctl up` adopts it");
    } else {
        // Removing the link pin lets the link go when this process closes it.
        // The state file stays: the next start replays it.
        remove_pins(&pin_dir);
        info!(state = %state_file.display(), "detached and unpinned; the state stays for the next start");
    }
    served
}

/// How long a stop waits for API clients to finish their calls.
const API_STOP_GRACE: Duration = Duration::from_secs(5);

/// The subdirectory of the pins that holds the NIC's maps and link.
const NIC_DIR: &str = "nic";

/// Loads the offload flavor for the NIC, reusing its maps if pinned.
fn load_nic(opts: &UpOptions, ifindex: u32, ring_capacity: u32, pin_dir: &Path) -> Result<NicProgram> {
    let dir = pin_dir.join(NIC_DIR);
    std::fs::create_dir_all(&dir)?;
    let device = if opts.offload_without_nic { 0 } else { ifindex };
    let program = nic::load_for_device(device, ring_capacity.div_ceil(lb_common::RING_SLOTS_PER_WORD), Some(&dir))
        .with_context(|| cannot_offload(&opts.iface))?;
    info!(interface = %opts.iface, "offload flavor loaded for the NIC");
    Ok(program)
}

/// Makes the NIC's maps a copy of the host's, written beside them from now
/// on, and runs the flavor on the NIC. Returns where it runs.
fn start_nic(
    dp: &mut Dataplane,
    mut nic: NicProgram,
    opts: &UpOptions,
    ifindex: u32,
    pin_dir: &Path,
) -> Result<&'static str> {
    dp.set_mirror(Dataplane::on_nic(std::mem::take(&mut nic.maps))?)?;
    if opts.offload_without_nic {
        let pin = pin_dir.join(NIC_DIR).join("program");
        let _ = std::fs::remove_file(&pin);
        nic.pin_program(&pin).context("pinning the offload flavor")?;
        return Ok("offload flavor loaded for the host, not attached (test)");
    }
    nic.attach(ifindex, &pin_dir.join(NIC_DIR).join("link"))?;
    Ok("offload (NIC)")
}

fn cannot_offload(iface: &str) -> String {
    format!("{iface} cannot offload XDP; use --xdp-mode native")
}

/// Atomically replaces the program behind a pinned XDP link with `program`.
fn replace_pinned(program: &mut Xdp, link_pin: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(link_pin).context("opening the pinned XDP link")?;
    let link = XdpLink::try_from(FdLink::from(link)).context("the pinned link is not an XDP link")?;
    program.attach_to_link(link).context("replacing the running program")?;
    Ok(())
}

/// Checks the VLAN and two-NIC options before anything changes; returns
/// the backend interface's index, with two NICs.
fn check_interfaces(opts: &UpOptions) -> Result<Option<u32>> {
    let offload = opts.offload_flavor || opts.mode == ModeChoice::Offload;
    if let Some(from) =
        opts.vlan_map.iter().map(|m| m.0).find(|f| opts.vlan_map.iter().filter(|m| m.0 == *f).count() > 1)
    {
        bail!("--vlan-map maps VLAN {from} more than once");
    }
    if !opts.vlan_map.is_empty() && offload {
        bail!("--vlan-map needs the host balancer: the offload flavor sends tagged frames on with the tags they came with");
    }
    if opts.trunk {
        crate::vlan::check_trunk(&opts.iface)?;
    }
    let Some(name) = &opts.backend_iface else { return Ok(None) };
    if *name == opts.iface {
        bail!("--backend-iface {name} is the interface itself: leave it out");
    }
    if offload {
        bail!("--backend-iface needs the host balancer: the offload flavor sends packets back out of its NIC");
    }
    let index = netlink::if_index(name)
        .with_context(|| format!("no interface '{name}' (--backend-iface) in this network namespace"))?;
    Ok(Some(index))
}

/// Puts `program` on `iface` behind a link pinned at `link_pin`, so that it
/// outlives this process. If that link is still alive, the program behind it
/// is replaced atomically ("adopted"); a severed one (its interface went
/// away) is dropped. Otherwise it attaches in the chosen mode (auto: native,
/// then generic). Returns the mode.
pub fn attach_pinned(program: &mut Xdp, iface: &str, choice: ModeChoice, link_pin: &Path) -> Result<String> {
    if link_pin.exists() {
        match replace_pinned(program, link_pin) {
            Ok(()) => return Ok("adopted".into()),
            Err(e) => {
                warn!(error = %error_chain(e.as_ref()), "the pinned link is unusable; attaching anew");
                let _ = std::fs::remove_file(link_pin);
            }
        }
    }
    let candidates: &[(XdpMode, &str)] = match choice {
        ModeChoice::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        ModeChoice::Native => &[(XdpMode::Driver, "native")],
        ModeChoice::Generic => &[(XdpMode::Skb, "generic")],
        ModeChoice::Offload => {
            bail!("{iface}: this program does not run on a NIC (`lbctl offload-check` says why); use --xdp-mode native")
        }
    };
    let mut errors = Vec::new();
    for (mode, name) in candidates {
        match program.attach(iface, *mode) {
            Ok(id) => {
                let link = program.take_link(id)?;
                let fd = FdLink::try_from(link).context("the kernel gave no bpf_link to pin")?;
                fd.pin(link_pin).context("pinning the XDP link")?;
                return Ok(name.to_string());
            }
            Err(e) => errors.push(format!("{name}: {}", error_chain(&e))),
        }
    }
    bail!(
        "cannot attach XDP to {iface} ({}). {}",
        errors.join("; "),
        bond_advice(iface).unwrap_or_else(|| format!(
            "If another XDP program is attached, detach it first (ip link set dev {iface} xdp off)"
        ))
    )
}

/// What a bond needs for XDP, with its own settings, if `iface` is one
/// (the kernel says why only in a tracepoint when a link is refused).
fn bond_advice(iface: &str) -> Option<String> {
    let read = |file: &str| std::fs::read_to_string(format!("/sys/class/net/{iface}/bonding/{file}")).ok();
    let mode = read("mode")?;
    let policy = read("xmit_hash_policy").unwrap_or_default();
    let slaves = read("slaves").unwrap_or_default();
    Some(bond_rules(iface, mode.trim(), policy.trim(), slaves.trim()))
}

/// The kernel's rules for XDP on a bond (drivers/net/bonding, 5.15 and
/// later) against this bond's mode, hash policy and slaves, as sysfs shows them.
fn bond_rules(iface: &str, mode: &str, policy: &str, slaves: &str) -> String {
    let mode_name = mode.split_whitespace().next().unwrap_or(mode);
    let policy_name = policy.split_whitespace().next().unwrap_or(policy);
    let mode_ok = match mode_name {
        "balance-rr" | "active-backup" => true,
        "802.3ad" | "balance-xor" => policy_name != "vlan+srcmac",
        _ => false,
    };
    let why = if mode_ok {
        format!("its mode {mode_name} takes XDP, so a slave refused it: every slave's driver must run XDP natively and transmit XDP frames (ndo_xdp_xmit); slaves: {slaves}")
    } else if matches!(mode_name, "802.3ad" | "balance-xor") {
        format!("its xmit_hash_policy {policy_name} does not take XDP: use layer2, layer2+3 or layer3+4")
    } else {
        format!("its mode {mode_name} does not take XDP: use 802.3ad, balance-xor, active-backup or balance-rr")
    };
    format!("{iface} is a bond (kernel 5.15 or later runs XDP on bonds): {why}")
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Removes the pinned links (each detaches once no process holds it) and
/// maps, the NIC's too.
pub fn remove_pins(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// The state file, if there is one. Files of older layouts are read too:
/// their declared part replays on a fresh program.
fn read_state(path: &Path) -> Result<(Option<Saved>, StateFile)> {
    crate::state_file::load(path)
        .map_err(|e| anyhow::anyhow!("the state file is damaged or too old to read: {e}; move it away to start empty"))
}

/// Makes sure `pin_root` is on bpffs, mounting it at /sys/fs/bpf if need
/// be, but not in a mount namespace of this process alone (`ip netns exec`
/// makes one, with a /sys of its own): pins there vanish with the process,
/// so a controller restarted after a crash would find nothing to adopt.
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let is_bpffs = |p: &Path| mounts.lines().any(|l| l.split_whitespace().nth(1) == p.to_str() && l.contains(" bpf "));
    let mut p = Some(pin_root);
    while let Some(dir) = p {
        if is_bpffs(dir) {
            return std::fs::create_dir_all(pin_root).context("creating the pin directory");
        }
        p = dir.parent();
    }
    if private_mount_namespace() {
        bail!(
            "{} is not on bpffs, and this process runs in a mount namespace of its own (as under `ip netns exec`, \
             which mounts a fresh /sys): pins made here would vanish when it exits, and a restart after a crash \
             would start empty. Enter the network namespace only (`nsenter --net=/var/run/netns/NAME lbctl up \
             ...`), or give --pin-dir on a bpffs the host mounted",
            pin_root.display()
        );
    }
    let mount_point = Path::new("/sys/fs/bpf");
    let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(mount_point).status()?;
    if !status.success() {
        bail!("bpffs is not mounted at {} and mounting it failed", mount_point.display());
    }
    std::fs::create_dir_all(pin_root).context("creating the pin directory")
}

/// Whether this process's mount namespace differs from PID 1's or, where
/// PID 1's cannot be read (a sandbox), from its parent's: `ip netns exec`
/// unshares it and then runs the command. Unknown counts as not.
fn private_mount_namespace() -> bool {
    let own = std::fs::read_link("/proc/self/ns/mnt");
    let parent = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|p| p.trim().parse::<u32>().ok())
    });
    let other = std::fs::read_link("/proc/1/ns/mnt")
        .or_else(|e| parent.filter(|p| *p > 1).map_or(Err(e), |p| std::fs::read_link(format!("/proc/{p}/ns/mnt"))));
    matches!((own, other), (Ok(own), Ok(other)) if own != other)
}

async fn resolve_next_hop(nl: &Netlink, via: Option<u32>) -> Result<[u8; 6]> {
    let gateway = nl.gateway(via).await?.context(if via.is_some() {
        "no route with a gateway out of --backend-iface to find the next hop: add one, or give --next-hop-mac"
    } else {
        "no default route in this network namespace to find the next hop: give --next-hop-mac"
    })?;
    for _ in 0..30 {
        if let Some(mac) = nl.neighbour_mac(gateway).await? {
            info!(%gateway, mac = %netlink::format_mac(&mac), "next hop resolved");
            return Ok(mac);
        }
        netlink::nudge_resolution(gateway);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateway {gateway} did not resolve to a MAC within 3 s: give --next-hop-mac")
}

/// Keeps the next-hop MAC in step with the neighbour table.
async fn refresh_next_hop(ctrl: Arc<Controller>, nl: Netlink, via: Option<u32>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(Some(gateway)) = nl.gateway(via).await else { continue };
        match nl.neighbour_mac(gateway).await {
            Ok(Some(mac)) => {
                let _ = ctrl.set_next_hop_mac(mac);
            }
            _ => netlink::nudge_resolution(gateway),
        }
    }
}

fn default_source_v4(addrs: &[(IpAddr, u8)]) -> (Ipv4Addr, u8) {
    addrs
        .iter()
        .find_map(|(a, _)| match a {
            IpAddr::V4(v4) => Some((*v4, 32)),
            _ => None,
        })
        .unwrap_or((Ipv4Addr::UNSPECIFIED, 32))
}

fn default_source_v6(addrs: &[(IpAddr, u8)]) -> (Ipv6Addr, u8) {
    addrs
        .iter()
        .find_map(|(a, _)| match a {
            IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 != 0xfe80 => Some((*v6, 128)),
            _ => None,
        })
        .unwrap_or((Ipv6Addr::UNSPECIFIED, 128))
}

/// Brings the running state to the config file, logging each change. A
/// file that does not parse changes nothing (apply itself restores the
/// previous state if a change fails half way).
fn apply_config(ctrl: &Arc<Controller>, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let want = desired::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let changes = ctrl.apply(&want, false)?;
    if changes.is_empty() {
        info!(file = %path.display(), "config applied: no changes");
    }
    for change in changes {
        info!(%change, "config applied");
    }
    Ok(())
}

/// Imports the ring history file `path` (`lbctl history export` on a peer).
fn join(ctrl: &Controller, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let histories = api::parse_history(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    ctrl.import_history(&histories)?;
    info!(file = %path.display(), vips = histories.len(), "joined the tier: its ring history imported");
    Ok(())
}

/// SIGHUP re-applies the config file: one file pushed to every LB host by
/// any configuration tool keeps them identical.
async fn reapply_on_sighup(ctrl: Arc<Controller>, path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hup.recv().await.is_some() {
        info!(file = %path.display(), "SIGHUP: re-applying the config file");
        if let Err(e) = apply_config(&ctrl, &path) {
            warn!(error = %format!("{e:#}"), "config not re-applied: the running state stays as it was");
        }
    }
}

/// Withdraws every route, then keeps forwarding for `drain` (the routers
/// move the flows to other LB hosts meanwhile); a second signal ends it.
async fn withdraw_and_drain(announcer: &Announcer, drain: Duration) {
    let withdrawn = announcer.withdraw_all().await;
    info!(routes = withdrawn, drain = ?drain, "routes withdrawn; forwarding on until the drain time is over");
    tokio::select! {
        _ = tokio::time::sleep(drain) => info!("drain time over"),
        _ = shutdown_signal() => info!("drain cut short"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
}

async fn forward_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring-buffer fd for its whole life and
    // always returns that same fd.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::bond_rules;

    #[test]
    fn a_bond_refusal_names_what_to_change() {
        let alb = bond_rules("bond0", "balance-alb 6", "layer2 0", "eth0 eth1");
        assert!(alb.contains("mode balance-alb does not take XDP: use 802.3ad"), "{alb}");
        let srcmac = bond_rules("bond0", "802.3ad 4", "vlan+srcmac 5", "eth0 eth1");
        assert!(srcmac.contains("xmit_hash_policy vlan+srcmac does not take XDP"), "{srcmac}");
        let slaves = bond_rules("bond0", "802.3ad 4", "layer3+4 1", "eth0 eth1");
        assert!(slaves.contains("a slave refused it") && slaves.contains("slaves: eth0 eth1"), "{slaves}");
    }
}
