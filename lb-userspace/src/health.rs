//! Health checks: TCP connect or HTTP GET against a backend, every interval
//! (with up to 10% jitter so checks of many backends do not line up), with
//! rise/fall counts so one lost probe does not move flows.

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    None,
    /// TCP connect to this port.
    Tcp {
        port: u16,
    },
    /// HTTP/1.1 GET; healthy if the status is in `expect`.
    Http {
        host: String,
        port: u16,
        path: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// HTTP statuses that count as healthy (inclusive).
    pub expect: (u16, u16),
}

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Healthy HTTP statuses unless set: success and redirection (RFC 9110 15).
pub const DEFAULT_EXPECT: (u16, u16) = (200, 399);

/// Parses `200-299` or `204` into an inclusive range.
pub fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c));
    match (parse(lo), parse(hi)) {
        (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
        _ => Err(format!("expected status '{text}' is not a status or range within 100-599, like 200-299")),
    }
}

impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            probe: Probe::None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            expect: DEFAULT_EXPECT,
        }
    }
}

impl Probe {
    /// Parses `none`, `tcp`, `tcp:PORT` or `http://HOST:PORT/PATH`.
    /// `default_port` (the VIP's port) is used by a bare `tcp`.
    pub fn parse(text: &str, default_port: u16) -> Result<Probe, String> {
        let text = text.trim();
        if text.is_empty() || text == "none" {
            return Ok(Probe::None);
        }
        if text == "tcp" {
            if default_port == 0 {
                return Err("check 'tcp' needs a port on a port-0 VIP: write tcp:PORT".into());
            }
            return Ok(Probe::Tcp { port: default_port });
        }
        if let Some(port) = text.strip_prefix("tcp:") {
            let port = port.parse::<u16>().ok().filter(|p| *p != 0);
            return port.map(|port| Probe::Tcp { port }).ok_or_else(|| format!("check '{text}': port is not 1-65535"));
        }
        if let Some(rest) = text.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                    let port = p.parse::<u16>().map_err(|_| format!("check '{text}': bad port '{p}'"))?;
                    (h.to_string(), port)
                }
                _ => (authority.to_string(), 80),
            };
            if host.is_empty() {
                return Err(format!("check '{text}': no host"));
            }
            return Ok(Probe::Http { host, port, path: path.to_string() });
        }
        Err(format!("check '{text}' is not none, tcp[:PORT] or http://HOST:PORT/PATH"))
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::None => write!(f, "none"),
            Probe::Tcp { port } => write!(f, "tcp:{port}"),
            Probe::Http { host, port, path } => write!(f, "http://{host}:{port}{path}"),
        }
    }
}

/// One probe of `addr`. `Err` says why it failed.
pub async fn probe(addr: IpAddr, spec: &CheckSpec) -> Result<(), String> {
    let work = async {
        match &spec.probe {
            Probe::None => Ok(()),
            Probe::Tcp { port } => TcpStream::connect((addr, *port)).await.map(|_| ()).map_err(|e| e.to_string()),
            Probe::Http { host, port, path } => http_get(addr, *port, host, path, spec.expect).await,
        }
    };
    match tokio::time::timeout(spec.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {:?}", spec.timeout)),
    }
}

/// Minimal HTTP/1.1 GET: healthy when the status is within `expect`.
async fn http_get(addr: IpAddr, port: u16, host: &str, path: &str, expect: (u16, u16)) -> Result<(), String> {
    let mut stream = TcpStream::connect((addr, port)).await.map_err(|e| e.to_string())?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbctl-health\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = stream.read(&mut head[got..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = String::from_utf8_lossy(&head[..got]);
    let status: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", line.lines().next().unwrap_or("")))?;
    if (expect.0..=expect.1).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

/// Upper bounds of the probe-latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 8] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0];

/// Probe latencies, as a Prometheus histogram wants them.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound of [`LATENCY_BUCKETS`] (cumulative).
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&mut self.buckets) {
            if seconds <= *bound {
                *n += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// Rise/fall bookkeeping of one backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tracker {
    pub healthy: bool,
    streak: u32,
    pub checks: u64,
    pub failures: u64,
    pub last_error: String,
    /// Not saved: it starts again with the process, as counters do.
    #[serde(skip)]
    pub latency: Histogram,
}

impl Tracker {
    pub fn new(healthy: bool) -> Self {
        Self { healthy, ..Self::default() }
    }

    /// Records one result; returns the new verdict if it changed.
    pub fn record(&mut self, spec: &CheckSpec, result: &Result<(), String>) -> Option<bool> {
        self.checks += 1;
        let ok = result.is_ok();
        if let Err(e) = result {
            self.failures += 1;
            self.last_error = e.clone();
        }
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { spec.rise } else { spec.fall };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Up to 10% of the interval, from a cheap per-call source.
pub fn jitter(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    interval.mul_f64((nanos % 1000) as f64 / 10_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_and_bad_ones_say_why() {
        assert_eq!(Probe::parse("none", 80), Ok(Probe::None));
        assert_eq!(Probe::parse("tcp", 80), Ok(Probe::Tcp { port: 80 }));
        assert_eq!(Probe::parse("tcp:8080", 80), Ok(Probe::Tcp { port: 8080 }));
        assert!(Probe::parse("tcp", 0).unwrap_err().contains("port-0"));
        assert!(Probe::parse("tcp:0", 80).is_err());
        assert_eq!(
            Probe::parse("http://www.example:8080/healthz", 80),
            Ok(Probe::Http { host: "www.example".into(), port: 8080, path: "/healthz".into() })
        );
        assert_eq!(
            Probe::parse("http://www.example", 80),
            Ok(Probe::Http { host: "www.example".into(), port: 80, path: "/".into() })
        );
        assert!(Probe::parse("udp:53", 80).unwrap_err().contains("udp:53"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for s in [0.0005, 0.003, 0.003, 1.0, 5.0] {
            h.observe(s);
        }
        assert_eq!(h.buckets, [1, 1, 3, 3, 3, 3, 3, 4]);
        assert_eq!(h.count, 5);
        assert!((h.sum - 6.0065).abs() < 1e-9);
    }

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200-299"), Ok((200, 299)));
        assert_eq!(parse_status_range("204"), Ok((204, 204)));
        assert!(parse_status_range("299-200").is_err());
        assert!(parse_status_range("2xx").is_err());
        assert!(parse_status_range("600").is_err());
    }

    #[test]
    fn rise_and_fall_need_streaks() {
        let spec = CheckSpec { rise: 2, fall: 3, ..CheckSpec::default() };
        let mut t = Tracker::new(true);
        let fail = Err("refused".to_string());
        assert_eq!(t.record(&spec, &fail), None);
        assert_eq!(t.record(&spec, &fail), None);
        assert_eq!(t.record(&spec, &Ok(())), None, "a success breaks the streak");
        assert_eq!(t.record(&spec, &fail), None);
        assert_eq!(t.record(&spec, &fail), None);
        assert_eq!(t.record(&spec, &fail), Some(false));
        assert_eq!(t.record(&spec, &Ok(())), None);
        assert_eq!(t.record(&spec, &Ok(())), Some(true));
        assert_eq!((t.checks, t.failures, t.last_error.as_str()), (8, 5, "refused"));
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_local_servers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let status = if n == 0 { "200 OK" } else { "503 Service Unavailable" };
                n += 1;
                let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        let http =
            CheckSpec { probe: Probe::Http { host: "x".into(), port, path: "/".into() }, ..CheckSpec::default() };
        assert_eq!(probe(localhost, &http).await, Ok(()));
        assert_eq!(probe(localhost, &http).await, Err("HTTP status 503".into()));
        let expect_503 = CheckSpec { expect: (503, 503), ..http.clone() };
        assert_eq!(probe(localhost, &expect_503).await, Ok(()));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tcp = CheckSpec { probe: Probe::Tcp { port: closed }, ..CheckSpec::default() };
        assert!(probe(localhost, &tcp).await.unwrap_err().contains("refused"));
    }
}
