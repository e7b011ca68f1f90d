//! QUIC VIPs: which backend a QUIC packet's connection ID asks for
//! (QUIC-LB, draft-ietf-quic-load-balancers-21, unencrypted server IDs;
//! `lb_common::quic`). A short header's destination CID was issued by a
//! server: its server ID names the backend. A long header's may be the
//! client's own (Initial, 0-RTT): unless it names a server, its hash picks
//! from the ring, so a client's first packets meet at one backend even if
//! its address changes. Anything else goes by the 5-tuple.

use aya_ebpf::{macros::map, maps::HashMap, programs::XdpContext};
use lb_common::{
    cid_hash,
    quic::{first_octets, QuicServer, QuicServerKey, MAX_CID_LEN},
    stat, Backend, VipMeta, BACKEND_F_RETIRED, MAX_BACKENDS,
};

use crate::{headers::ptr_at, select::BACKENDS};

/// (VIP, server ID) -> backend: live backends only (the controller takes
/// a backend out when it is down or removed; a drained one stays, as its
/// connections do).
#[map]
static QUIC_SERVERS: HashMap<QuicServerKey, QuicServer> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// RFC 8999 5.1: the long header's form bit.
const LONG_HEADER: u8 = 0x80;
/// RFC 8999 5.1: first octet and version before the DCID length.
const LONG_DCID_LEN_AT: usize = 5;

pub enum Route {
    /// The connection ID's server ID names this live backend.
    Server(u32, &'static Backend),
    /// A client's connection ID: pick from the ring by this hash.
    ClientCid(u32),
    /// By the 5-tuple, as any UDP packet.
    FiveTuple,
}

/// Where the QUIC packet whose UDP payload starts at `payload` goes.
#[inline(always)]
pub fn route(ctx: &XdpContext, payload: usize, vip: &VipMeta, stats: &mut [u64; stat::COUNT]) -> Route {
    // (Reads here are of two octets or more: the verifier cannot bound a
    // one-octet read at a variable offset, whose check the compiler folds.)
    let Some(start) = ptr_at::<[u8; 2]>(ctx, payload) else {
        stats[stat::QUIC_UNDECODABLE] += 1;
        return Route::FiveTuple;
    };
    let route = if unsafe { (*start)[0] } & LONG_HEADER != 0 {
        long_header(ctx, payload, vip)
    } else {
        short_header(ctx, payload, vip)
    };
    let counter = match route {
        Ok(Route::Server(..)) => stat::QUIC_BY_SERVER_ID,
        Ok(Route::ClientCid(_)) => stat::QUIC_BY_CLIENT_CID,
        Ok(Route::FiveTuple) => return Route::FiveTuple,
        Err(reason) => reason,
    };
    stats[counter] += 1;
    route.unwrap_or(Route::FiveTuple)
}

/// RFC 9000 17.3: the DCID follows the first octet; its length is the
/// VIP's (servers issue CIDs of one length).
#[inline(always)]
fn short_header(ctx: &XdpContext, payload: usize, vip: &VipMeta) -> Result<Route, usize> {
    let cid = payload + 1;
    // The whole CID must be in the packet (a nonce cut short is no CID).
    let cid_len = (vip.quic.cid_len & 0x1f) as usize;
    if cid_len < 2 || ptr_at::<[u8; 2]>(ctx, cid + cid_len - 2).is_none() {
        return Err(stat::QUIC_UNDECODABLE);
    }
    server(ctx, cid, vip).map(|(id, backend)| Route::Server(id, backend))
}

/// RFC 8999 5.1: first octet, version, DCID length, DCID.
#[inline(always)]
fn long_header(ctx: &XdpContext, payload: usize, vip: &VipMeta) -> Result<Route, usize> {
    let len_at = ptr_at::<[u8; 2]>(ctx, payload + LONG_DCID_LEN_AT - 1).ok_or(stat::QUIC_UNDECODABLE)?;
    let len = unsafe { (*len_at)[1] };
    if len > MAX_CID_LEN {
        return Err(stat::QUIC_UNDECODABLE);
    }
    let dcid = payload + LONG_DCID_LEN_AT + 1;
    if len >= vip.quic.cid_len {
        if let Ok((id, backend)) = server(ctx, dcid, vip) {
            return Ok(Route::Server(id, backend));
        }
    }
    // Five words from the DCID on (any long header has 20 octets there:
    // an Initial is padded to 1200, others carry at least a 16-octet tag).
    let window = ptr_at::<[u32; 5]>(ctx, dcid).ok_or(stat::QUIC_UNDECODABLE)?;
    let mut words = unsafe { core::ptr::read_unaligned(window) };
    for (i, word) in words.iter_mut().enumerate() {
        *word &= octets_mask(len as i32 - 4 * i as i32);
    }
    Ok(Route::ClientCid(cid_hash(&words, len)))
}

/// The mask that keeps the first `n` octets of a word loaded from the
/// packet (none below 1, all from 4).
#[inline(always)]
fn octets_mask(n: i32) -> u32 {
    if n <= 0 {
        0
    } else if n >= 4 {
        u32::MAX
    } else {
        u32::MAX >> (32 - 8 * n as u32)
    }
}

/// The live backend the CID at `cid` names, or the reason it names none.
#[inline(always)]
fn server(ctx: &XdpContext, cid: usize, vip: &VipMeta) -> Result<(u32, &'static Backend), usize> {
    // The first octet and the 8 after it: the longest server ID.
    let octets = unsafe { &*ptr_at::<[u8; 9]>(ctx, cid).ok_or(stat::QUIC_UNDECODABLE)? };
    if octets[0] >> 5 != vip.quic.config_id {
        return Err(stat::QUIC_UNKNOWN_CONFIG);
    }
    let word = unsafe { core::ptr::read_unaligned(octets[1..].as_ptr() as *const u64) };
    let key = QuicServerKey { vip_id: vip.vip_id, _pad: 0, server_id: first_octets(word, vip.quic.server_id_len) };
    let server = unsafe { QUIC_SERVERS.get(&key) }.ok_or(stat::QUIC_UNKNOWN_SERVER)?;
    let backend = BACKENDS.get(server.backend_id).ok_or(stat::QUIC_UNKNOWN_SERVER)?;
    if backend.cookie == 0 || backend.cookie != server.cookie || backend.flags & BACKEND_F_RETIRED != 0 {
        return Err(stat::QUIC_UNKNOWN_SERVER);
    }
    Ok((server.backend_id, backend))
}
