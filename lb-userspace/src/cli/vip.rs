//! `lbctl vip add|del|list`.

use anyhow::Result;
use lb_userspace::api::pb::{self, vips_client::VipsClient};

use super::{client::connect, output::print_vips, ClientOpts};

#[derive(clap::Subcommand)]
pub enum VipCommand {
    /// Add a VIP: ADDR:PORT/PROTO (IPv6 as [2001:db8::10]:80/tcp; port 0 = every port).
    Add {
        vip: String,
        /// Flow hash: 5tuple, or src-ip for session affinity.
        #[arg(long, default_value = "5tuple")]
        hash: String,
        /// Maglev ring size (a prime).
        #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
        ring_size: u32,
        /// Encapsulation: ipip, or gue (UDP; TCP packets name the backends
        /// the ring history gives their flow as alternate hops: the second chance).
        #[arg(long, default_value = "ipip", value_parser = ["ipip", "gue"])]
        encap: String,
        /// Never read or write the conn table: every packet follows the
        /// live ring (with gue, TCP packets carry the alternate hops).
        #[arg(long)]
        stateless: bool,
        /// QUIC-aware (UDP VIPs): a connection ID that names a server
        /// (QUIC-LB, unencrypted) sends the packet to that backend,
        /// whatever the client's address; see `backend list` for the IDs.
        #[arg(long)]
        quic: bool,
        /// QUIC: the config rotation codepoint (0-6) of the CIDs.
        #[arg(long, value_name = "N", default_value_t = 0, requires = "quic")]
        quic_config_id: u32,
        /// QUIC: octets of the server ID (1-8).
        #[arg(long, value_name = "N", default_value_t = 2, requires = "quic")]
        quic_server_id_len: u32,
        /// QUIC: octets of the nonce after it (4 or more).
        #[arg(long, value_name = "N", default_value_t = 6, requires = "quic")]
        quic_nonce_len: u32,
    },
    /// Delete a VIP and its backends.
    Del { vip: String },
    /// List VIPs with their counters.
    List,
}

pub async fn run(command: VipCommand, client: &ClientOpts) -> Result<()> {
    let mut api = VipsClient::new(connect(client).await?);
    match command {
        VipCommand::Add {
            vip,
            hash,
            ring_size,
            encap,
            stateless,
            quic,
            quic_config_id,
            quic_server_id_len,
            quic_nonce_len,
        } => {
            let quic = quic.then_some(pb::QuicConfig {
                enabled: true,
                config_id: quic_config_id,
                server_id_len: quic_server_id_len,
                nonce_len: quic_nonce_len,
            });
            let v = api.add_vip(pb::AddVipRequest { vip, hash, ring_size, encap, stateless, quic }).await?.into_inner();
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
