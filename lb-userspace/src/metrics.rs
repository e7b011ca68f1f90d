//! Prometheus metrics at `/metrics`, served by `lbctl up --metrics ADDR:PORT`
//! over hyper. The exposition is written by the Prometheus project's client
//! (`prometheus-client`): OpenMetrics 1.0 when the scraper asks for it,
//! else the text format 0.0.4. Counters are read from the data plane's
//! per-CPU maps at scrape time and summed over CPUs.
//!
//! The server must never be the reason the controller runs out of file
//! descriptors (its health checks and API need them too): it holds at most
//! [`MAX_CONNECTIONS`] connections, closing the one open the longest to
//! make room; a client has [`HEADER_READ_TIMEOUT`] to send its request
//! headers; an accept error is logged and retried, never fatal.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{ACCEPT, ALLOW, CONTENT_TYPE},
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_common::stat;
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, text, DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore, task::AbortHandle};
use tracing::{debug, info, warn};

use crate::{
    controller::{ApiError, Controller},
    health::LATENCY_BUCKETS,
};

/// Connections served at once; a scrape takes one for milliseconds.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a complete request head (and, on a kept-alive
/// connection, the next one): idle and byte-a-second clients are closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (EMFILE, ENFILE, ENOBUFS): the condition
/// usually passes once other connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctrl: Arc<Controller>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Open connections, oldest first (the accept loop alone touches it).
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    let mut accept_errors = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_errors += 1;
                // One line per burst, not one per failed accept.
                if accept_errors.is_power_of_two() {
                    warn!(error = %e, count = accept_errors, "metrics: cannot accept a connection; retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        open.retain(|h| !h.is_finished());
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: the oldest connection is the likeliest idle one.
                if let Some(oldest) = open.pop_front() {
                    oldest.abort();
                }
                Arc::clone(&slots).acquire_owned().await.expect("the semaphore is never closed")
            }
        };
        let ctrl = Arc::clone(&ctrl);
        let service = service_fn(move |req| {
            let ctrl = Arc::clone(&ctrl);
            async move { Ok::<_, Infallible>(respond(&ctrl, &req)) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let task = tokio::spawn(async move {
            let _slot = permit;
            if let Err(e) = connection.await {
                debug!(error = %e, "metrics connection ended");
            }
        });
        open.push_back(task.abort_handle());
    }
}

fn respond(ctrl: &Controller, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD\n".into());
        r.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("a valid header"));
        return r;
    }
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let format = Format::negotiate(accept);
    match render(ctrl, format) {
        // HEAD: hyper sends the headers (length included) without the body.
        Ok(body) => reply(StatusCode::OK, format.content_type(), body),
        Err(e) => {
            warn!(error = %e, "cannot render metrics");
            reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n"))
        }
    }
}

/// The two text expositions a scraper may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: what any scraper reads.
    Text004,
    /// OpenMetrics 1.0 text: sent when the Accept header asks for it.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics if the Accept header lists it with a non-zero quality
    /// (RFC 9110 12.5.1), otherwise the 0.0.4 text format.
    pub fn negotiate(accept: &str) -> Format {
        let wants_openmetrics = accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0));
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text004 => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

/// The exposition of everything the controller knows, in `format`.
pub fn render(ctrl: &Controller, format: Format) -> Result<String, ApiError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(ctrl)?));
    let mut out = String::new();
    let written = match format {
        Format::Text004 => prometheus_text::encode(&mut out, &registry),
        Format::OpenMetrics => text::encode(&mut out, &registry),
    };
    written.expect("writing to a String cannot fail");
    Ok(out)
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
enum Value {
    Counter(u64),
    Seconds(f64),
    Gauge(i64),
    /// Sum, count, and per-bucket counts (not cumulative) by upper bound.
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// One metric family: name (counters without `_total`, which the encoder
/// adds), help, type and its samples.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// The values of one scrape, read under the controller's lock and encoded
/// after it is released.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

fn counter(name: &'static str, help: &'static str) -> Family {
    Family { name, help, kind: MetricType::Counter, samples: Vec::new() }
}

fn gauge(name: &'static str, help: &'static str) -> Family {
    Family { name, help, kind: MetricType::Gauge, samples: Vec::new() }
}

fn snapshot(ctrl: &Controller) -> Result<Snapshot, ApiError> {
    let mut guard = ctrl.lock();
    let st = &mut *guard;
    let global = st.dp.global_stats()?;

    let mut packets = counter("lb_packets", "Packets seen by the XDP program, by outcome.");
    for (i, name) in stat::NAMES.iter().enumerate().take(stat::OUTCOMES) {
        packets.samples.push((vec![("outcome", name.to_string())], Value::Counter(global[i])));
    }
    let mut lookups = counter("lb_conn_lookups", "VIP packets by conn-table result (hit: known flow).");
    lookups.samples.push((vec![("result", "hit".into())], Value::Counter(global[stat::CONN_HIT])));
    lookups.samples.push((vec![("result", "miss".into())], Value::Counter(global[stat::CONN_MISS])));
    let mut untracked = counter("lb_new_flows_untracked", "New flows not remembered: SYN-flood guard over its rate.");
    untracked.samples.push((vec![], Value::Counter(global[stat::CONN_UNTRACKED])));
    let mut alternates =
        counter("lb_gue_alternate", "GUE packets sent with alternate hops (the ring history's backends).");
    alternates.samples.push((vec![], Value::Counter(global[stat::GUE_ALTERNATE])));
    let (entries, capacity) = st.dp.conn_count()?;
    let mut conn_entries = gauge("lb_conn_table_entries", "Flows in the conn table.");
    conn_entries.samples.push((vec![], Value::Gauge(entries as i64)));
    let mut conn_capacity =
        gauge("lb_conn_table_capacity", "Conn-table size (flows; a full bucket of 4 evicts its least recently used).");
    conn_capacity.samples.push((vec![], Value::Gauge(capacity as i64)));

    let mut vip_packets = counter("lb_vip_packets", "Packets for a VIP.");
    let mut vip_bytes = counter("lb_vip_bytes", "Bytes (IP packet length) for a VIP.");
    let mut vip_new_flows = counter("lb_vip_new_flows", "Flows balanced by the VIP's Maglev ring.");
    let mut vip_fail_open =
        gauge("lb_vip_fail_open", "1 when every backend is down and the VIP serves with all of them.");
    let mut vip_ring = gauge(
        "lb_vip_ring_info",
        "1, labelled with the live ring's fingerprint: equal on LB hosts whose rings are equal.",
    );
    let mut vip_history = gauge(
        "lb_vip_history_info",
        "1, labelled with the ring history's fingerprints, newest first: equal on LB hosts that name the same GUE \
         alternates.",
    );
    let mut be_packets = counter("lb_backend_packets", "Packets forwarded to a backend.");
    let mut be_bytes = counter("lb_backend_bytes", "Bytes (inner IP length) forwarded to a backend.");
    let mut be_syn_repeats = counter(
        "lb_backend_syn_repeats",
        "SYNs of flows already sent to this backend (no SYN-ACK reached the client): conntrack VIPs.",
    );
    let mut be_up = gauge("lb_backend_up", "Health-check verdict: 1 up (or unchecked), 0 down.");
    let mut be_in_ring = gauge("lb_backend_in_ring", "1 when the backend takes new flows.");
    let vips: Vec<_> = st.services.vips().cloned().collect();
    for v in &vips {
        let vip = vec![("vip", v.spec.vip.to_string())];
        let s = st.dp.vip_stats(v.id)?;
        vip_packets.samples.push((vip.clone(), Value::Counter(s.packets)));
        vip_bytes.samples.push((vip.clone(), Value::Counter(s.bytes)));
        vip_new_flows.samples.push((vip.clone(), Value::Counter(s.new_flows)));
        vip_fail_open.samples.push((vip.clone(), Value::Gauge(v.fail_open as i64)));
        let fingerprint = vec![vip[0].clone(), ("fingerprint", crate::api::fingerprint_text(v.fingerprint))];
        vip_ring.samples.push((fingerprint, Value::Gauge(1)));
        let history: Vec<String> = v.history().iter().map(|g| crate::api::fingerprint_text(g.fingerprint)).collect();
        vip_history.samples.push((vec![vip[0].clone(), ("history", history.join(","))], Value::Gauge(1)));
        for (addr, b) in &v.backends {
            let labels = vec![("vip", v.spec.vip.to_string()), ("backend", addr.to_string())];
            let s = st.dp.backend_stats(b.id)?;
            let up = st.checks.get(&(v.spec.vip, *addr)).map(|c| c.tracker.healthy).unwrap_or(true);
            be_packets.samples.push((labels.clone(), Value::Counter(s.packets)));
            be_bytes.samples.push((labels.clone(), Value::Counter(s.bytes)));
            be_syn_repeats.samples.push((labels.clone(), Value::Counter(s.syn_repeats)));
            be_up.samples.push((labels.clone(), Value::Gauge(up as i64)));
            be_in_ring.samples.push((labels, Value::Gauge(v.in_ring(b) as i64)));
        }
    }

    let mut latency = Family {
        name: "lb_health_check_duration_seconds",
        help: "Health-check probe latency.",
        kind: MetricType::Histogram,
        samples: Vec::new(),
    };
    let mut failures = counter("lb_health_check_failures", "Failed health-check probes.");
    for ((vip, addr), c) in &st.checks {
        let labels = vec![("vip", vip.to_string()), ("backend", addr.to_string())];
        let h = &c.tracker.latency;
        // The encoder adds up per-bucket counts; ours are cumulative.
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .zip(h.buckets)
            .map(|(bound, cumulative)| (*bound, cumulative - std::mem::replace(&mut below, cumulative)))
            .collect();
        buckets.push((f64::INFINITY, h.count - below));
        latency.samples.push((labels.clone(), Value::Histogram(h.sum, h.count, buckets)));
        failures.samples.push((labels, Value::Counter(c.tracker.failures)));
    }

    let mut swaps = counter("lb_ring_swaps", "Maglev rings built and made live.");
    swaps.samples.push((vec![], Value::Counter(st.services.ring_swaps)));
    let mut swap_time = counter("lb_ring_swap_duration_seconds", "Time spent building and swapping rings.");
    swap_time.samples.push((vec![], Value::Seconds(st.services.ring_swap_seconds)));
    let mut build = gauge("lb_build_info", "The controller's version and interface.");
    build.samples.push((
        vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("interface", ctrl.info.interface.clone()),
            ("xdp_mode", ctrl.info.xdp_mode.clone()),
        ],
        Value::Gauge(1),
    ));
    let mut announced =
        gauge("lb_route_announced", "1 for each VIP address whose route is in the announce table (--announce-table).");
    let mut maintenance = gauge("lb_announce_maintenance", "1 while `lbctl announce withdraw` is in force.");
    if let Some(a) = &ctrl.announcer {
        let state = a.state();
        for addr in &state.announced {
            announced.samples.push((vec![("address", addr.to_string())], Value::Gauge(1)));
        }
        maintenance.samples.push((vec![], Value::Gauge(state.maintenance as i64)));
    }
    Ok(Snapshot(vec![
        announced,
        maintenance,
        packets,
        lookups,
        untracked,
        alternates,
        conn_entries,
        conn_capacity,
        vip_packets,
        vip_bytes,
        vip_new_flows,
        vip_fail_open,
        vip_ring,
        vip_history,
        be_packets,
        be_bytes,
        be_syn_repeats,
        be_up,
        be_in_ring,
        latency,
        failures,
        swaps,
        swap_time,
        build,
    ]))
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            for (labels, value) in &f.samples {
                let sample = metric.encode_family(labels)?;
                match value {
                    Value::Counter(n) => ConstCounter::new(*n).encode(sample)?,
                    Value::Seconds(s) => ConstCounter::new(*s).encode(sample)?,
                    Value::Gauge(n) => ConstGauge::new(*n).encode(sample)?,
                    Value::Histogram(sum, count, buckets) => {
                        let mut sample = sample;
                        sample.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;\
                          q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(prometheus), Format::OpenMetrics);
        assert_eq!(Format::negotiate(""), Format::Text004);
        assert_eq!(Format::negotiate("*/*"), Format::Text004);
        assert_eq!(Format::negotiate("text/plain; version=0.0.4"), Format::Text004);
        assert_eq!(Format::negotiate("application/openmetrics-text; q=0, text/plain"), Format::Text004);
        assert_eq!(Format::negotiate("Application/OpenMetrics-Text"), Format::OpenMetrics);
    }

    #[test]
    fn families_encode_in_both_formats() {
        let mut swaps = counter("lb_ring_swaps", "Rings.");
        swaps.samples.push((vec![], Value::Counter(3)));
        let mut latency =
            Family { kind: MetricType::Histogram, ..counter("lb_health_check_duration_seconds", "Latency.") };
        let buckets = vec![(0.001, 1), (0.01, 2), (f64::INFINITY, 1)];
        latency.samples.push((vec![("backend", "198.51.100.18".into())], Value::Histogram(0.5, 4, buckets)));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot(vec![swaps, latency])));
        let mut old = String::new();
        prometheus_text::encode(&mut old, &registry).unwrap();
        assert_eq!(
            old,
            "# HELP lb_ring_swaps_total Rings.\n# TYPE lb_ring_swaps_total counter\nlb_ring_swaps_total 3\n\
             # HELP lb_health_check_duration_seconds Latency.\n# TYPE lb_health_check_duration_seconds histogram\n\
             lb_health_check_duration_seconds_bucket{backend=\"198.51.100.18\",le=\"0.001\"} 1\n\
             lb_health_check_duration_seconds_bucket{backend=\"198.51.100.18\",le=\"0.01\"} 3\n\
             lb_health_check_duration_seconds_bucket{backend=\"198.51.100.18\",le=\"+Inf\"} 4\n\
             lb_health_check_duration_seconds_sum{backend=\"198.51.100.18\"} 0.5\n\
             lb_health_check_duration_seconds_count{backend=\"198.51.100.18\"} 4\n"
        );
        let mut open = String::new();
        text::encode(&mut open, &registry).unwrap();
        assert!(open.starts_with("# HELP lb_ring_swaps Rings.\n# TYPE lb_ring_swaps counter\nlb_ring_swaps_total 3\n"));
        assert!(open.ends_with("# EOF\n"), "{open}");
    }
}
