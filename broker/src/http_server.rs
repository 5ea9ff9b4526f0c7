//! The accept loop of Messina's HTTP listeners (the API side-port and the embedded S3
//! endpoint): plain or over TLS, HTTP/1.1 through hyper, each connection on its own task, and a
//! graceful stop that lets requests in progress finish for a while.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tls::{PeerCertificate, Tls};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `make(certificate)` (one service per connection, given the client certificate a TLS
/// connection verified) on `listener` until `shutdown`, then waits up to `drain` for the
/// requests in progress. `what` names the listener in logs.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    make: M,
    shutdown: CancellationToken,
    drain: Duration,
    what: &'static str,
) where
    M: Fn(Option<PeerCertificate>) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let make = Arc::new(make);
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Small responses must not wait for Nagle's algorithm.
        let _ = socket.set_nodelay(true);
        let (http, watcher, make) = (http.clone(), graceful.watcher(), Arc::clone(&make));
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let conn = http.serve_connection(TokioIo::new(socket), make(None));
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        acceptor.accept(socket),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = what, %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certificate = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map(|c| PeerCertificate::from_der(c));
                    let conn = http.serve_connection(TokioIo::new(stream), make(certificate));
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}
