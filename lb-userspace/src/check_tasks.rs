//! The tasks that run health checks: one per probe, not one per check. A
//! backend in 50 VIPs, checked the same way in each, is probed once per
//! interval and every one of its checks records the result (as the Maglev
//! paper's health checks do). Data-path checks go through their VIP, so
//! theirs are shared only within it.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use crate::{
    health::{CheckPath, CheckSpec},
    services::VipAddr,
};

/// What one probe task probes: a target, the VIP its packets go through
/// (data-path checks only), and the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeKey {
    pub addr: IpAddr,
    pub through: Option<VipAddr>,
    pub spec: CheckSpec,
}

impl ProbeKey {
    pub fn of(vip: VipAddr, addr: IpAddr, spec: CheckSpec) -> Self {
        let through = (spec.path == CheckPath::Data).then_some(vip);
        ProbeKey { addr, through, spec }
    }
}

/// The VIPs whose check of the probe's target records its results.
pub type Subscribers = Arc<Mutex<BTreeSet<VipAddr>>>;

struct Task {
    probe: ProbeKey,
    subscribers: Subscribers,
    handle: JoinHandle<()>,
}

#[derive(Default)]
pub struct CheckTasks {
    /// Tasks by target (several specs may check one target).
    by_target: HashMap<IpAddr, Vec<Task>>,
}

impl CheckTasks {
    /// Runs the check of `addr` in `vip` with `spec`: it joins the task of
    /// the same probe, or `start` starts one. A check it replaces leaves
    /// its old task first.
    pub fn run(
        &mut self,
        vip: VipAddr,
        addr: IpAddr,
        spec: CheckSpec,
        start: impl FnOnce(&ProbeKey, Subscribers) -> JoinHandle<()>,
    ) {
        self.stop(&vip, addr);
        let probe = ProbeKey::of(vip, addr, spec);
        let tasks = self.by_target.entry(addr).or_default();
        match tasks.iter().find(|t| t.probe == probe) {
            Some(task) => {
                task.subscribers.lock().unwrap().insert(vip);
            }
            None => {
                let subscribers = Arc::new(Mutex::new(BTreeSet::from([vip])));
                let handle = start(&probe, Arc::clone(&subscribers));
                tasks.push(Task { probe, subscribers, handle });
            }
        }
    }

    /// Ends the check of `addr` in `vip`; a task no check records ends.
    pub fn stop(&mut self, vip: &VipAddr, addr: IpAddr) {
        let Some(tasks) = self.by_target.get_mut(&addr) else { return };
        tasks.retain(|task| {
            let mut subscribers = task.subscribers.lock().unwrap();
            subscribers.remove(vip);
            let keep = !subscribers.is_empty();
            if !keep {
                task.handle.abort();
            }
            keep
        });
        if tasks.is_empty() {
            self.by_target.remove(&addr);
        }
    }

    /// Ends every check of `vip`.
    pub fn stop_vip(&mut self, vip: &VipAddr) {
        let targets: Vec<IpAddr> = self.by_target.keys().copied().collect();
        for addr in targets {
            self.stop(vip, addr);
        }
    }

    pub fn stop_all(&mut self) {
        for task in self.by_target.drain().flat_map(|(_, tasks)| tasks) {
            task.handle.abort();
        }
    }

    /// Probe tasks running, and the checks they serve.
    pub fn counts(&self) -> (usize, usize) {
        let tasks = self.by_target.values().flatten();
        (tasks.clone().count(), tasks.map(|t| t.subscribers.lock().unwrap().len()).sum())
    }
}

/// How late probes start against their schedule: the last 65,536
/// samples, for a percentile (thousands of checks on a busy controller are
/// on time or not; an average would hide the late ones).
#[derive(Default)]
pub struct Lateness {
    samples: Vec<f32>,
    next: usize,
}

impl Lateness {
    const KEPT: usize = 65_536;

    pub fn record(&mut self, seconds: f64) {
        if self.samples.len() < Self::KEPT {
            self.samples.push(seconds as f32);
        } else {
            self.samples[self.next] = seconds as f32;
            self.next = (self.next + 1) % Self::KEPT;
        }
    }

    /// The `q` quantile in seconds (0 without samples).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_by(f32::total_cmp);
        let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str, path: CheckPath) -> CheckSpec {
        CheckSpec { probe: crate::health::Probe::parse(text, 80).unwrap(), path, ..CheckSpec::default() }
    }

    #[tokio::test]
    async fn checks_of_one_target_and_spec_share_a_task_until_the_last_one_ends() {
        let mut tasks = CheckTasks::default();
        let vips: Vec<VipAddr> = (0..50).map(|p| format!("203.0.113.10:{}/tcp", 1000 + p).parse().unwrap()).collect();
        let backend: IpAddr = "198.51.100.1".parse().unwrap();
        let started = std::cell::Cell::new(0);
        let start = |_: &ProbeKey, _: Subscribers| {
            started.set(started.get() + 1);
            tokio::spawn(std::future::pending())
        };
        for vip in &vips {
            tasks.run(*vip, backend, spec("tcp", CheckPath::Direct), start);
        }
        assert_eq!(tasks.counts(), (1, 50), "a backend in 50 VIPs is probed once");
        // Another spec, and data-path checks (through their own VIP), are
        // probes of their own.
        tasks.run(vips[0], backend, spec("http://svc.example/healthz", CheckPath::Direct), start);
        tasks.run(vips[1], backend, spec("tcp", CheckPath::Data), start);
        tasks.run(vips[2], backend, spec("tcp", CheckPath::Data), start);
        assert_eq!(tasks.counts(), (4, 50));
        assert_eq!(started.get(), 4);
        for vip in &vips[3..] {
            tasks.stop(vip, backend);
        }
        assert_eq!(tasks.counts(), (3, 3), "the shared task ended with its last check");
        tasks.stop_vip(&vips[0]);
        assert_eq!(tasks.counts(), (2, 2));
        tasks.stop_all();
        assert_eq!(tasks.counts(), (0, 0));
    }

    #[test]
    fn lateness_percentiles_count_the_late_few_and_keep_the_latest_samples() {
        let mut lateness = Lateness::default();
        assert_eq!(lateness.quantile(0.99), 0.0);
        for i in 0..1000 {
            lateness.record(if i % 100 == 0 { 0.5 } else { 0.001 });
        }
        // 10 of 1000 are late: the 99th percentile is on time, the 99.1th not.
        assert!((lateness.quantile(0.99) - 0.001).abs() < 1e-6);
        assert!((lateness.quantile(0.991) - 0.5).abs() < 1e-6);
        for _ in 0..Lateness::KEPT {
            lateness.record(0.002);
        }
        assert!((lateness.quantile(1.0) - 0.002).abs() < 1e-6, "older samples were replaced");
    }
}
