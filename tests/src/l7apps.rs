//! Applications behind the waypoint in the L7 tests: an HTTP server that
//! speaks HTTP/1.1 and HTTP/2 (prior knowledge) and a gRPC service, each
//! inside a pod, and their clients from another pod (captured like any
//! application's connections).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use ambient_agent::demo::topology::Pod;
use ambient_agent::socket::ConnectOpts;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream_compat::{ReceiverStream, Stream, StreamExt, TcpListenerStream};
use tonic::{Status, Streaming};

/// The generated gRPC types of `proto/echo.proto`.
pub mod echo {
    tonic::include_proto!("ambient.test.v1");
}

mod tokio_stream_compat {
    pub use ambient_proto::tonic::codegen::tokio_stream::wrappers::{
        ReceiverStream, TcpListenerStream,
    };
    pub use ambient_proto::tonic::codegen::tokio_stream::{Stream, StreamExt};
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn version_name(v: Version) -> &'static str {
    if v == Version::HTTP_2 {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    }
}

/// An HTTP server inside `pod` on 8080, HTTP/1.1 or HTTP/2 as the client
/// speaks, named `name`:
/// - `GET /who` answers `<name> <protocol>`;
/// - `POST /echo` streams each chunk of the request body back as it
///   arrives, then trailers `x-served-by: <name>` and `x-bytes: <count>`;
/// - `GET /fail-on/<app>` answers 503 from app `<app>`, else 200 `<name>`;
/// - `GET /slow-on/<app>` answers after 3 s from app `<app>`, else at once;
/// - `GET /delay/<ms>` answers `<name>` after that many milliseconds;
/// - a request with `Upgrade` is answered 101 and the connection then
///   echoes bytes, prefixed once with `<name>:`.
pub async fn l7_app(pod: &Pod, name: &'static str) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = pod
        .sockets()
        .listen(pod.any_addr(8080), Default::default())
        .await?;
    Ok(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    service_fn(move |r| async move { Ok::<_, Infallible>(answer(name, r).await) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), service)
                    .await;
            });
        }
    }))
}

async fn answer(name: &'static str, mut req: Request<Incoming>) -> Response<Body> {
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let _ = io.write_all(format!("{name}:").as_bytes()).await;
            let mut buf = [0u8; 4096];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "echo")
            .body(full(""))
            .expect("response");
    }
    let path = req.uri().path().to_string();
    if let Some(app) = path.strip_prefix("/fail-on/") {
        let status = if app == name {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let mut r = Response::new(full(name));
        *r.status_mut() = status;
        return r;
    }
    if let Some(app) = path.strip_prefix("/slow-on/") {
        if app == name {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        return Response::new(full(name));
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return Response::new(full(name));
    }
    match path.as_str() {
        "/echo" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(16);
            let mut body = req.into_body();
            tokio::spawn(async move {
                let mut count = 0usize;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return };
                    if let Ok(data) = frame.into_data() {
                        count += data.len();
                        if tx.send(Ok(Frame::data(data))).await.is_err() {
                            return;
                        }
                    }
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-served-by", name.parse().expect("value"));
                trailers.insert("x-bytes", count.to_string().parse().expect("value"));
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            });
            Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed())
        }
        _ => Response::new(full(format!("{name} {}", version_name(req.version())))),
    }
}

/// A connection from inside `pod` to `dst`.
pub async fn connect(pod: &Pod, dst: SocketAddr) -> TokioIo<tokio::net::TcpStream> {
    TokioIo::new(
        pod.sockets()
            .connect(dst, ConnectOpts::default())
            .await
            .expect("connect from the pod"),
    )
}

/// An HTTP/2 (prior knowledge) connection from inside `pod` to `dst`.
pub async fn h2_client(
    pod: &Pod,
    dst: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Body> {
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), connect(pod, dst).await)
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// The gRPC echo service inside `pod` on 8080, answering as `name`.
pub async fn grpc_app(
    pod: &Pod,
    name: &'static str,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = pod
        .sockets()
        .listen(pod.any_addr(8080), Default::default())
        .await?;
    Ok(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(echo::echo_server::EchoServer::new(EchoApp { name }))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    }))
}

struct EchoApp {
    name: &'static str,
}

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoApp {
    async fn say(
        &self,
        req: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, Status> {
        let text = req.into_inner().text;
        if let Some(message) = text.strip_prefix("fail:") {
            return Err(Status::not_found(message.to_string()));
        }
        Ok(tonic::Response::new(echo::EchoReply {
            text,
            served_by: self.name.into(),
        }))
    }

    type ChatStream = Pin<Box<dyn Stream<Item = Result<echo::EchoReply, Status>> + Send>>;

    async fn chat(
        &self,
        req: tonic::Request<Streaming<echo::EchoRequest>>,
    ) -> Result<tonic::Response<Self::ChatStream>, Status> {
        let name = self.name;
        let replies = req.into_inner().map(move |m| {
            m.map(|m| echo::EchoReply {
                text: m.text,
                served_by: name.into(),
            })
        });
        Ok(tonic::Response::new(Box::pin(replies)))
    }
}

/// A gRPC client from inside `pod` to `dst` (its one connection is
/// captured like any application's).
pub async fn grpc_client(
    pod: &Pod,
    dst: SocketAddr,
) -> echo::echo_client::EchoClient<tonic::transport::Channel> {
    let sockets = pod.sockets();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{dst}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let sockets = sockets.clone();
            async move {
                sockets
                    .connect(dst, ConnectOpts::default())
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("gRPC connection");
    echo::echo_client::EchoClient::new(channel)
}

/// An HTTP/1.1 connection from inside `pod` to `dst`.
pub async fn h1_client(
    pod: &Pod,
    dst: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(connect(pod, dst).await)
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    send
}

/// One bodiless request on `send`, with `headers`: its status and body.
pub async fn h1_request(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send.ready().await.expect("connection usable");
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        send.send_request(req.body(http_body_util::Empty::new()).expect("request")),
    )
    .await
    .expect("answer in time")
    .expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// What `rx` has received so far.
pub fn drain<T: Clone>(rx: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<T>>) -> Vec<T> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push((*r).clone());
    }
    out
}

/// The VIP of service `ratings` in [`ratings_mesh`].
pub const RATINGS_VIP: &str = "10.96.0.1:80";

/// A mesh file: `client` (node-a); service `ratings` (port 80 -> 8080,
/// VIP [`RATINGS_VIP`]) with `endpoints` (node-b) behind waypoint `wp`
/// (workload `WAYPOINT_UID`); and its HTTP route, whose fields after
/// `service:` are `route` (YAML at the route's indentation).
pub fn ratings_mesh(client: &Pod, endpoints: &[&Pod], wp: &Pod, route: &str) -> String {
    use ambient_agent::demo::waypoint::WAYPOINT_UID;
    let wp_ip = wp.addr(0).ip();
    let behind = format!("    waypoint: {{address: \"{wp_ip}\"}}\n");
    let mut y = String::from("workloads:\n");
    y += &client.workload_yaml("test", "node-a", "client");
    for p in endpoints {
        y += &p.workload_yaml("test", "node-b", "ratings");
        y += &behind;
    }
    let names: Vec<&str> = endpoints.iter().map(|p| p.name.as_str()).collect();
    y += &format!(
        r#"  - uid: {WAYPOINT_UID}
    name: waypoint
    namespace: test
    serviceAccount: waypoint
    addresses: ["{wp_ip}"]
    node: waypoints
services:
  - name: ratings
    namespace: test
    vips: ["{vip}"]
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints: [{endpoints}]
    waypoint: {{address: "{wp_ip}"}}
httpRoutes:
  - name: ratings
    namespace: test
    service: test/ratings.test.svc.cluster.local
{route}"#,
        vip = RATINGS_VIP.split(':').next().unwrap_or_default(),
        endpoints = names.join(", "),
    );
    y
}
