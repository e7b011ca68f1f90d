//! Declarative desired state: the TOML file of `lbctl up --config` and
//! `lbctl apply -f`, its validation (errors name the line), and the plan of
//! changes that brings a running state to it.
//!
//! ```toml
//! [[vip]]
//! vip = "203.0.113.10:80/tcp"   # ADDR:PORT/PROTO, [IPv6]:PORT/PROTO; port 0 = all
//! hash = "5tuple"               # or "src-ip"; optional
//! ring_size = 65537             # a prime; optional
//! encap = "gue"                 # or "ipip" (default)
//! stateless = true              # never use the conn table; optional
//! check_path = "data"           # default of its backends' check_path
//!
//! [[vip.backend]]
//! address = "198.51.100.1"
//! weight = 1                    # 0..=10000; optional, default 1
//! drained = false               # optional
//! check = "tcp:80"              # none | tcp[:PORT] | http(s)://HOST:PORT/PATH
//! interval = "2s"               # optional check timing
//! timeout = "1s"
//! rise = 2
//! fall = 3
//! expect_status = "200-399"     # HTTP checks: healthy statuses
//! check_ca = "/etc/lbctl/backend-ca.pem"  # https checks: CA file (default: system CAs)
//! check_insecure = false        # https checks: take any certificate
//! check_path = "data"           # "direct" (default): to the backend's own
//!                               # address; "data": to the VIP, encapsulated
//!                               # as its packets are (the answer comes by DSR)
//! eject_syn_repeats = 20        # passive signal: this many client SYN repeats
//!                               # in one interval take the backend out (0: off)
//!
//! [announce]                    # lbctl up --config only, read at start
//! table = 100                   # as --announce-table (the flag wins)
//! drain_time = "5s"             # as --drain-time
//! ```

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use lb_common::DEFAULT_RING_SIZE;
use serde::Deserialize;
use toml::Spanned;

use crate::{
    health::{self, CheckPath, CheckSpec, Probe},
    quic::{QuicSpec, ServerId},
    services::{check_ring_size, HashMode, VipAddr, VipSpec, MAX_WEIGHT},
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    vip: Vec<VipEntry>,
    announce: Option<AnnounceEntry>,
}

/// `[announce]`: read by `lbctl up --config` at start (the flags win).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnnounceEntry {
    table: Option<Spanned<u32>>,
    drain_time: Option<Spanned<String>>,
}

/// The `[announce]` settings of a config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnnounceSettings {
    pub table: Option<u32>,
    pub drain_time: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VipEntry {
    vip: Spanned<String>,
    hash: Option<Spanned<String>>,
    ring_size: Option<Spanned<u32>>,
    encap: Option<Spanned<String>>,
    #[serde(default)]
    stateless: bool,
    quic: Option<Spanned<QuicEntry>>,
    check_path: Option<Spanned<String>>,
    #[serde(default)]
    backend: Vec<BackendEntry>,
}

/// `quic = true`, or `quic = { config_id = 1, server_id_len = 3, nonce_len = 8 }`
/// (what is left out takes its default).
#[derive(Deserialize)]
#[serde(untagged)]
enum QuicEntry {
    On(bool),
    Config(QuicFields),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuicFields {
    config_id: Option<u8>,
    server_id_len: Option<u8>,
    nonce_len: Option<u8>,
}

impl QuicEntry {
    fn spec(&self) -> Option<QuicSpec> {
        let default = QuicSpec::default();
        match self {
            QuicEntry::On(on) => on.then_some(default),
            QuicEntry::Config(c) => Some(QuicSpec {
                config_id: c.config_id.unwrap_or(default.config_id),
                server_id_len: c.server_id_len.unwrap_or(default.server_id_len),
                nonce_len: c.nonce_len.unwrap_or(default.nonce_len),
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    drained: Option<bool>,
    check: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<u32>,
    fall: Option<u32>,
    expect_status: Option<Spanned<String>>,
    check_ca: Option<Spanned<String>>,
    #[serde(default)]
    check_insecure: bool,
    check_path: Option<Spanned<String>>,
    eject_syn_repeats: Option<u32>,
    server_id: Option<Spanned<String>>,
}

/// A backend as the operator wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendWish {
    pub weight: u32,
    pub drained: bool,
    pub check: CheckSpec,
    /// A QUIC VIP's server ID given by hand (see [`QuicSpec::by_hand`]).
    pub server_id: Option<ServerId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipWish {
    pub spec: VipSpec,
    pub backends: BTreeMap<IpAddr, BackendWish>,
}

pub type Desired = BTreeMap<VipAddr, VipWish>;

/// `line N` of a span of `text`.
fn line_of(text: &str, span: std::ops::Range<usize>) -> String {
    format!("line {}", text[..span.start.min(text.len())].lines().count().max(1))
}

/// The `[announce]` section of a config file, validated.
pub fn parse_announce(text: &str) -> Result<AnnounceSettings, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
    let Some(a) = file.announce else { return Ok(AnnounceSettings::default()) };
    if let Some(t) = &a.table {
        if !(1..=0xffff_fffe).contains(t.get_ref()) {
            return Err(format!(
                "{}: announce table {} is out of range 1..=4294967294",
                line_of(text, t.span()),
                t.get_ref()
            ));
        }
    }
    let drain_time = match &a.drain_time {
        None => None,
        Some(d) => Some(
            humantime::parse_duration(d.get_ref())
                .map_err(|e| format!("{}: drain_time '{}': {e}", line_of(text, d.span()), d.get_ref()))?,
        ),
    };
    Ok(AnnounceSettings { table: a.table.map(|t| *t.get_ref()), drain_time })
}

/// Parses and validates a desired-state file. Errors say `line N: ...`.
/// A large file is parsed in parts, one per core (the TOML parser takes
/// 100 ms for 512 VIPs x 100 backends); on any error the whole file is
/// parsed again, so that the message is the one a single parse gives.
pub fn parse(text: &str) -> Result<Desired, String> {
    let parts = parts_of(text, std::thread::available_parallelism().map_or(1, |n| n.get()));
    if parts.len() > 1 {
        let parsed: Vec<Result<Desired, String>> = std::thread::scope(|scope| {
            let workers: Vec<_> =
                parts.iter().map(|&(offset, part)| scope.spawn(move || parse_part(text, offset, part))).collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("parser panicked".into()))).collect()
        });
        let mut desired = Desired::new();
        let mut whole = true;
        for part in parsed {
            match part {
                Ok(vips) => {
                    let count = desired.len() + vips.len();
                    desired.extend(vips);
                    whole &= desired.len() == count;
                }
                Err(_) => whole = false,
            }
        }
        if whole {
            return Ok(desired);
        }
    }
    parse_part(text, 0, text)
}

/// Where a desired-state file may be cut into `n` parts that parse alone:
/// before a `[[vip]]` line at the start of a line. Files with multi-line
/// strings (where such a line could be text) and small ones stay whole.
fn parts_of(text: &str, n: usize) -> Vec<(usize, &str)> {
    const SMALL: usize = 64 * 1024;
    if n < 2 || text.len() < SMALL || text.contains("\"\"\"") || text.contains("'''") {
        return vec![(0, text)];
    }
    let mut cuts = vec![0];
    for i in 1..n {
        let from = (text.len() * i / n).max(*cuts.last().unwrap());
        match text[from..].find("\n[[vip]]") {
            Some(at) => cuts.push(from + at + 1),
            None => break,
        }
    }
    cuts.dedup();
    cuts.push(text.len());
    cuts.windows(2).map(|w| (w[0], &text[w[0]..w[1]])).collect()
}

/// Parses `part`, found at `offset` in `text` (lines count in `text`).
fn parse_part(text: &str, offset: usize, part: &str) -> Result<Desired, String> {
    let file: File = toml::from_str(part).map_err(|e| e.to_string().trim_end().to_string())?;
    let at = |span: std::ops::Range<usize>| line_of(text, span.start + offset..span.end + offset);
    let mut desired = Desired::new();
    for entry in file.vip {
        let hash = entry.hash.as_ref().map(|h| h.get_ref().as_str()).unwrap_or("");
        let ring_size = entry.ring_size.as_ref().map(|r| *r.get_ref()).unwrap_or(0);
        if let Some(r) = &entry.ring_size {
            check_ring_size(*r.get_ref()).map_err(|e| format!("{}: {e}", at(r.span())))?;
        }
        if let Some(e) = &entry.encap {
            e.get_ref().parse::<crate::services::Encap>().map_err(|err| format!("{}: {err}", at(e.span())))?;
        }
        let encap = entry.encap.as_ref().map(|e| e.get_ref().as_str()).unwrap_or("");
        let quic = entry.quic.as_ref().and_then(|q| q.get_ref().spec());
        let spec = vip_spec(entry.vip.get_ref(), hash, ring_size, encap, entry.stateless, quic).map_err(|e| {
            let span = entry.quic.as_ref().filter(|_| e.contains("QUIC")).map_or(entry.vip.span(), |q| q.span());
            format!("{}: {e}", at(span))
        })?;
        let mut backends = BTreeMap::new();
        for b in entry.backend {
            // The VIP's check_path is the default of its checked backends.
            let path = b.check_path.as_ref().or(entry.check_path.as_ref().filter(|_| b.check.is_some()));
            // Counted only for an error: counting lines for every backend
            // of a large file would cost more than the rest of the parse.
            let line = || at(b.address.span());
            // The CA file is read here, so that the plan, the state file and
            // every LB host carry the certificates themselves.
            let ca_pem = match &b.check_ca {
                None => None,
                Some(path) => Some(
                    std::fs::read_to_string(path.get_ref())
                        .map_err(|e| format!("{}: cannot read check_ca {}: {e}", at(path.span()), path.get_ref()))?,
                ),
            };
            let addr: IpAddr =
                parse_backend_addr(&spec.vip, b.address.get_ref()).map_err(|e| format!("{}: {e}", line()))?;
            let weight = b.weight.as_ref().map(|w| *w.get_ref()).unwrap_or(1);
            if let Some(w) = &b.weight {
                check_weight(weight).map_err(|e| format!("{}: {e}", at(w.span())))?;
            }
            let check = check_spec(
                &spec.vip,
                &CheckText {
                    check: b.check.as_ref().map(|c| c.get_ref().as_str()).unwrap_or("none"),
                    interval: b.interval.as_ref().map(|i| i.get_ref().as_str()),
                    timeout: b.timeout.as_ref().map(|t| t.get_ref().as_str()),
                    rise: b.rise,
                    fall: b.fall,
                    expect_status: b.expect_status.as_ref().map(|e| e.get_ref().as_str()),
                    ca_pem: ca_pem.as_deref(),
                    insecure: b.check_insecure,
                    path: path.map(|p| p.get_ref().as_str()),
                    eject_syn_repeats: b.eject_syn_repeats,
                },
            )
            .map_err(|e| format!("{}: {e}", line()))?;
            let server_id = match &b.server_id {
                None => None,
                Some(text) => {
                    let id = server_id(&spec, addr, text.get_ref()).map_err(|e| format!("{}: {e}", at(text.span())))?;
                    spec.quic.and_then(|q| q.by_hand(addr, Some(id)))
                }
            };
            let wish = BackendWish { weight, drained: b.drained.unwrap_or(false), check, server_id };
            if backends.insert(addr, wish).is_some() {
                return Err(format!("{}: backend {addr} appears twice in VIP {}", line(), spec.vip));
            }
        }
        let vip = spec.vip;
        if desired.insert(vip, VipWish { spec, backends }).is_some() {
            return Err(format!("{}: VIP {vip} appears twice", at(entry.vip.span())));
        }
    }
    Ok(desired)
}

/// A backend's server ID given by hand, for a QUIC VIP only, of the VIP's
/// length; shared with the API.
pub fn server_id(spec: &VipSpec, addr: IpAddr, text: &str) -> Result<ServerId, String> {
    let Some(quic) = spec.quic else {
        return Err(format!("backend {addr}: VIP {} is not QUIC, so it has no server IDs", spec.vip));
    };
    let id: ServerId = text.parse()?;
    if !quic.fits(id) {
        return Err(format!("server ID {text} of backend {addr} is longer than {} octets", quic.server_id_len));
    }
    Ok(id)
}

/// A VIP from its text parts, validated; shared with the API.
pub fn vip_spec(
    vip: &str,
    hash: &str,
    ring_size: u32,
    encap: &str,
    stateless: bool,
    quic: Option<QuicSpec>,
) -> Result<VipSpec, String> {
    let vip: VipAddr = vip.parse()?;
    let hash = match hash {
        "" | "5tuple" => HashMode::FiveTuple,
        "src-ip" => HashMode::SourceIp,
        other => return Err(format!("hash '{other}' is not 5tuple or src-ip")),
    };
    let ring_size = if ring_size == 0 { DEFAULT_RING_SIZE } else { ring_size };
    check_ring_size(ring_size).map_err(|e| e.to_string())?;
    let spec = VipSpec { vip, hash, ring_size, encap: encap.parse()?, stateless, quic };
    crate::services::check_quic(&spec).map_err(|e| e.to_string())?;
    Ok(spec)
}

/// A backend address for `vip`: an IP address of a family the VIP can
/// reach (IPv6 VIPs need IPv6 backends: there is no IPv6-in-IPv4).
pub fn parse_backend_addr(vip: &VipAddr, text: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = text.parse().map_err(|_| format!("backend address '{text}' is not an IP address"))?;
    if vip.addr.is_ipv6() && addr.is_ipv4() {
        return Err(format!("backend {addr} is IPv4 but VIP {vip} is IPv6: IPv6 cannot be carried in IPv4 here"));
    }
    Ok(addr)
}

pub fn check_weight(weight: u32) -> Result<(), String> {
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is out of range 0..={MAX_WEIGHT}"));
    }
    Ok(())
}

/// A health check as text, from the CLI, the API or a file.
#[derive(Default)]
pub struct CheckText<'a> {
    pub check: &'a str,
    pub interval: Option<&'a str>,
    pub timeout: Option<&'a str>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub expect_status: Option<&'a str>,
    /// https checks: PEM CA certificates to trust instead of the system's.
    pub ca_pem: Option<&'a str>,
    /// https checks: take any certificate.
    pub insecure: bool,
    /// `direct` (default) or `data`.
    pub path: Option<&'a str>,
    /// The passive signal's threshold (default 0: off).
    pub eject_syn_repeats: Option<u32>,
}

/// A health check from its text parts; `None` parts take the defaults.
pub fn check_spec(vip: &VipAddr, text: &CheckText) -> Result<CheckSpec, String> {
    let CheckText { check, interval, timeout, rise, fall, expect_status, ca_pem, insecure, path, eject_syn_repeats } =
        *text;
    let check = if check.is_empty() { "none" } else { check };
    let duration = |text: Option<&str>, default: Duration, what: &str| -> Result<Duration, String> {
        match text {
            None => Ok(default),
            Some(t) => {
                let d = humantime::parse_duration(t).map_err(|e| format!("{what} '{t}': {e}"))?;
                if d.is_zero() {
                    return Err(format!("{what} '{t}' must be above zero"));
                }
                Ok(d)
            }
        }
    };
    let spec = CheckSpec {
        probe: Probe::parse(check, vip.port)?.with_trust(ca_pem, insecure)?,
        path: path.unwrap_or("").parse()?,
        eject_syn_repeats: eject_syn_repeats.unwrap_or(0),
        interval: duration(interval, health::DEFAULT_INTERVAL, "interval")?,
        timeout: duration(timeout, health::DEFAULT_TIMEOUT, "timeout")?,
        rise: rise.unwrap_or(health::DEFAULT_RISE),
        fall: fall.unwrap_or(health::DEFAULT_FALL),
        expect: expect_status.map(health::parse_status_range).transpose()?.unwrap_or(health::DEFAULT_EXPECT),
    };
    if spec.path == CheckPath::Data && spec.probe == Probe::None {
        return Err("check path 'data' needs a check to send (tcp, http:// or https://)".into());
    }
    if spec.rise == 0 || spec.fall == 0 {
        return Err("rise and fall must be at least 1".into());
    }
    if spec.timeout > spec.interval {
        return Err(format!("timeout {:?} is longer than interval {:?}", spec.timeout, spec.interval));
    }
    Ok(spec)
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    RemoveVip(VipAddr),
    AddVip(VipSpec),
    RemoveBackend(VipAddr, IpAddr),
    AddBackend(VipAddr, IpAddr, BackendWish),
    UpdateBackend(VipAddr, IpAddr, BackendWish),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::RemoveVip(v) => write!(f, "- vip {v}"),
            Change::AddVip(s) => {
                write!(f, "+ vip {} (hash {}, ring {}", s.vip, s.hash, s.ring_size)?;
                if let Some(quic) = s.quic {
                    write!(f, ", quic {quic}")?;
                }
                write!(f, ")")
            }
            Change::RemoveBackend(v, a) => write!(f, "- backend {a} of {v}"),
            Change::AddBackend(v, a, w) | Change::UpdateBackend(v, a, w) => {
                let sign = if matches!(self, Change::AddBackend(..)) { "+" } else { "~" };
                write!(f, "{sign} backend {a} of {v} (weight {}, check {}", w.weight, w.check)?;
                if w.drained {
                    write!(f, ", drained")?;
                }
                if let Some(id) = w.server_id {
                    write!(f, ", server id {:#x}", id.0)?;
                }
                write!(f, ")")
            }
        }
    }
}

/// The changes that turn `current` into `desired`, removals first. A VIP
/// whose hash or ring size changes is removed and added again.
pub fn plan(current: &Desired, desired: &Desired) -> Vec<Change> {
    let mut removals = Vec::new();
    let mut additions = Vec::new();
    for (vip, now) in current {
        match desired.get(vip) {
            Some(want) if want.spec == now.spec => {
                for addr in now.backends.keys().filter(|a| !want.backends.contains_key(a)) {
                    removals.push(Change::RemoveBackend(*vip, *addr));
                }
                for (addr, wish) in &want.backends {
                    match now.backends.get(addr) {
                        None => additions.push(Change::AddBackend(*vip, *addr, wish.clone())),
                        Some(old) if old != wish => additions.push(Change::UpdateBackend(*vip, *addr, wish.clone())),
                        Some(_) => {}
                    }
                }
            }
            _ => removals.push(Change::RemoveVip(*vip)),
        }
    }
    for (vip, want) in desired {
        if current.get(vip).is_some_and(|now| now.spec == want.spec) {
            continue;
        }
        additions.push(Change::AddVip(want.spec));
        for (addr, wish) in &want.backends {
            additions.push(Change::AddBackend(*vip, *addr, wish.clone()));
        }
    }
    removals.extend(additions);
    removals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announce_section_is_optional_validated_and_named_by_line() {
        assert_eq!(parse_announce("").unwrap(), AnnounceSettings::default());
        let text = "[announce]\ntable = 100\ndrain_time = \"2s\"\n";
        let want = AnnounceSettings { table: Some(100), drain_time: Some(Duration::from_secs(2)) };
        assert_eq!(parse_announce(text).unwrap(), want);
        assert!(parse(text).unwrap().is_empty(), "no VIPs: the section is not a VIP");
        let err = parse_announce("[announce]\ntable = 0\n").unwrap_err();
        assert!(err.starts_with("line 2: announce table 0"), "{err}");
        let err = parse_announce("[announce]\n\ndrain_time = \"soon\"\n").unwrap_err();
        assert!(err.starts_with("line 3: drain_time 'soon'"), "{err}");
        assert!(parse_announce("[announce]\ntables = 1\n").unwrap_err().contains("unknown field"));
    }

    const GOOD: &str = r#"
[[vip]]
vip = "203.0.113.10:80/tcp"

[[vip.backend]]
address = "198.51.100.1"
check = "tcp"

[[vip.backend]]
address = "198.51.100.2"
weight = 3
drained = true

[[vip]]
vip = "[2001:db8::10]:0/udp"
hash = "src-ip"
ring_size = 251

[[vip.backend]]
address = "2001:db8:1::1"
check = "http://svc.example:8080/healthz"
interval = "500ms"
timeout = "200ms"
rise = 1
fall = 2
expect_status = "200-299"
"#;

    #[test]
    fn a_full_file_parses() {
        let d = parse(GOOD).unwrap();
        assert_eq!(d.len(), 2);
        let v4 = &d[&"203.0.113.10:80/tcp".parse().unwrap()];
        assert_eq!(v4.spec.ring_size, 65537);
        let b1 = &v4.backends[&"198.51.100.1".parse().unwrap()];
        assert_eq!((b1.weight, b1.drained, &b1.check.probe), (1, false, &Probe::Tcp { port: 80 }));
        assert!(v4.backends[&"198.51.100.2".parse().unwrap()].drained);
        let v6 = &d[&"[2001:db8::10]:0/udp".parse().unwrap()];
        assert_eq!((v6.spec.hash, v6.spec.ring_size), (HashMode::SourceIp, 251));
        let b = &v6.backends[&"2001:db8:1::1".parse().unwrap()];
        assert_eq!((b.check.interval, b.check.rise, b.check.fall), (Duration::from_millis(500), 1, 2));
        assert_eq!(b.check.expect, (200, 299));
        let bad_expect = GOOD.replace("\"200-299\"", "\"2xx\"");
        assert!(parse(&bad_expect).unwrap_err().contains("expected status '2xx'"));
    }

    #[test]
    fn errors_name_the_line() {
        let bad_addr = GOOD.replace("198.51.100.2\"", "198.51.100.300\"");
        assert_eq!(parse(&bad_addr).unwrap_err(), "line 10: backend address '198.51.100.300' is not an IP address");
        let bad_ring = GOOD.replace("ring_size = 251", "ring_size = 250");
        assert!(
            parse(&bad_ring).unwrap_err().starts_with("line 17: ring size 250 is not a prime"),
            "{}",
            parse(&bad_ring).unwrap_err()
        );
        let v4_in_v6 = GOOD.replace("2001:db8:1::1", "198.51.100.9");
        assert!(parse(&v4_in_v6).unwrap_err().starts_with("line 20: backend 198.51.100.9 is IPv4"));
        let heavy = GOOD.replace("weight = 3", "weight = 10001");
        assert!(parse(&heavy).unwrap_err().starts_with("line 11: weight 10001"));
        let typo = GOOD.replace("drained = true", "drainned = true");
        assert!(parse(&typo).unwrap_err().contains("line 12"), "{}", parse(&typo).unwrap_err());
        let dup = format!("{GOOD}\n[[vip]]\nvip = \"203.0.113.10:80/tcp\"\n");
        assert!(parse(&dup).unwrap_err().contains("appears twice"));
        let port0_tcp = GOOD.replace("check = \"http://svc.example:8080/healthz\"", "check = \"tcp\"");
        assert!(parse(&port0_tcp).unwrap_err().contains("port-0"));
    }

    /// `vips` VIPs of 100 backends, written as an operator would.
    fn large(vips: usize) -> String {
        use std::fmt::Write;
        let mut toml = String::new();
        for v in 0..vips {
            let _ = writeln!(toml, "[[vip]]\nvip = \"203.0.113.10:{}/tcp\"", 1000 + v);
            for b in 1..=100 {
                let _ = writeln!(toml, "[[vip.backend]]\naddress = \"198.51.100.{b}\"\nweight = {}", 1 + b % 3);
            }
        }
        toml
    }

    #[test]
    fn a_large_file_parsed_in_parts_is_the_file_and_its_errors_name_the_right_line() {
        let text = large(64);
        let parts = parts_of(&text, 4);
        assert_eq!(parts.len(), 4);
        assert!(parts[1..].iter().all(|(_, p)| p.starts_with("[[vip]]\n")));
        assert_eq!(parts.iter().map(|(_, p)| p.len()).sum::<usize>(), text.len());
        let whole = parse_part(&text, 0, &text).unwrap();
        assert_eq!(parse(&text).unwrap(), whole);
        assert_eq!(whole.len(), 64);
        assert_eq!(whole.values().map(|v| v.backends.len()).sum::<usize>(), 6400);
        // Errors name their line in the whole file: one in the first part,
        // one in the last.
        let first = text.lines().position(|l| l == "weight = 3").unwrap() + 1;
        let heavy = text.replacen("weight = 3", "weight = 10001", 1);
        assert!(parse(&heavy).unwrap_err().starts_with(&format!("line {first}: weight 10001")));
        let last = format!("{text}[[vip.backend]]\naddress = \"198.51.100.300\"\n");
        let line = text.lines().count() + 2;
        assert_eq!(
            parse(&last).unwrap_err(),
            format!("line {line}: backend address '198.51.100.300' is not an IP address")
        );
        // The same VIP in two parts is refused as in one.
        let twice = format!("{text}[[vip]]\nvip = \"203.0.113.10:1000/tcp\"\n");
        assert!(parse(&twice).unwrap_err().contains("appears twice"), "{}", parse(&twice).unwrap_err());
        // A multi-line string could hold a `[[vip]]` line: such files stay whole.
        assert_eq!(parts_of(&format!("# '''\n{text}"), 4).len(), 1);
    }

    #[test]
    fn encap_stateless_and_https_trust_parse_and_bad_ones_name_the_line() {
        let file = "[[vip]]\nvip = \"203.0.113.10:443/tcp\"\nencap = \"gue\"\nstateless = true\n\n\
                    [[vip.backend]]\naddress = \"198.51.100.1\"\ncheck = \"https://be1.example/\"\n\
                    check_insecure = true\n";
        let d = parse(file).unwrap();
        let v = &d[&"203.0.113.10:443/tcp".parse().unwrap()];
        assert_eq!((v.spec.encap, v.spec.stateless), (crate::services::Encap::Gue, true));
        let probe = &v.backends[&"198.51.100.1".parse().unwrap()].check.probe;
        assert_eq!(probe.to_string(), "https://be1.example:443/ (insecure)");
        let bad = file.replace("\"gue\"", "\"vxlan\"");
        assert_eq!(parse(&bad).unwrap_err(), "line 3: encap 'vxlan' is not ipip or gue");
        let no_ca = file.replace("check_insecure = true", "check_ca = \"/nonexistent/ca.pem\"");
        assert!(parse(&no_ca).unwrap_err().starts_with("line 9: cannot read check_ca /nonexistent/ca.pem"));
        let http = file.replace("https://", "http://");
        assert!(parse(&http).unwrap_err().contains("https:// checks only"), "{}", parse(&http).unwrap_err());
    }

    #[test]
    fn quic_vips_and_server_ids_parse_and_bad_ones_name_the_line() {
        let file = "[[vip]]\nvip = \"203.0.113.10:443/udp\"\nquic = true\n\n\
                    [[vip.backend]]\naddress = \"198.51.100.1\"\nserver_id = \"0a01\"\n\n\
                    [[vip.backend]]\naddress = \"198.51.100.2\"\nserver_id = \"6402\"\n";
        let d = parse(file).unwrap();
        let v = &d[&"203.0.113.10:443/udp".parse().unwrap()];
        assert_eq!(v.spec.quic, Some(QuicSpec::default()));
        let id = |a: &str| v.backends[&a.parse().unwrap()].server_id;
        // The second is the ID its address gives anyway: not kept as by hand.
        assert_eq!((id("198.51.100.1"), id("198.51.100.2")), (Some(ServerId(0x0a01)), None));
        let custom = file.replace("quic = true", "quic = { config_id = 2, nonce_len = 8 }");
        let spec = parse(&custom).unwrap()[&"203.0.113.10:443/udp".parse().unwrap()].spec.quic.unwrap();
        assert_eq!(spec, QuicSpec { config_id: 2, server_id_len: 2, nonce_len: 8 });
        let bad = file.replace("quic = true", "quic = { config_id = 7 }");
        assert!(parse(&bad).unwrap_err().starts_with("line 3: VIP 203.0.113.10:443/udp: QUIC config id 7"));
        let tcp = file.replace("443/udp", "443/tcp");
        assert!(parse(&tcp).unwrap_err().contains("QUIC runs over UDP"), "{}", parse(&tcp).unwrap_err());
        let long = file.replace("\"0a01\"", "\"10000\"");
        assert_eq!(
            parse(&long).unwrap_err(),
            "line 7: server ID 10000 of backend 198.51.100.1 is longer than 2 octets"
        );
        let plain = file.replace("quic = true\n", "");
        assert!(parse(&plain)
            .unwrap_err()
            .starts_with("line 6: backend 198.51.100.1: VIP 203.0.113.10:443/udp is not QUIC"));
    }

    #[test]
    fn the_shipped_example_files_parse() {
        for (name, text) in [
            ("examples/lab.toml", include_str!("../../examples/lab.toml")),
            ("packaging/etc/lbctl/lbctl.toml", include_str!("../../packaging/etc/lbctl/lbctl.toml")),
        ] {
            let d = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(d.len(), 2, "{name}");
        }
    }

    #[test]
    fn plan_removes_first_and_recreates_changed_vips() {
        let now = parse(GOOD).unwrap();
        let mut want = now.clone();
        let v4: VipAddr = "203.0.113.10:80/tcp".parse().unwrap();
        let v6: VipAddr = "[2001:db8::10]:0/udp".parse().unwrap();
        let vip = want.get_mut(&v4).unwrap();
        vip.backends.remove(&"198.51.100.1".parse().unwrap());
        vip.backends.get_mut(&"198.51.100.2".parse().unwrap()).unwrap().weight = 5;
        want.get_mut(&v6).unwrap().spec.ring_size = 257;
        let changes: Vec<String> = plan(&now, &want).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            changes,
            [
                "- backend 198.51.100.1 of 203.0.113.10:80/tcp",
                "- vip [2001:db8::10]:0/udp",
                "~ backend 198.51.100.2 of 203.0.113.10:80/tcp (weight 5, check none, drained)",
                "+ vip [2001:db8::10]:0/udp (hash src-ip, ring 257)",
                "+ backend 2001:db8:1::1 of [2001:db8::10]:0/udp (weight 1, check http://svc.example:8080/healthz)",
            ]
        );
        assert!(plan(&now, &now).is_empty());
    }
}
