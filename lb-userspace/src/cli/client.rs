//! Reaching the controller: its unix socket, or its TCP listener with
//! mutual TLS. Connection failures become messages that say which side
//! refused what; they never leak as a bare transport error.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tonic::transport::{Channel, Endpoint, Uri};

use super::ClientOpts;

pub async fn connect(opts: &ClientOpts) -> Result<Channel> {
    if let Some(server) = &opts.server {
        return connect_tls(server, opts).await;
    }
    let path = opts.socket.clone();
    if !path.exists() {
        bail!("no controller socket at {}: is `lbctl up` running? (--socket PATH)", path.display());
    }
    let first = open_unix(&path).await?;
    channel("http://lbctl.invalid".into(), first, move || {
        let path = path.clone();
        async move { open_unix(&path).await }
    })
    .await
    .with_context(|| format!("cannot connect to {}", opts.socket.display()))
}

/// A channel over `first`, a connection the caller opened itself so that a
/// refusal is reported in its own words; `reopen` makes the later ones.
async fn channel<S, F, Fut>(uri: String, first: S, reopen: F) -> Result<Channel>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<S>> + Send,
{
    let first = Arc::new(Mutex::new(Some(first)));
    let reopen = Arc::new(reopen);
    let channel = Endpoint::from_shared(uri)?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (first, reopen) = (Arc::clone(&first), Arc::clone(&reopen));
            async move {
                let ready = first.lock().expect("not poisoned").take();
                let stream = match ready {
                    Some(stream) => stream,
                    None => reopen().await.map_err(|e| io::Error::other(format!("{e:#}")))?,
                };
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

async fn open_unix(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).await.map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on the controller socket {}: it is root's only (mode 0600); run lbctl as root",
            path.display()
        ),
        io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!("no controller listens on {}: is `lbctl up` running?", path.display())
        }
        _ => anyhow::anyhow!("cannot connect to {}: {e}", path.display()),
    })
}

/// The controller's TCP listener, with this client's certificate.
async fn connect_tls(server: &str, opts: &ClientOpts) -> Result<Channel> {
    let (Some(cert), Some(key), Some(ca)) = (&opts.tls_cert, &opts.tls_key, &opts.tls_ca) else {
        bail!("--server needs --tls-cert, --tls-key and --tls-ca (the API speaks mutual TLS only)");
    };
    let uri: Uri = server.parse().with_context(|| format!("--server '{server}' is not https://HOST:PORT"))?;
    if uri.scheme_str() != Some("https") {
        bail!("--server '{server}' is not https://HOST:PORT");
    }
    let authority = uri.authority().context("--server has no HOST:PORT")?.to_string();
    let host = uri.host().context("--server has no host")?.trim_matches(|c| c == '[' || c == ']').to_string();
    let peer = TlsPeer {
        server: server.to_string(),
        address: if uri.port().is_some() { authority.clone() } else { format!("{authority}:443") },
        name: ServerName::try_from(host).context("--server host is not a name or an address")?,
        connector: TlsConnector::from(Arc::new(client_config(cert, key, ca)?)),
    };
    let first = peer.open().await?;
    let peer = Arc::new(peer);
    // TLS is ours: tonic speaks plain HTTP/2 over the stream we hand it.
    channel(format!("http://{authority}"), first, move || {
        let peer = Arc::clone(&peer);
        async move { peer.open().await }
    })
    .await
    .with_context(|| format!("cannot connect to {server}"))
}

fn client_config(cert: &PathBuf, key: &PathBuf, ca: &PathBuf) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading --tls-ca {}", ca.display()))? {
        roots.add(c.with_context(|| format!("--tls-ca {}", ca.display()))?)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading --tls-cert {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading --tls-key {}", key.display()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("--tls-cert and --tls-key do not make a usable client identity")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

struct TlsPeer {
    server: String,
    address: String,
    name: ServerName<'static>,
    connector: TlsConnector,
}

/// How long a server that took our certificate has to say its first word.
const ACCEPT_WAIT: Duration = Duration::from_secs(5);

impl TlsPeer {
    /// TCP, the TLS handshake, then the server's first bytes: with TLS 1.3
    /// the server judges the client's certificate after the client thinks
    /// the handshake is done, so a refusal only shows on the first read.
    /// An HTTP/2 server speaks first (its SETTINGS frame), so waiting for it
    /// tells acceptance from refusal; the bytes are replayed to tonic.
    async fn open(&self) -> Result<Replay<TlsStream<TcpStream>>> {
        let server = &self.server;
        let tcp = TcpStream::connect(&self.address).await.map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => anyhow::anyhow!("nothing listens at {server} (connection refused)"),
            _ => anyhow::anyhow!("cannot reach {server}: {e}"),
        })?;
        let mut tls = self.connector.connect(self.name.clone(), tcp).await.map_err(|e| self.refusal(&e))?;
        let mut first = vec![0u8; 4096];
        let n = match tokio::time::timeout(ACCEPT_WAIT, tls.read(&mut first)).await {
            Err(_) => 0, // silent but open: let HTTP/2 find out
            Ok(Ok(0)) => bail!(
                "the server at {server} closed the connection right after the TLS handshake: it refused this \
                 client's certificate (is --tls-cert signed by the CA the server trusts?)"
            ),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(self.refusal(&e)),
        };
        first.truncate(n);
        Ok(Replay { prefix: first, pos: 0, inner: tls })
    }

    /// Says which side refused what, from the rustls error inside `e`.
    fn refusal(&self, e: &io::Error) -> anyhow::Error {
        let server = &self.server;
        match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(alert)) => anyhow::anyhow!(
                "the server at {server} refused this client's certificate (TLS alert: {alert:?}); is --tls-cert \
                 signed by the CA the server trusts?"
            ),
            Some(rustls::Error::InvalidCertificate(why)) => anyhow::anyhow!(
                "this client refused the certificate of the server at {server} ({why:?}); is --tls-ca the CA that \
                 signed it, and does it name the host of --server?"
            ),
            Some(other) => anyhow::anyhow!("TLS with {server} failed: {other}"),
            None => anyhow::anyhow!("TLS with {server} failed: {e}"),
        }
    }
}

/// A stream that first yields bytes already read from it.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            buf.put_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
