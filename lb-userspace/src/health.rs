//! Health checks: TCP connect, or HTTP(S) GET with hyper (and rustls for
//! TLS), against a backend, every interval (with up to 10% jitter so checks
//! of many backends do not line up), with rise/fall counts so one lost
//! probe does not move flows.

use std::{
    net::IpAddr,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, RootCertStore,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::TlsConnector;

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    None,
    /// TCP connect to this port.
    Tcp {
        port: u16,
    },
    /// HTTP/1.1 GET (over TLS when `tls` is set); healthy if the status is
    /// in `expect`. Redirects are not followed: a 3xx is judged by `expect`.
    Http {
        host: String,
        port: u16,
        path: String,
        #[serde(default)]
        tls: Option<Trust>,
    },
}

/// Which server certificates an HTTPS check accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trust {
    /// Signed by a CA of the system's store (/etc/ssl/certs), for HOST.
    System,
    /// Signed by one of these CAs (PEM), for HOST; or one of these
    /// certificates itself, whatever its name (pinned: a self-signed
    /// backend, even one marked CA:TRUE as `openssl req -x509` makes it).
    Ca(String),
    /// Any certificate: for self-signed backends, by explicit choice.
    Insecure,
}

/// Which way a check's packets go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckPath {
    /// To the backend's own address: tests the server, not the way there.
    #[default]
    Direct,
    /// To the VIP, encapsulated to the backend as the VIP's packets are;
    /// the answer comes straight back from the VIP (DSR). Tests the
    /// backend's decap, its VIP on `lo`, its server and its route back.
    Data,
}

impl std::str::FromStr for CheckPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "direct" => Ok(CheckPath::Direct),
            "data" => Ok(CheckPath::Data),
            other => Err(format!("check path '{other}' is not direct or data")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub probe: Probe,
    #[serde(default)]
    pub path: CheckPath,
    /// The passive signal: SYNs repeated by clients within one interval
    /// that take the backend out (0: off). See [`Tracker::eject`].
    #[serde(default)]
    pub eject_syn_repeats: u32,
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
            path: CheckPath::Direct,
            eject_syn_repeats: 0,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            expect: DEFAULT_EXPECT,
        }
    }
}

impl CheckSpec {
    /// Whether anything is checked: a probe, or the passive signal.
    pub fn runs(&self) -> bool {
        self.probe != Probe::None || self.eject_syn_repeats > 0
    }
}

impl std::fmt::Display for CheckSpec {
    /// The probe, the way it goes, and the passive signal, as `backend list`
    /// shows them: `tcp:80 via VIP, eject at 3 SYN repeats`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.probe)?;
        if self.path == CheckPath::Data && self.probe != Probe::None {
            write!(f, " via VIP")?;
        }
        if self.eject_syn_repeats > 0 {
            write!(f, ", eject at {} SYN repeats", self.eject_syn_repeats)?;
        }
        Ok(())
    }
}

impl Probe {
    /// Parses `none`, `tcp`, `tcp:PORT`, `http://HOST:PORT/PATH` or
    /// `https://HOST:PORT/PATH` (system roots; see [`Probe::with_trust`]).
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
        let (rest, tls, default) = match (text.strip_prefix("http://"), text.strip_prefix("https://")) {
            (Some(rest), _) => (Some(rest), None, 80),
            (_, Some(rest)) => (Some(rest), Some(Trust::System), 443),
            _ => (None, None, 0),
        };
        if let Some(rest) = rest {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                    let port = p.parse::<u16>().map_err(|_| format!("check '{text}': bad port '{p}'"))?;
                    (h.to_string(), port)
                }
                _ => (authority.to_string(), default),
            };
            if host.is_empty() {
                return Err(format!("check '{text}': no host"));
            }
            if tls.is_some() {
                ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']'))
                    .map_err(|_| format!("check '{text}': '{host}' is not a host name or address for TLS"))?;
            }
            return Ok(Probe::Http { host, port, path: path.to_string(), tls });
        }
        Err(format!("check '{text}' is not none, tcp[:PORT], http://HOST:PORT/PATH or https://HOST:PORT/PATH"))
    }

    /// An HTTPS probe that trusts `ca_pem` (PEM CA certificates) or, with
    /// `insecure`, any certificate. Both are refused on other probes.
    pub fn with_trust(self, ca_pem: Option<&str>, insecure: bool) -> Result<Probe, String> {
        if ca_pem.is_none() && !insecure {
            return Ok(self);
        }
        let Probe::Http { host, port, path, tls: Some(_) } = self else {
            return Err("a check CA or an insecure check applies to https:// checks only".into());
        };
        let trust = match (ca_pem, insecure) {
            (Some(_), true) => return Err("give a check CA or choose an insecure check, not both".into()),
            (Some(pem), false) => {
                let roots = parse_ca(pem)?;
                if roots.is_empty() {
                    return Err("the check CA holds no PEM certificate".into());
                }
                Trust::Ca(pem.to_string())
            }
            (None, _) => Trust::Insecure,
        };
        Ok(Probe::Http { host, port, path, tls: Some(trust) })
    }
}

fn parse_ca(pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the check CA is not PEM: {e}"))?;
        roots.add(cert).map_err(|e| format!("the check CA holds a bad certificate: {e}"))?;
    }
    Ok(roots)
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::None => write!(f, "none"),
            Probe::Tcp { port } => write!(f, "tcp:{port}"),
            Probe::Http { host, port, path, tls: None } => write!(f, "http://{host}:{port}{path}"),
            Probe::Http { host, port, path, tls: Some(trust) } => {
                write!(f, "https://{host}:{port}{path}")?;
                match trust {
                    Trust::System => Ok(()),
                    Trust::Ca(_) => write!(f, " (own CA)"),
                    Trust::Insecure => write!(f, " (insecure)"),
                }
            }
        }
    }
}

/// Probes one backend with one check; made once per check, so that TLS
/// roots are loaded and parsed once, not on every probe.
pub struct Prober {
    spec: CheckSpec,
    tls: Option<TlsConnector>,
}

impl Prober {
    pub fn new(spec: &CheckSpec) -> Result<Prober, String> {
        let tls = match &spec.probe {
            Probe::Http { tls: Some(trust), .. } => Some(TlsConnector::from(Arc::new(tls_config(trust)?))),
            _ => None,
        };
        Ok(Prober { spec: spec.clone(), tls })
    }

    /// One probe of `addr`, from a socket marked `mark` if given (a
    /// data-path check: `addr` is the VIP). `Err` says why it failed.
    pub async fn probe(&self, addr: IpAddr, mark: Option<u32>) -> Result<(), String> {
        let spec = &self.spec;
        let work = async {
            match &spec.probe {
                Probe::None => Ok(()),
                Probe::Tcp { port } => connect(addr, *port, mark).await.map(|_| ()),
                Probe::Http { host, port, path, .. } => {
                    let tcp = connect(addr, *port, mark).await?;
                    let authority = if [80, 443].contains(port) { host.clone() } else { format!("{host}:{port}") };
                    match &self.tls {
                        None => http_get(tcp, &authority, path, spec.expect).await,
                        Some(connector) => {
                            let name = ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_string())
                                .map_err(|e| e.to_string())?;
                            let tls = connector.connect(name, tcp).await.map_err(|e| tls_failure(e, host))?;
                            http_get(tls, &authority, path, spec.expect).await
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(spec.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {:?}", spec.timeout)),
        }
    }
}

/// A TCP connection to `addr`:`port`, its packets marked `mark` if given.
async fn connect(addr: IpAddr, port: u16, mark: Option<u32>) -> Result<TcpStream, String> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| e.to_string())?;
    if let Some(mark) = mark {
        use std::os::fd::AsRawFd;
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                &mark as *const u32 as *const libc::c_void,
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(format!("cannot mark the check's socket: {}", std::io::Error::last_os_error()));
        }
    }
    socket.connect((addr, port).into()).await.map_err(|e| e.to_string())
}

/// One HTTP/1.1 GET on `io`: healthy when the response's status is within
/// `expect`. The body is not read; the connection closes when this returns.
async fn http_get<S>(io: S, authority: &str, path: &str, expect: (u16, u16)) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    let request = hyper::Request::get(path)
        .header(HOST, authority)
        .header(USER_AGENT, "lbctl-health")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request for {path}: {e}"))?;
    // The connection is driven here, not spawned, so that the probe's
    // timeout ends it; it may finish first and still have the response.
    let send = sender.send_request(request);
    tokio::pin!(send);
    let response = tokio::select! {
        response = &mut send => response,
        ended = connection => match ended {
            Ok(()) => send.await,
            Err(e) => return Err(format!("HTTP: {e}")),
        },
    };
    let response = response.map_err(|e| format!("HTTP: no response: {e}"))?;
    let status = response.status().as_u16();
    if (expect.0..=expect.1).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's CA store, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| e.to_string()).unwrap_or_else(|| "none found".into());
                return Err(format!("no system CA certificates ({why}): give the check a CA"));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match trust {
        Trust::System => builder.with_root_certificates(system_roots()?).with_no_client_auth(),
        Trust::Ca(pem) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CheckVerifier::ca_or_pinned(pem)?))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CheckVerifier::any_certificate()))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The checks' own certificate rules. `--check-ca FILE`: a certificate
/// signed by a CA in the file, as webpki judges it, or one that is itself
/// in the file, byte for byte (pinned: what curl's --cacert and HAProxy's
/// ca-file also take). `--check-insecure` (no CA): any certificate. The
/// handshake's signatures are checked either way, so it is TLS all the same.
#[derive(Debug)]
struct CheckVerifier {
    pinned: Vec<CertificateDer<'static>>,
    by_ca: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl CheckVerifier {
    fn ca_or_pinned(pem: &str) -> Result<Self, String> {
        let pinned = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the check CA is not PEM: {e}"))?;
        let by_ca = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(parse_ca(pem)?), provider())
            .build()
            .map_err(|e| format!("the check CA: {e}"))?;
        Ok(Self { pinned, by_ca: Some(by_ca), provider: provider() })
    }

    fn any_certificate() -> Self {
        Self { pinned: Vec::new(), by_ca: None, provider: provider() }
    }
}

impl ServerCertVerifier for CheckVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.by_ca {
            Some(by_ca) if !self.pinned.iter().any(|c| c.as_ref() == end_entity.as_ref()) => {
                by_ca.verify_server_cert(end_entity, intermediates, name, ocsp, now)
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a TLS handshake failed, in words that say what to do where the
/// certificate was refused; rustls's own text otherwise.
fn tls_failure(e: std::io::Error, host: &str) -> String {
    use rustls::{CertificateError, OtherError};
    let Some(rustls::Error::InvalidCertificate(refused)) = e.get_ref().and_then(|e| e.downcast_ref()) else {
        return format!("TLS: {e}");
    };
    let advice = match refused {
        CertificateError::UnknownIssuer => {
            "not signed by a trusted CA: give --check-ca the CA that signed it, or the backend's own certificate to \
             pin it"
                .to_string()
        }
        // webpki's error, by name (its crate is not a dependency of ours).
        CertificateError::Other(OtherError(other)) if other.to_string().contains("CaUsedAsEndEntity") => {
            "the backend presents a CA certificate (CA:TRUE, as `openssl req -x509` makes by default): put that very \
             certificate in the --check-ca file to pin it"
                .to_string()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("the certificate is not for '{host}' (the check URL's host): use a name it carries")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the certificate has expired".to_string()
        }
        _ => return format!("TLS: {e}"),
    };
    format!("TLS: invalid peer certificate: {advice}")
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
    /// The passive signal: the backend's SYN-repeat counter at the last
    /// round, passive ejections in a row, and until when the last holds.
    #[serde(skip)]
    syn_repeats_seen: Option<u64>,
    #[serde(skip)]
    ejections: u32,
    #[serde(skip)]
    held_until: Option<Instant>,
}

/// A passive ejection keeps a backend out this long, doubled with each
/// ejection in a row (up to [`EJECT_HOLD_MAX`]): out of the ring it gets
/// no new flows, so the signal goes quiet whether it was repaired or not,
/// and only the hold keeps a dead backend from flapping back in.
pub const EJECT_HOLD: Duration = Duration::from_secs(10);
pub const EJECT_HOLD_MAX: Duration = Duration::from_secs(300);

impl Tracker {
    pub fn new(healthy: bool) -> Self {
        Self { healthy, ..Self::default() }
    }

    /// Records one round: the probe's `result` and, with the passive
    /// signal on, the backend's SYN-repeat counter (`syn_repeats`, its
    /// total). The signal takes an up backend out at once; a hold in force
    /// fails the round; otherwise the probe decides, by rise and fall.
    /// Returns the new verdict if it changed, and the round's result.
    pub fn round(
        &mut self,
        spec: &CheckSpec,
        result: Result<(), String>,
        syn_repeats: u64,
        now: Instant,
    ) -> (Option<bool>, Result<(), String>) {
        match self.passive(spec, syn_repeats, now) {
            Err(why) if self.healthy => {
                self.eject(why.clone(), now);
                (Some(false), Err(why))
            }
            passive => {
                let result = result.and(passive);
                (self.record(spec, &result), result)
            }
        }
    }

    /// The passive signal's verdict on this round, from the backend's
    /// SYN-repeat counter (`syn_repeats`, its total): `eject_syn_repeats`
    /// or more since the last round fail it, and so does a hold in force.
    fn passive(&mut self, spec: &CheckSpec, syn_repeats: u64, now: Instant) -> Result<(), String> {
        let seen = self.syn_repeats_seen.replace(syn_repeats).unwrap_or(syn_repeats);
        if spec.eject_syn_repeats == 0 {
            return Ok(());
        }
        if let Some(left) = self.held_until.filter(|until| *until > now).map(|until| until - now) {
            return Err(format!(
                "ejected by the passive signal ({} in a row): held out for {}s more",
                self.ejections,
                left.as_secs_f64().ceil() as u64
            ));
        }
        let repeated = syn_repeats.saturating_sub(seen);
        if repeated >= spec.eject_syn_repeats as u64 {
            return Err(format!("{repeated} SYNs repeated by clients in one interval: no answers (passive signal)"));
        }
        Ok(())
    }

    /// The passive signal fired: the backend is out at once (the threshold
    /// is its fall: retransmissions come in bursts, seconds apart, so
    /// rounds in a row would rarely all see them). It is held out, twice as
    /// long as last time if the last hold ended less than
    /// [`EJECT_HOLD_MAX`] ago; then probes (if any) bring it back by rise.
    fn eject(&mut self, why: String, now: Instant) {
        let recent = self.held_until.is_some_and(|until| now.saturating_duration_since(until) < EJECT_HOLD_MAX);
        self.ejections = if recent { self.ejections + 1 } else { 1 };
        let hold = EJECT_HOLD.saturating_mul(1 << (self.ejections - 1).min(16)).min(EJECT_HOLD_MAX);
        self.held_until = Some(now + hold);
        self.checks += 1;
        self.failures += 1;
        self.last_error = why;
        self.healthy = false;
        self.streak = 0;
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

/// Where in its interval a check first probes: spread evenly by a hash of
/// what it checks, so thousands of checks started together (at start, or
/// by one `apply`) do not all probe in the same instant.
pub fn phase(interval: Duration, key: &impl std::hash::Hash) -> Duration {
    use std::hash::BuildHasher;
    let hash = xxhash_rust::xxh3::Xxh3DefaultBuilder.hash_one(key);
    interval.mul_f64((hash % 10_000) as f64 / 10_000.0)
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
            Ok(Probe::Http { host: "www.example".into(), port: 8080, path: "/healthz".into(), tls: None })
        );
        assert_eq!(
            Probe::parse("http://www.example", 80),
            Ok(Probe::Http { host: "www.example".into(), port: 80, path: "/".into(), tls: None })
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
    fn first_probes_spread_over_the_interval() {
        let interval = Duration::from_secs(1);
        let mut tenths = [0u32; 10];
        for port in 0..10_000u16 {
            let at = phase(interval, &("198.51.100.34", port));
            assert!(at < interval);
            tenths[(at.as_millis() / 100) as usize] += 1;
        }
        // 1,000 a tenth if even; a herd would put them all in one.
        assert!(tenths.iter().all(|n| (800..1200).contains(n)), "{tenths:?}");
        assert_eq!(phase(interval, &("a", 1)), phase(interval, &("a", 1)), "the same check, the same phase");
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

    #[test]
    fn the_passive_signal_ejects_at_once_holds_and_doubles_the_hold_in_a_row() {
        let spec = CheckSpec { eject_syn_repeats: 5, rise: 2, ..CheckSpec::default() };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Tracker::new(true);
        assert_eq!(t.passive(&spec, 100, at(0)), Ok(()), "the first round only reads the counter");
        assert_eq!(t.passive(&spec, 104, at(1)), Ok(()), "4 repeats: below 5");
        let why = t.passive(&spec, 109, at(2)).unwrap_err();
        assert!(why.starts_with("5 SYNs repeated"), "{why}");
        t.eject(why, at(2));
        assert!(!t.healthy);
        // Held 10 s: quiet rounds (no flows reach it) do not bring it back.
        let held = t.passive(&spec, 109, at(11)).unwrap_err();
        assert!(held.contains("held out for 1s more"), "{held}");
        assert_eq!(t.record(&spec, &Err(held)), None);
        assert_eq!(t.passive(&spec, 109, at(12)), Ok(()));
        assert_eq!(t.record(&spec, &Ok(())), None);
        assert_eq!(t.record(&spec, &Ok(())), Some(true), "back by rise once the hold ended");
        // Out again soon after: held twice as long.
        t.eject("again".into(), at(20));
        assert!(t.passive(&spec, 109, at(39)).unwrap_err().contains("(2 in a row)"));
        assert_eq!(t.passive(&spec, 109, at(40)), Ok(()));
        // Long after the last hold: 10 s again.
        t.eject("much later".into(), at(40 + 301));
        assert!(t.passive(&spec, 109, at(341 + 10)).is_ok());
        // Off: never fails.
        let off = CheckSpec::default();
        let mut t = Tracker::new(true);
        assert_eq!(t.passive(&off, 0, at(0)), Ok(()));
        assert_eq!(t.passive(&off, 1_000_000, at(1)), Ok(()));
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_local_servers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        let http = CheckSpec {
            probe: Probe::Http { host: "x".into(), port, path: "/".into(), tls: None },
            ..CheckSpec::default()
        };
        let probe = |addr: IpAddr, spec: &CheckSpec| {
            let prober = Prober::new(spec).unwrap();
            async move { prober.probe(addr, None).await }
        };
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

    /// A CA named `ca_name` and a certificate it signs for `name`:
    /// (CA PEM, cert DER, key DER).
    fn pki(ca_name: &str, name: &str) -> (String, CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (ca.pem(), cert.der().clone(), key_der)
    }

    #[tokio::test]
    async fn https_probes_check_the_certificate_send_sni_and_do_not_follow_redirects() {
        let (ca, cert, key) = pki("backends' CA", "backend.example");
        let (other_ca, _, _) = pki("another CA", "backend.example");
        let reply = "HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/\r\nContent-Length: 0\r\n\r\n";
        let (port, mut sni_rx) = serve_tls(cert, key, reply).await;
        let url = format!("https://backend.example:{port}/health");
        assert_eq!(https_check(&url, Some(&ca), false, DEFAULT_EXPECT).await, Ok(()), "trusted CA, 302 within 200-399");
        assert_eq!(sni_rx.recv().await.unwrap().as_deref(), Some("backend.example"), "SNI is the check's host");
        assert_eq!(
            https_check(&url, Some(&ca), false, (200, 299)).await,
            Err("HTTP status 302".into()),
            "not followed"
        );
        let wrong = https_check(&url, Some(&other_ca), false, DEFAULT_EXPECT).await.unwrap_err();
        assert!(wrong.starts_with("TLS: ") && wrong.contains("not signed by a trusted CA"), "{wrong}");
        assert_eq!(
            https_check(&url, None, true, DEFAULT_EXPECT).await,
            Ok(()),
            "insecure takes a certificate of any CA"
        );
        // Trust options only make sense for https, and not both at once.
        assert!(Probe::parse("http://x/", 80).unwrap().with_trust(None, true).is_err());
        assert!(Probe::parse("https://x/", 80).unwrap().with_trust(Some(&ca), true).is_err());
        assert!(Probe::parse("https://x/", 80).unwrap().with_trust(Some("not pem"), false).is_err());
        assert_eq!(Probe::parse("https://x/", 80).unwrap().to_string(), "https://x:443/");
    }

    /// Serves TLS with `cert` and `key` on a local port, answering `reply`
    /// to any request; returns the port and the SNI of each handshake.
    async fn serve_tls(
        cert: CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        reply: &'static str,
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Option<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sni_tx, sni_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let _ = sni_tx.send(tls.get_ref().1.server_name().map(str::to_string));
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        (port, sni_rx)
    }

    /// An HTTPS check of `url` on 127.0.0.1 trusting `ca_pem` (or, with
    /// `insecure`, anything), healthy on `expect`.
    async fn https_check(url: &str, ca_pem: Option<&str>, insecure: bool, expect: (u16, u16)) -> Result<(), String> {
        let probe = Probe::parse(url, 443).unwrap().with_trust(ca_pem, insecure).unwrap();
        let prober = Prober::new(&CheckSpec { probe, expect, ..CheckSpec::default() }).unwrap();
        prober.probe("127.0.0.1".parse().unwrap(), None).await
    }

    const OK_200: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    #[tokio::test]
    async fn a_self_signed_ca_certificate_in_the_check_ca_file_is_pinned_and_refusals_say_what_to_do() {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        // As `openssl req -x509` makes it: self-signed, CA:TRUE, for its name.
        let self_signed = |name: &str| {
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), cert.der().clone(), rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        };
        let (pem, cert, key) = self_signed("backend.example");
        let (other_pem, _, _) = self_signed("backend.example");
        let (port, _) = serve_tls(cert, key, OK_200).await;
        let check = |host: &str, ca: &str| {
            let url = format!("https://{host}:{port}/");
            let ca = ca.to_string();
            async move { https_check(&url, Some(&ca), false, DEFAULT_EXPECT).await }
        };
        assert_eq!(check("backend.example", &pem).await, Ok(()), "the file holds that very certificate");
        // Pinned means its bytes, whatever name the check uses.
        assert_eq!(check("other.example", &pem).await, Ok(()));
        // Among other certificates in the file too.
        assert_eq!(check("backend.example", &format!("{other_pem}{pem}")).await, Ok(()));
        // Another self-signed certificate in the file: refused, saying how to pin.
        let refused = check("backend.example", &other_pem).await.unwrap_err();
        assert!(refused.starts_with("TLS: invalid peer certificate: ") && refused.contains("to pin it"), "{refused}");
        // A certificate signed by the file's CA but for another name.
        let (ca, cert, key) = pki("backends' CA", "backend.example");
        let (port2, _) = serve_tls(cert, key, OK_200).await;
        let url = format!("https://elsewhere.example:{port2}/");
        let refused = https_check(&url, Some(&ca), false, DEFAULT_EXPECT).await.unwrap_err();
        assert!(refused.contains("not for 'elsewhere.example'"), "{refused}");
    }
}
