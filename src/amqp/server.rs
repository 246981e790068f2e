//! Listeners: accept loops for plain AMQP and AMQPS (rustls) that hand each socket to
//! [`connection::serve`]. They take already-bound listeners, so tests bind port 0 and call
//! the same code as `mqic serve`.

use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::broker::Broker;
use super::connection::{self, ConnectionEnd};

/// Builds a TLS acceptor from PEM certificate-chain and private-key files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("reading TLS certificate {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("parsing TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "TLS certificate file {} holds no certificate",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("reading TLS private key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `shutdown` turns true, then waits for them to close.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let broker = broker.clone();
                let shutdown = shutdown.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let result = match tls {
                        None => connection::serve(socket, peer, broker, shutdown).await,
                        Some(acceptor) => {
                            // Shutdown does not wait for TLS handshakes either.
                            let mut stop = shutdown.clone();
                            let accepted = tokio::select! {
                                a = tokio::time::timeout(
                                    broker.limits.handshake_timeout,
                                    acceptor.accept(socket),
                                ) => Some(a),
                                _ = async { let _ = stop.wait_for(|stop| *stop).await; } => None,
                            };
                            match accepted {
                                Some(Ok(Ok(stream))) => {
                                    connection::serve(stream, peer, broker, shutdown).await
                                }
                                Some(Ok(Err(e))) => Err(ConnectionEnd::Io(e)),
                                Some(Err(_)) => Err(ConnectionEnd::HandshakeTimeout),
                                None => Err(ConnectionEnd::Shutdown),
                            }
                        }
                    };
                    match result {
                        Ok(()) | Err(ConnectionEnd::ClientClosed) => {
                            tracing::debug!(%peer, "connection closed")
                        }
                        Err(e) => tracing::info!(%peer, "connection ended: {e}"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
