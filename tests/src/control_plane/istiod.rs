//! istiod's port 15012 as one test server: the xDS service of a
//! [`TestXds`] and the CA service of a [`TestCa`] on one TLS address,
//! under the CA's serving certificate (DNS name `istiod.istio-system.svc`),
//! for clients configured as Istio's charts configure ztunnel (one address
//! for both).

use std::net::SocketAddr;

use ambient_proto::tonic::codegen::tokio_stream::wrappers::TcpListenerStream;
use ambient_proto::tonic::transport::{Server, ServerTlsConfig};
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{ca::TestCa, xds::TestXds};

/// Serves until dropped.
pub struct TestIstiod {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestIstiod {
    pub async fn start(addr: SocketAddr, xds: &TestXds, ca: &TestCa) -> anyhow::Result<TestIstiod> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the test istiod to {addr}"))?;
        let addr = listener.local_addr()?;
        let router = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(ca.serving_identity()))
            .context("test istiod TLS config")?
            .add_service(xds.service())
            .add_service(ca.service());
        let (stop, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = signal.await;
            };
            let incoming = TcpListenerStream::new(listener);
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::warn!(error = %e, "test istiod stopped with an error");
            }
        });
        Ok(TestIstiod {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TestIstiod {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
