//! The gRPC services of `proto/lb.proto`, served by the controller on a
//! unix socket that only its own user (and root) may use.

use std::{net::IpAddr, path::Path, sync::Arc};

use lb_common::{stat, AF_INET, AF_INET6};
use tokio::net::UnixListener;
use tokio_stream::{wrappers::UnixListenerStream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::{
    controller::{ApiError, Controller},
    desired::{self, BackendWish},
    netlink::format_mac,
    quic::QuicSpec,
    services::{Generation, Via, VipAddr, VipState},
};

pub mod pb {
    tonic::include_proto!("lb.v1");
}

use pb::{
    backends_server::{Backends, BackendsServer},
    health_server::{Health, HealthServer},
    stats_server::{Stats, StatsServer},
    status_server::{Status as StatusService, StatusServer},
    vips_server::{Vips, VipsServer},
};

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Exists(m) => Status::already_exists(m),
            ApiError::Exhausted(m) => Status::resource_exhausted(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

#[derive(Clone)]
pub struct Api(pub Arc<Controller>);

/// Files of the optional TCP listener, which only speaks mutual TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: std::path::PathBuf,
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

/// The server side of mutual TLS: clients without a valid certificate are
/// refused in the handshake, before any call.
pub fn server_tls(files: &TlsFiles) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .client_ca_root(Certificate::from_pem(read(&files.client_ca)?))
        .client_auth_optional(false))
}

/// Serves the API over TCP with mutual TLS until `shutdown` completes.
pub async fn serve_tcp(
    ctrl: Arc<Controller>,
    listener: tokio::net::TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut server = tonic::transport::Server::builder().tls_config(tls)?;
    routes(&mut server, Api(ctrl)).serve_with_incoming_shutdown(incoming, shutdown).await?;
    Ok(())
}

/// Every service of the contract, on one server.
fn routes(server: &mut tonic::transport::Server, api: Api) -> tonic::transport::server::Router {
    server
        .add_service(VipsServer::new(api.clone()))
        .add_service(BackendsServer::new(api.clone()))
        .add_service(HealthServer::new(api.clone()))
        .add_service(StatsServer::new(api.clone()))
        .add_service(StatusServer::new(api))
}

/// Serves the API on `socket` (mode 0600) until `shutdown` completes.
pub async fn serve(
    ctrl: Arc<Controller>,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let own_uid = unsafe { libc::geteuid() };
    // The file mode already keeps others out; the peer check is the second lock.
    let incoming = UnixListenerStream::new(listener).filter(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => true,
            Ok(cred) => {
                warn!(uid = cred.uid(), "refused an API connection from another user");
                false
            }
            Err(_) => false,
        },
        Err(_) => true,
    });
    routes(&mut tonic::transport::Server::builder(), Api(ctrl))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A QUIC config from the API: zeros take the defaults.
fn quic_spec(q: pb::QuicConfig) -> Result<QuicSpec, String> {
    let default = QuicSpec::default();
    let octet = |v: u32, what: &str| u8::try_from(v).map_err(|_| format!("QUIC {what} {v} is out of range"));
    let or_default = |v: u8, d: u8| if v == 0 { d } else { v };
    Ok(QuicSpec {
        config_id: octet(q.config_id, "config id")?,
        server_id_len: or_default(octet(q.server_id_len, "server ID length")?, default.server_id_len),
        nonce_len: or_default(octet(q.nonce_len, "nonce length")?, default.nonce_len),
    })
}

fn vip_of(text: &str) -> Result<VipAddr, Status> {
    text.parse().map_err(Status::invalid_argument)
}

fn backend_of(vip: &VipAddr, text: &str) -> Result<IpAddr, Status> {
    desired::parse_backend_addr(vip, text).map_err(Status::invalid_argument)
}

impl Api {
    fn vip_message(&self, state: &VipState, dp: &mut crate::Dataplane) -> pb::Vip {
        let stats = dp.vip_stats(state.id).unwrap_or_default();
        pb::Vip {
            vip: state.spec.vip.to_string(),
            hash: state.spec.hash.to_string(),
            ring_size: state.spec.ring_size,
            backends: state.backends.len() as u32,
            active_backends: state.backends.values().filter(|b| state.in_ring(b)).count() as u32,
            fail_open: state.fail_open,
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            encap: state.spec.encap.to_string(),
            stateless: state.spec.stateless,
            quic: state.spec.quic.map(|q| pb::QuicConfig {
                enabled: true,
                config_id: q.config_id.into(),
                server_id_len: q.server_id_len.into(),
                nonce_len: q.nonce_len.into(),
            }),
            ring_fingerprint: fingerprint_text(state.fingerprint),
            history_fingerprints: state.history().iter().map(|g| fingerprint_text(g.fingerprint)).collect(),
            announced: match &self.0.announcer {
                None => "off".into(),
                Some(a) if a.state().announced.contains(&state.spec.vip.addr) => "yes".into(),
                Some(_) => "no".into(),
            },
        }
    }

    fn backend_messages(&self, vip: &VipAddr) -> Result<Vec<pb::Backend>, Status> {
        let mut guard = self.0.lock();
        let st = &mut *guard;
        let state = st.services.vip(vip).map_err(ApiError::from)?;
        Ok(state
            .backends
            .iter()
            .map(|(addr, b)| {
                let stats = st.dp.backend_stats(b.id).unwrap_or_default();
                let check = st.checks.get(&(*vip, *addr));
                let (health, reason) = match check {
                    None => ("unchecked", ""),
                    Some(c) if c.tracker.healthy => ("up", ""),
                    Some(c) => ("down", c.tracker.last_error.as_str()),
                };
                pb::Backend {
                    vip: vip.to_string(),
                    address: addr.to_string(),
                    weight: b.weight,
                    drained: b.drained,
                    health: health.into(),
                    check: check.map(|c| c.spec.to_string()).unwrap_or_else(|| "none".into()),
                    packets: stats.packets,
                    bytes: stats.bytes,
                    in_ring: state.in_ring(b),
                    reason: reason.to_string(),
                    syn_repeats: stats.syn_repeats,
                    server_id: state.spec.quic.zip(b.server_id).map(|(q, id)| q.hex(id)).unwrap_or_default(),
                }
            })
            .collect())
    }

    fn backend_message(&self, vip: &VipAddr, addr: IpAddr) -> Result<pb::Backend, Status> {
        let address = addr.to_string();
        self.backend_messages(vip)?
            .into_iter()
            .find(|b| b.address == address)
            .ok_or_else(|| Status::not_found(format!("no backend {addr} in VIP {vip}")))
    }
}

#[tonic::async_trait]
impl Vips for Api {
    async fn add_vip(&self, req: Request<pb::AddVipRequest>) -> Result<Response<pb::Vip>, Status> {
        let r = req.into_inner();
        let quic = r.quic.filter(|q| q.enabled).map(quic_spec).transpose().map_err(Status::invalid_argument)?;
        let spec = desired::vip_spec(&r.vip, &r.hash, r.ring_size, &r.encap, r.stateless, quic)
            .map_err(Status::invalid_argument)?;
        self.0.add_vip(spec)?;
        let mut guard = self.0.lock();
        let st = &mut *guard;
        let state = st.services.vip(&spec.vip).map_err(ApiError::from)?.clone();
        Ok(Response::new(self.vip_message(&state, &mut st.dp)))
    }

    async fn delete_vip(&self, req: Request<pb::VipRef>) -> Result<Response<pb::Empty>, Status> {
        let vip = vip_of(&req.into_inner().vip)?;
        self.0.remove_vip(&vip)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_vips(&self, _: Request<pb::Empty>) -> Result<Response<pb::VipList>, Status> {
        let mut guard = self.0.lock();
        let st = &mut *guard;
        let states: Vec<VipState> = st.services.vips().cloned().collect();
        let vips = states.iter().map(|s| self.vip_message(s, &mut st.dp)).collect();
        Ok(Response::new(pb::VipList { vips }))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyReply>, Status> {
        let r = req.into_inner();
        let want = desired::parse(&r.toml).map_err(Status::invalid_argument)?;
        // Building rings takes milliseconds each: off the async workers.
        let ctrl = Arc::clone(&self.0);
        let changes = tokio::task::spawn_blocking(move || ctrl.apply(&want, r.dry_run))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::ApplyReply { changes: changes.iter().map(|c| c.to_string()).collect() }))
    }

    async fn export_history(&self, _: Request<pb::Empty>) -> Result<Response<pb::RingHistory>, Status> {
        Ok(Response::new(history_message(self.0.history())))
    }

    async fn import_history(&self, req: Request<pb::RingHistory>) -> Result<Response<pb::RingHistory>, Status> {
        let histories = req.into_inner().vips.iter().map(history_of).collect::<Result<Vec<_>, Status>>()?;
        self.0.import_history(&histories)?;
        Ok(Response::new(history_message(self.0.history())))
    }
}

fn history_message(histories: Vec<(VipAddr, Vec<Generation>)>) -> pb::RingHistory {
    let vips = histories
        .into_iter()
        .map(|(vip, generations)| pb::VipHistory {
            vip: vip.to_string(),
            generations: generations
                .into_iter()
                .map(|g| pb::Generation {
                    fingerprint: fingerprint_text(g.fingerprint),
                    since_unix: g.since,
                    backends: g
                        .members
                        .iter()
                        .map(|(a, w)| pb::DeclaredBackend { address: a.to_string(), weight: *w })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    pb::RingHistory { vips }
}

/// A ring history as `lbctl history export` writes it (JSON).
pub fn parse_history(text: &str) -> Result<Vec<(VipAddr, Vec<Generation>)>, String> {
    let message: pb::RingHistory = serde_json::from_str(text)
        .map_err(|e| format!("not a ring history (`lbctl history export` writes one): {e}"))?;
    message.vips.iter().map(|v| history_of(v).map_err(|s| s.message().to_string())).collect()
}

/// One VIP's history as a client sent it, its words checked.
fn history_of(message: &pb::VipHistory) -> Result<(VipAddr, Vec<Generation>), Status> {
    let vip = vip_of(&message.vip)?;
    let generations = message
        .generations
        .iter()
        .map(|g| {
            let fingerprint = u64::from_str_radix(&g.fingerprint, 16).map_err(|_| {
                Status::invalid_argument(format!("{vip}: fingerprint '{}' is not 16 hex digits", g.fingerprint))
            })?;
            let mut members = std::collections::BTreeMap::new();
            for b in &g.backends {
                if members.insert(backend_of(&vip, &b.address)?, b.weight).is_some() {
                    return Err(Status::invalid_argument(format!(
                        "{vip}: backend {} twice in a generation",
                        b.address
                    )));
                }
            }
            Ok(Generation::declared(members, g.since_unix, fingerprint))
        })
        .collect::<Result<_, Status>>()?;
    Ok((vip, generations))
}

#[tonic::async_trait]
impl Backends for Api {
    async fn add_backend(&self, req: Request<pb::AddBackendRequest>) -> Result<Response<pb::Backend>, Status> {
        let r = req.into_inner();
        let vip = vip_of(&r.vip)?;
        let addr = backend_of(&vip, &r.address)?;
        let weight = r.weight.unwrap_or(1);
        desired::check_weight(weight).map_err(Status::invalid_argument)?;
        let h = r.health.unwrap_or_default();
        let ms = |v: u64| (v > 0).then(|| format!("{v}ms"));
        let (interval, timeout) = (ms(h.interval_ms), ms(h.timeout_ms));
        let check = desired::check_spec(
            &vip,
            &desired::CheckText {
                check: &h.check,
                interval: interval.as_deref(),
                timeout: timeout.as_deref(),
                rise: (h.rise > 0).then_some(h.rise),
                fall: (h.fall > 0).then_some(h.fall),
                expect_status: (!h.expect_status.is_empty()).then_some(h.expect_status.as_str()),
                ca_pem: (!h.check_ca_pem.is_empty()).then_some(h.check_ca_pem.as_str()),
                insecure: h.check_insecure,
                path: Some(h.check_path.as_str()),
                eject_syn_repeats: Some(h.eject_syn_repeats),
            },
        )
        .map_err(Status::invalid_argument)?;
        let server_id = match r.server_id.as_str() {
            "" => None,
            text => {
                let spec = self.0.lock().services.vip(&vip).map_err(ApiError::from)?.spec;
                Some(desired::server_id(&spec, addr, text).map_err(Status::invalid_argument)?)
            }
        };
        self.0.add_backend(&vip, addr, BackendWish { weight, drained: false, check, server_id })?;
        Ok(Response::new(self.backend_message(&vip, addr)?))
    }

    async fn delete_backend(&self, req: Request<pb::BackendRef>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let vip = vip_of(&r.vip)?;
        self.0.remove_backend(&vip, backend_of(&vip, &r.address)?)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn drain_backend(&self, req: Request<pb::BackendRef>) -> Result<Response<pb::Backend>, Status> {
        let r = req.into_inner();
        let vip = vip_of(&r.vip)?;
        let addr = backend_of(&vip, &r.address)?;
        self.0.drain_backend(&vip, addr)?;
        Ok(Response::new(self.backend_message(&vip, addr)?))
    }

    async fn set_weight(&self, req: Request<pb::SetWeightRequest>) -> Result<Response<pb::Backend>, Status> {
        let r = req.into_inner();
        let vip = vip_of(&r.vip)?;
        let addr = backend_of(&vip, &r.address)?;
        self.0.set_weight(&vip, addr, r.weight)?;
        Ok(Response::new(self.backend_message(&vip, addr)?))
    }

    async fn list_backends(&self, req: Request<pb::VipRef>) -> Result<Response<pb::BackendList>, Status> {
        let vip = vip_of(&req.into_inner().vip)?;
        Ok(Response::new(pb::BackendList { backends: self.backend_messages(&vip)? }))
    }
}

#[tonic::async_trait]
impl Health for Api {
    async fn list_health(&self, _: Request<pb::Empty>) -> Result<Response<pb::HealthList>, Status> {
        let st = self.0.lock();
        let backends = st
            .checks
            .iter()
            .map(|((vip, addr), c)| pb::HealthState {
                vip: vip.to_string(),
                address: addr.to_string(),
                check: c.spec.to_string(),
                health: if c.tracker.healthy { "up" } else { "down" }.into(),
                checks: c.tracker.checks,
                failures: c.tracker.failures,
                last_error: c.tracker.last_error.clone(),
            })
            .collect();
        Ok(Response::new(pb::HealthList { backends }))
    }
}

#[tonic::async_trait]
impl Stats for Api {
    async fn get_stats(&self, _: Request<pb::Empty>) -> Result<Response<pb::StatsReply>, Status> {
        let counters = self.0.global_stats()?;
        let global = stat::NAMES
            .iter()
            .zip(counters)
            .map(|(name, value)| pb::Counter { name: name.to_string(), value })
            .collect();
        let vips = self.list_vips(Request::new(pb::Empty {})).await?.into_inner().vips;
        let mut backends = Vec::new();
        for v in &vips {
            backends.extend(self.backend_messages(&vip_of(&v.vip)?)?);
        }
        Ok(Response::new(pb::StatsReply { global, vips, backends }))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainReply>, Status> {
        let r = req.into_inner();
        let vip = vip_of(&r.vip)?;
        let client: std::net::SocketAddr = r
            .client
            .parse()
            .map_err(|_| Status::invalid_argument(format!("client '{}' is not ADDR:PORT", r.client)))?;
        if client.is_ipv4() != vip.addr.is_ipv4() {
            return Err(Status::invalid_argument(format!("client {client} and VIP {vip} are of different families")));
        }
        let (src, family) = crate::addr::words(client.ip());
        let flow = lb_common::FlowKey {
            src,
            dst: crate::addr::words(vip.addr).0,
            src_port: lb_common::port_raw(client.port()),
            dst_port: lb_common::port_raw(vip.port),
            proto: vip.proto.number(),
            family: if family == AF_INET { AF_INET } else { AF_INET6 },
            _pad: [0; 2],
        };
        let e = self
            .0
            .explain(&flow)?
            .ok_or_else(|| Status::not_found(format!("no VIP {vip}, or it has no backend taking new flows")))?;
        let (via, slot) = match e.via {
            Via::ConnTable => ("conn-table", 0),
            Via::Ring { slot } => ("ring", slot),
        };
        Ok(Response::new(pb::ExplainReply {
            backend: e.backend.to_string(),
            via: via.into(),
            hash: e.hash,
            slot,
            alternate: e.alternates.first().map(|a| a.to_string()).unwrap_or_default(),
            alternates: e.alternates.iter().map(|a| a.to_string()).collect(),
        }))
    }
}

#[tonic::async_trait]
impl StatusService for Api {
    async fn get_status(&self, _: Request<pb::Empty>) -> Result<Response<pb::StatusReply>, Status> {
        let programs = attached_programs(&self.0.info.interface).await;
        let info = &self.0.info;
        let st = self.0.lock();
        let settings = *st.services.settings();
        let vips: Vec<&VipState> = st.services.vips().collect();
        let announce = self.0.announcer.as_ref().map(|a| a.state()).unwrap_or_default();
        Ok(Response::new(pb::StatusReply {
            interface: info.interface.clone(),
            xdp_mode: info.xdp_mode.clone(),
            next_hop_mac: format_mac(&settings.next_hop_mac),
            adopted: info.adopted,
            vips: vips.len() as u32,
            backends: vips.iter().map(|v| v.backends.len() as u32).sum(),
            fail_open_vips: vips.iter().filter(|v| v.fail_open).map(|v| v.spec.vip.to_string()).collect(),
            uptime_seconds: self.0.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
            conn_table_size: info.conn_table_size,
            encap_src_v4: format!("{}/{}", settings.encap_src_v4.0, settings.encap_src_v4.1),
            encap_src_v6: format!("{}/{}", settings.encap_src_v6.0, settings.encap_src_v6.1),
            mtu: settings.mtu,
            debug: settings.debug,
            announce_table: self.0.announcer.as_ref().map_or(0, |a| a.table()),
            announce_maintenance: announce.maintenance,
            announced: announce.announced.iter().map(|a| a.to_string()).collect(),
            announce_error: announce.error.unwrap_or_default(),
            programs,
            data_path_checks: st.probes.summary(),
            backend_interface: info.backend_interface.clone().unwrap_or_default(),
            vlan_map: info.vlan_map.iter().map(|(from, to)| format!("{from}->{to}")).collect(),
            trunk: info.trunk,
            checks: st.checks.len() as u32,
            probe_tasks: self.0.probe_counts().0 as u32,
            probe_lateness_p99_ms: self.0.probe_lateness_p99() * 1000.0,
        }))
    }

    async fn set_debug(&self, req: Request<pb::DebugRequest>) -> Result<Response<pb::StatusReply>, Status> {
        self.0.set_debug(req.into_inner().on)?;
        self.get_status(Request::new(pb::Empty {})).await
    }

    async fn set_announce(&self, req: Request<pb::AnnounceRequest>) -> Result<Response<pb::StatusReply>, Status> {
        self.0.set_maintenance(req.into_inner().withdraw)?;
        self.get_status(Request::new(pb::Empty {})).await
    }
}

/// "NAME (id N): WHERE" for each XDP program attached to the interface,
/// from the kernel (or why it could not say).
async fn attached_programs(interface: &str) -> Vec<String> {
    let Some(ifindex) = crate::netlink::if_index(interface) else { return vec![format!("{interface} is gone")] };
    let attached = match crate::netlink::Netlink::open() {
        Ok(nl) => nl.xdp_programs(ifindex).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let attached = match attached {
        Ok(a) => a,
        Err(e) => return vec![format!("unknown: {e}")],
    };
    let names: std::collections::BTreeMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| attached.iter().any(|(_, id)| *id == p.id()))
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_string()))
        .collect();
    attached
        .iter()
        .map(|(place, id)| format!("{} (id {id}): {place}", names.get(id).map_or("?", String::as_str)))
        .collect()
}

/// A ring fingerprint as `vip list` and `/metrics` show it.
pub fn fingerprint_text(fingerprint: u64) -> String {
    if fingerprint == 0 {
        String::new()
    } else {
        format!("{fingerprint:016x}")
    }
}
