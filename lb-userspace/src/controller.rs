//! The controller behind `lbctl up`: owns the data plane and the model,
//! validates every request before touching a map, runs health checks,
//! saves its state after every change so that a restart (even after
//! SIGKILL) adopts the running program without disturbing traffic, and a
//! start on a fresh program (after a clean stop or a reboot) replays it.
//!
//! Each API call is one change set, and so is an `apply`: at its end the
//! VIPs' declared ring history records what changed (see
//! [`Services::commit_history`]).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use lb_common::{stat, FlowKey};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    announce::Announcer,
    check_tasks::{self, CheckTasks, Lateness, ProbeKey},
    dataplane::{Dataplane, DataplaneError},
    desired::{self, BackendWish, Change, Desired, VipWish},
    health::{self, CheckPath, CheckSpec, Probe, Tracker},
    probe_path::{self, ProbePaths},
    services::{
        BackendSpec, Explanation, Generation, ServiceError, Services, Settings, Snapshot, VipAddr, VipSpec, VipState,
    },
    state_file::StateFile,
};

/// An error for an API caller: what kind, and a message naming the input.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::NoSuchVip(_) | ServiceError::NoSuchBackend(..) => ApiError::NotFound(msg),
            ServiceError::VipExists(_) | ServiceError::BackendExists(..) => ApiError::Exists(msg),
            ServiceError::TooManyVips
            | ServiceError::TooManyBackends
            | ServiceError::RingSpaceFull { .. }
            | ServiceError::RingSpaceWanting { .. } => ApiError::Exhausted(msg),
            ServiceError::Dataplane(_) => ApiError::Internal(msg),
            _ => ApiError::Invalid(msg),
        }
    }
}

impl From<DataplaneError> for ApiError {
    fn from(e: DataplaneError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// Health bookkeeping of one backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checked {
    pub spec: CheckSpec,
    pub tracker: Tracker,
}

/// What is saved to the state file.
#[derive(Serialize, Deserialize)]
pub struct Saved<V = VipState> {
    /// [`STATE_LAYOUT`] of the lbctl that wrote it (absent: 1).
    #[serde(default = "first_layout")]
    pub layout: u32,
    pub services: Snapshot<V>,
    pub checks: Vec<(VipAddr, IpAddr, Checked)>,
    pub conn_table_size: u32,
    pub ring_capacity: u32,
    /// `lbctl announce withdraw` is in force (absent: not).
    #[serde(default)]
    pub maintenance: bool,
}

/// The map layout a state file describes. 7: the config carries the
/// backend-facing interface's MAC (two NICs); 6: QUIC VIPs (the VIP entry
/// carries a QUIC-LB config, a server-ID map, five more counters); 5: each ring has an extent of
/// its own (a VIP owns two to seven), 65536 backend ids; 4: seven ring slots per VIP
/// (live, four history rings, the previous live ring, next) and the VIP
/// entry names the alternate rings; 3: the conn table is an array
/// of buckets, and the flow hash and ring slot changed (32-bit hash lanes,
/// multiply-shift slot), so older maps' entries and rings cannot be
/// followed; 2: three ring slots per VIP (live, previous, next) and the
/// GUE fields; 1 had two.
pub const STATE_LAYOUT: u32 = 7;

impl<V> Saved<V> {
    /// The same state with each VIP made by `f`.
    pub fn try_map_vips<W, E>(self, f: impl FnMut(V) -> Result<W, E>) -> Result<Saved<W>, E> {
        Ok(Saved {
            layout: self.layout,
            services: self.services.try_map_vips(f)?,
            checks: self.checks,
            conn_table_size: self.conn_table_size,
            ring_capacity: self.ring_capacity,
            maintenance: self.maintenance,
        })
    }
}

fn first_layout() -> u32 {
    1
}

/// Facts about this run, for `status`.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub interface: String,
    pub xdp_mode: String,
    pub adopted: bool,
    pub conn_table_size: u32,
    /// The next-hop MAC came from the command line (no refresh).
    pub fixed_next_hop: bool,
    /// Two NICs: where packets for backends leave.
    pub backend_interface: Option<String>,
    pub trunk: bool,
    pub vlan_map: Vec<(u16, u16)>,
}

pub struct State {
    pub dp: Dataplane,
    pub services: Services,
    pub checks: BTreeMap<(VipAddr, IpAddr), Checked>,
    /// The routes of the data-path checks.
    pub probes: ProbePaths,
    /// An `apply` is under way: its changes are one change set.
    pub in_apply: bool,
}

impl State {
    pub fn new(
        dp: Dataplane,
        services: Services,
        checks: BTreeMap<(VipAddr, IpAddr), Checked>,
        probes: ProbePaths,
    ) -> Self {
        Self { dp, services, checks, probes, in_apply: false }
    }
}

pub struct Controller {
    state: Mutex<State>,
    /// The route handoff (`up --announce-table`), if on.
    pub announcer: Option<Arc<Announcer>>,
    tasks: Mutex<CheckTasks>,
    lateness: Mutex<Lateness>,
    state_file: Mutex<StateFile>,
    /// A replay is under way: the state file keeps what it replays until
    /// the replay has succeeded.
    replaying: std::sync::atomic::AtomicBool,
    ring_capacity: u32,
    pub info: RunInfo,
    pub started: Instant,
}

impl Controller {
    pub fn new(
        state: State,
        state_file: StateFile,
        ring_capacity: u32,
        info: RunInfo,
        announcer: Option<Arc<Announcer>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
            announcer,
            tasks: Mutex::default(),
            lateness: Mutex::default(),
            state_file: Mutex::new(state_file),
            replaying: false.into(),
            ring_capacity,
            info,
            started: Instant::now(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the health checks of every checked backend (after a restart).
    pub fn start_checks(self: &Arc<Self>) {
        let checks: Vec<_> = self.lock().checks.iter().map(|(k, c)| (*k, c.spec.clone())).collect();
        for ((vip, addr), spec) in checks {
            self.spawn_check(vip, addr, spec);
        }
    }

    /// Saves the state file (see `state_file`).
    fn save(&self, state: &mut State) {
        if self.replaying.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // Whatever changed may change what can serve.
        if let Some(announcer) = &self.announcer {
            announcer.changed();
        }
        let maintenance = self.announcer.as_ref().is_some_and(|a| a.state().maintenance);
        let mut file = self.state_file.lock().unwrap();
        let checks = &state.checks;
        let result = file.save(&mut state.services, |services| Saved {
            layout: STATE_LAYOUT,
            services,
            checks: checks.iter().map(|((v, a), c)| (*v, *a, c.clone())).collect(),
            conn_table_size: self.info.conn_table_size,
            ring_capacity: self.ring_capacity,
            maintenance,
        });
        if let Err(e) = result {
            warn!(file = %file.path().display(), error = %e, "cannot save state: a restart would not restore it");
        }
    }

    pub fn save_now(&self) {
        self.save(&mut self.lock());
    }

    /// Ends a change set (unless an `apply` is under way, which ends its
    /// own): the ring history records the declared changes, then the
    /// state is saved.
    fn commit(&self, st: &mut State) {
        if st.in_apply {
            return;
        }
        if let Err(e) = st.services.commit_history(&mut st.dp) {
            warn!(error = %e, "cannot record the declared rings: GUE alternates miss this change");
        }
        self.save(st);
    }

    pub fn add_vip(&self, spec: VipSpec) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.services.add_vip(&mut st.dp, spec)?;
        let quic = spec.quic.map(|q| q.to_string());
        info!(vip = %spec.vip, hash = ?spec.hash, ring_size = spec.ring_size, quic, "VIP added");
        self.commit(st);
        Ok(())
    }

    pub fn remove_vip(&self, vip: &VipAddr) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.services.remove_vip(&mut st.dp, vip)?;
        st.checks.retain(|(v, _), _| v != vip);
        self.tasks.lock().unwrap().stop_vip(vip);
        info!(%vip, "VIP removed");
        self.commit(st);
        Ok(())
    }

    pub fn add_backend(self: &Arc<Self>, vip: &VipAddr, addr: IpAddr, wish: BackendWish) -> Result<(), ApiError> {
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let spec = BackendSpec { addr, weight: wish.weight, server_id: wish.server_id };
            st.services.add_backend(&mut st.dp, vip, spec)?;
            if wish.drained {
                st.services.drain_backend(&mut st.dp, vip, addr)?;
            }
            if wish.check.runs() {
                st.checks.insert((*vip, addr), Checked { spec: wish.check.clone(), tracker: Tracker::new(true) });
            }
            info!(%vip, backend = %addr, weight = wish.weight, check = %wish.check, "backend added");
            self.commit(st);
        }
        if wish.check.runs() {
            self.spawn_check(*vip, addr, wish.check);
        }
        Ok(())
    }

    pub fn remove_backend(&self, vip: &VipAddr, addr: IpAddr) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.services.remove_backend(&mut st.dp, vip, addr)?;
        st.checks.remove(&(*vip, addr));
        self.tasks.lock().unwrap().stop(vip, addr);
        info!(%vip, backend = %addr, "backend removed");
        self.commit(st);
        Ok(())
    }

    pub fn drain_backend(&self, vip: &VipAddr, addr: IpAddr) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.services.drain_backend(&mut st.dp, vip, addr)?;
        info!(%vip, backend = %addr, "backend drained: keeps its flows, gets no new ones");
        self.commit(st);
        Ok(())
    }

    pub fn set_weight(&self, vip: &VipAddr, addr: IpAddr, weight: u32) -> Result<(), ApiError> {
        desired::check_weight(weight).map_err(ApiError::Invalid)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        st.services.set_weight(&mut st.dp, vip, addr, weight)?;
        info!(%vip, backend = %addr, weight, "weight set");
        self.commit(st);
        Ok(())
    }

    /// The running state in the desired-state form, for `apply` to diff.
    pub fn current(&self) -> Desired {
        let st = self.lock();
        current_of(&st)
    }

    /// Brings the running state to `want`. On a failure part-way, the
    /// previous state is put back and the error returned.
    pub fn apply(self: &Arc<Self>, want: &Desired, dry_run: bool) -> Result<Vec<Change>, ApiError> {
        let started = Instant::now();
        let before = self.current();
        let changes = desired::plan(&before, want);
        let removed: Vec<VipAddr> =
            changes.iter().filter_map(|c| if let Change::RemoveVip(v) = c { Some(*v) } else { None }).collect();
        let added: Vec<VipSpec> =
            changes.iter().filter_map(|c| if let Change::AddVip(s) = c { Some(*s) } else { None }).collect();
        self.lock().services.check_ring_space(&removed, &added)?;
        // Nothing to do is done at once: not even a save.
        if dry_run || changes.is_empty() {
            return Ok(changes);
        }
        // One change set: each changed VIP's ring is built once, at the end,
        // and the state saved once.
        {
            let mut st = self.lock();
            st.in_apply = true;
            st.services.defer_rings();
        }
        let mut result = self.execute_all(&changes, &before);
        let built = {
            let mut guard = self.lock();
            let st = &mut *guard;
            st.in_apply = false;
            st.services.build_deferred_rings(&mut st.dp)
        };
        if let Err(e) = built {
            warn!(error = %e, "apply failed building its rings; restoring the previous state");
            self.undo_to(&before);
            result = Err(ApiError::Invalid(format!("building the rings: {e} (nothing was changed)")));
        }
        self.commit(&mut self.lock());
        if result.is_ok() {
            let took_ms = started.elapsed().as_secs_f64() * 1000.0;
            info!(changes = changes.len(), took_ms, "desired state applied");
        }
        result.map(|()| changes)
    }

    /// Brings the state back to `before`, one change at a time.
    fn undo_to(self: &Arc<Self>, before: &Desired) {
        for undo in desired::plan(&self.current(), before) {
            if let Err(e) = self.execute(&undo) {
                warn!(change = %undo, error = %e, "could not undo");
            }
        }
    }

    /// Executes `changes`; on a failure, brings the state back to `before`.
    fn execute_all(self: &Arc<Self>, changes: &[Change], before: &Desired) -> Result<(), ApiError> {
        for change in changes {
            if let Err(e) = self.execute(change) {
                warn!(%change, error = %e, "apply failed; restoring the previous state");
                self.undo_to(before);
                return Err(ApiError::Invalid(format!("{change}: {e} (nothing was changed)")));
            }
        }
        Ok(())
    }

    fn execute(self: &Arc<Self>, change: &Change) -> Result<(), ApiError> {
        match change {
            Change::RemoveVip(vip) => self.remove_vip(vip),
            Change::AddVip(spec) => self.add_vip(*spec),
            Change::RemoveBackend(vip, addr) => self.remove_backend(vip, *addr),
            Change::AddBackend(vip, addr, wish) => self.add_backend(vip, *addr, wish.clone()),
            Change::UpdateBackend(vip, addr, wish) => {
                // Weight, drain and check changes: re-add keeps nothing, so
                // change each part in place.
                let old = self.current()[vip].backends[addr].clone();
                if old.weight != wish.weight {
                    self.set_weight(vip, *addr, wish.weight)?;
                }
                if old.drained != wish.drained {
                    let mut guard = self.lock();
                    let st = &mut *guard;
                    if wish.drained {
                        st.services.drain_backend(&mut st.dp, vip, *addr)?;
                    } else {
                        st.services.undrain_backend(&mut st.dp, vip, *addr)?;
                    }
                    self.commit(st);
                }
                if old.server_id != wish.server_id {
                    let mut guard = self.lock();
                    let st = &mut *guard;
                    st.services.set_server_id(&mut st.dp, vip, *addr, wish.server_id)?;
                    self.commit(st);
                }
                if old.check != wish.check {
                    self.replace_check(vip, *addr, wish.check.clone());
                }
                Ok(())
            }
        }
    }

    fn replace_check(self: &Arc<Self>, vip: &VipAddr, addr: IpAddr, spec: CheckSpec) {
        self.tasks.lock().unwrap().stop(vip, addr);
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            if !spec.runs() {
                st.checks.remove(&(*vip, addr));
                // Unchecked backends count as healthy.
                let _ = st.services.set_health(&mut st.dp, vip, addr, true);
            } else {
                st.checks.insert((*vip, addr), Checked { spec: spec.clone(), tracker: Tracker::new(true) });
            }
            self.commit(st);
        }
        if spec.runs() {
            self.spawn_check(*vip, addr, spec);
        }
    }

    /// Runs the check of `addr` in `vip`: in the task of the same probe
    /// if one runs (see `check_tasks`), else in a new one.
    fn spawn_check(self: &Arc<Self>, vip: VipAddr, addr: IpAddr, spec: CheckSpec) {
        let start = |probe: &ProbeKey, subscribers: check_tasks::Subscribers| {
            let ctrl = Arc::clone(self);
            let ProbeKey { addr, through, spec } = probe.clone();
            tokio::spawn(async move {
                // Specs are validated before they get here; a prober that
                // cannot be made still fails every probe with the reason.
                let prober = health::Prober::new(&spec);
                // The first probe within one interval, at this probe's phase.
                let mut due = tokio::time::Instant::now() + health::phase(spec.interval, &(through, addr));
                loop {
                    tokio::time::sleep_until(due).await;
                    ctrl.lateness.lock().unwrap().record(due.elapsed().as_secs_f64());
                    let target = match &through {
                        None => Ok((addr, None)),
                        Some(vip) => ctrl.probe_target(vip, addr, &spec),
                    };
                    let started = Instant::now();
                    let result = match (&prober, target) {
                        (Ok(prober), Ok((to, mark))) => prober.probe(to, mark).await,
                        (Err(e), _) => Err(e.clone()),
                        (_, Err(e)) => Err(e),
                    };
                    let seconds = started.elapsed().as_secs_f64();
                    let vips: Vec<VipAddr> = subscribers.lock().unwrap().iter().copied().collect();
                    for vip in vips {
                        ctrl.record_check(&vip, addr, &spec, result.clone(), seconds);
                    }
                    due = tokio::time::Instant::now() + spec.interval + health::jitter(spec.interval);
                }
            })
        };
        self.tasks.lock().unwrap().run(vip, addr, spec, start);
    }

    /// Where a round of a check goes: the backend's own address, or (a
    /// data-path check) the VIP, through the check's route, from a socket
    /// with the mark that names the route.
    fn probe_target(&self, vip: &VipAddr, addr: IpAddr, spec: &CheckSpec) -> Result<(IpAddr, Option<u32>), String> {
        if spec.path == CheckPath::Direct || spec.probe == Probe::None {
            return Ok((addr, None));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let encap = st.services.vip(vip).map_err(|e| e.to_string())?.spec.encap;
        let settings = *st.services.settings();
        let checks = &st.checks;
        // Written every round, so a new next-hop MAC reaches it too.
        let mark = st.probes.open(
            vip,
            addr,
            |key| checks.get(key).is_some_and(|c| c.spec.path == CheckPath::Data),
            |id| probe_path::route(&settings, encap, addr, id),
        )?;
        Ok((vip.addr, Some(mark)))
    }

    fn record_check(&self, vip: &VipAddr, addr: IpAddr, spec: &CheckSpec, result: Result<(), String>, seconds: f64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        // The passive signal's counter, read only where it is on.
        let repeats = match st.services.vip(vip).ok().and_then(|v| v.backends.get(&addr)) {
            Some(b) if spec.eject_syn_repeats > 0 => st.dp.backend_stats(b.id).map_or(0, |s| s.syn_repeats),
            _ => 0,
        };
        let Some(checked) = st.checks.get_mut(&(*vip, addr)) else { return };
        checked.tracker.latency.observe(seconds);
        let (changed, result) = checked.tracker.round(spec, result, repeats, Instant::now());
        let Some(healthy) = changed else { return };
        let cause = result.err().unwrap_or_else(|| format!("{} checks passed", spec.rise));
        match st.services.set_health(&mut st.dp, vip, addr, healthy) {
            Ok(()) => {
                if healthy {
                    info!(%vip, backend = %addr, %cause, "backend is up: back in the ring");
                } else {
                    warn!(%vip, backend = %addr, %cause, "backend is down: out of the ring, its flows move");
                }
                if let Ok(state) = st.services.vip(vip) {
                    if state.fail_open {
                        warn!(%vip, "every backend is down: failing open, serving with all of them");
                    }
                }
            }
            Err(e) => warn!(%vip, backend = %addr, error = %e, "cannot apply a health change"),
        }
        self.save(st);
    }

    pub fn set_next_hop_mac(&self, mac: [u8; 6]) -> Result<bool, ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut settings = *st.services.settings();
        if settings.next_hop_mac == mac {
            return Ok(false);
        }
        let old = settings.next_hop_mac;
        settings.next_hop_mac = mac;
        st.services.set_settings(&mut st.dp, settings)?;
        info!(
            old = %crate::netlink::format_mac(&old),
            new = %crate::netlink::format_mac(&mac),
            "next-hop MAC changed"
        );
        self.save(st);
        Ok(true)
    }

    /// Turns the data plane's decision logging on or off.
    /// The VIP addresses that can serve: some VIP there has a backend in
    /// its ring (fail-open counts; no backend, or all drained or at weight
    /// 0, does not).
    pub fn serving_addresses(&self) -> std::collections::BTreeSet<IpAddr> {
        self.lock().services.vips().filter(|v| !v.ring().is_empty()).map(|v| v.spec.vip.addr).collect()
    }

    /// `lbctl announce withdraw|restore`: out of ECMP and back, forwarding all along.
    pub fn set_maintenance(&self, on: bool) -> Result<(), ApiError> {
        let announcer = self.announcer.as_ref().ok_or_else(|| {
            ApiError::Invalid("this controller announces nothing (start it with --announce-table N)".into())
        })?;
        announcer.set_maintenance(on);
        info!(
            maintenance = on,
            "{}",
            if on { "announcements withdrawn (maintenance)" } else { "announcements restored" }
        );
        self.save_now();
        Ok(())
    }

    pub fn set_debug(&self, on: bool) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let settings = Settings { debug: on, ..*st.services.settings() };
        st.services.set_settings(&mut st.dp, settings)?;
        info!(on, "data-plane decision logging switched");
        self.save(st);
        Ok(())
    }

    pub fn settings(&self) -> Settings {
        *self.lock().services.settings()
    }

    pub fn explain(&self, flow: &FlowKey) -> Result<Option<Explanation>, ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        Ok(st.services.explain(&mut st.dp, flow)?)
    }

    pub fn global_stats(&self) -> Result<[u64; stat::COUNT], ApiError> {
        Ok(self.lock().dp.global_stats()?)
    }

    /// The declared ring history of every VIP, newest generation first.
    pub fn history(&self) -> Vec<(VipAddr, Vec<Generation>)> {
        self.lock().services.vips().map(|v| (v.spec.vip, v.history().to_vec())).collect()
    }

    /// Makes each VIP's ring history the one given (as another LB host
    /// exported it): every VIP is checked before any changes, so a bad one
    /// changes nothing.
    pub fn import_history(&self, histories: &[(VipAddr, Vec<Generation>)]) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        for (vip, generations) in histories {
            st.services.check_history(vip, generations)?;
        }
        for (vip, generations) in histories.iter().filter(|(_, g)| !g.is_empty()) {
            st.services.import_history(&mut st.dp, vip, generations)?;
            let fingerprints: Vec<String> = generations.iter().map(|g| format!("{:016x}", g.fingerprint)).collect();
            info!(%vip, history = %fingerprints.join(" "), "ring history imported");
        }
        self.save(st);
        Ok(())
    }

    /// Rebuilds a saved state on a fresh program (after a clean stop, a
    /// reboot, or an upgrade across a map-layout change): the VIPs and
    /// backends as one change set, then each VIP's ring history as it was
    /// saved, and the health verdicts, so the rings come out as they were.
    pub fn replay(self: &Arc<Self>, saved: &Saved) -> Result<(), ApiError> {
        use std::sync::atomic::Ordering::Relaxed;
        let checks: BTreeMap<(VipAddr, IpAddr), Checked> =
            saved.checks.iter().map(|(v, a, c)| ((*v, *a), c.clone())).collect();
        let vips = saved.services.vips();
        self.replaying.store(true, Relaxed);
        let applied = self.apply(&desired_of(vips.iter(), &checks), false);
        self.replaying.store(false, Relaxed);
        applied?;
        let mut guard = self.lock();
        let st = &mut *guard;
        for vip in vips.iter().filter(|v| !v.history().is_empty()) {
            if let Err(e) = st.services.import_history(&mut st.dp, &vip.spec.vip, vip.history()) {
                warn!(vip = %vip.spec.vip, error = %e, "the saved ring history is not restored: GUE alternates start afresh");
            }
        }
        for (key, saved_check) in checks {
            let Some(checked) = st.checks.get_mut(&key) else { continue };
            checked.tracker = saved_check.tracker;
            if !checked.tracker.healthy {
                st.services.set_health(&mut st.dp, &key.0, key.1, false)?;
            }
        }
        info!(vips = vips.len(), "saved state replayed");
        self.save(st);
        Ok(())
    }

    /// Stops every health check (shutdown).
    pub fn stop_checks(&self) {
        self.tasks.lock().unwrap().stop_all();
    }

    /// Probe tasks running, and the checks they serve.
    pub fn probe_counts(&self) -> (usize, usize) {
        self.tasks.lock().unwrap().counts()
    }

    /// The 99th percentile of how late probes started, in seconds.
    pub fn probe_lateness_p99(&self) -> f64 {
        self.lateness.lock().unwrap().quantile(0.99)
    }
}

fn current_of(st: &State) -> Desired {
    desired_of(st.services.vips(), &st.checks)
}

/// `vips` and their checks in the desired-state form.
fn desired_of<'a>(vips: impl Iterator<Item = &'a VipState>, checks: &BTreeMap<(VipAddr, IpAddr), Checked>) -> Desired {
    vips.map(|v| {
        let backends = v
            .backends
            .iter()
            .map(|(addr, b)| {
                let check = checks.get(&(v.spec.vip, *addr)).map(|c| c.spec.clone()).unwrap_or_default();
                let server_id = v.spec.quic.and_then(|q| q.by_hand(*addr, b.server_id));
                (*addr, BackendWish { weight: b.weight, drained: b.drained, check, server_id })
            })
            .collect();
        (v.spec.vip, VipWish { spec: v.spec, backends })
    })
    .collect()
}
