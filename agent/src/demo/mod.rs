//! `ambient-agent demo`: the agent's main job on the embedded default,
//! shown end to end on this machine.
//!
//! - [`netns`] (default, needs root): two node namespaces and six pods,
//!   real capture, two agents, traffic between pods, the wire watched, and
//!   HTTP through the reference waypoint;
//! - [`loopback`] (no privilege): two agents on 127.x addresses with capture
//!   stood in for.

pub mod client;
pub mod gateway;
pub mod loopback;
mod netns;
pub mod topology;
pub mod waypoint;

pub use netns::run as run_netns;

/// The demo's application: echoes each connection back, then half-closes.
fn serve_echo(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncWriteExt;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.split();
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            });
        }
    })
}

/// The demo's HTTP application: answers every request with `name`.
fn serve_http(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> tokio::task::JoinHandle<()> {
    use http_body_util::Full;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let service = hyper::service::service_fn(move |_req| async move {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from_static(name.as_bytes()),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service),
            );
        }
    })
}
