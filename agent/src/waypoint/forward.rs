//! One request's way to a backend under its rule's policy, in Envoy's
//! order: injected faults first (a delay, then an abort), then attempts.
//! A failed attempt is retried on the rule's conditions, each attempt
//! bounded by the per-try timeout and sent to another workload when one
//! remains (Istio's `previous_hosts` predicate); the route's timeout
//! bounds them all. A body is replayed for a retry only when it is small
//! and its size known up front; otherwise the request gets one attempt.
//! Failures answer as Envoy does: 503 when no response came, 504 on a
//! timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use tracing::debug;

use super::http::{is_upgrade, splice_upgrade, strip_hop_by_hop, text, Tunnel};
use super::upstream::{Body, ForwardError};
use super::Shared;
use crate::state::l7::{Attempt, OutlierDetection, RequestPolicy};
use crate::state::{pick_address, IpFamilies, L7Decision, Name, Service, Workload};

/// The largest request body kept for replay (Envoy buffers up to its
/// connection buffer limit, 1 MiB by default; a waypoint serving many
/// tunnels keeps less).
const MAX_REPLAY: u64 = 64 * 1024;
/// Envoy's answers when no response came.
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const RESET: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
/// Envoy's default retry back-off: 25 ms base, doubling, jittered, capped
/// at ten times the base.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Where a request goes first, and what it may be sent to again.
pub(super) struct To {
    pub first: Arc<Workload>,
    /// The service it was addressed to (retries choose among its routes).
    pub service: Option<Arc<Service>>,
    /// The workload port.
    pub port: u16,
    /// The service's outlier detection, if it has one.
    pub outlier: Option<OutlierDetection>,
}

/// What became of a forwarded request.
pub(super) struct Outcome {
    pub response: Response<Body>,
    /// The workload of the last attempt.
    pub backend: Option<Name>,
    pub attempts: u32,
    /// Why it did not get a backend's answer (fault, timeout, error).
    pub reason: Option<String>,
}

impl Shared {
    pub(super) async fn forward(
        &self,
        t: &Tunnel,
        to: To,
        req: Request<Incoming>,
        policy: &RequestPolicy,
    ) -> Outcome {
        let mut out = Outcome {
            response: text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
            backend: None,
            attempts: 0,
            reason: None,
        };
        if let Some(fault) = policy.fault {
            if let Some((delay, share)) = fault.delay.filter(|(_, s)| s.draw()) {
                debug!(?delay, per_million = share.per_million(), "fault: delaying");
                tokio::time::sleep(delay).await;
            }
            if let Some((status, _)) = fault.abort.filter(|(_, s)| s.draw()) {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                out.response = text(status, "fault filter abort");
                out.reason = Some("fault injected: abort".into());
                return out;
            }
        }
        let attempts = self.attempts(t, &to, req, policy, &mut out);
        let response = match policy.timeout {
            None => attempts.await,
            Some(limit) => match tokio::time::timeout(limit, attempts).await {
                Ok(r) => r,
                Err(_) => {
                    out.reason = Some(format!("route timeout ({limit:?})"));
                    text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                }
            },
        };
        out.response = response;
        out
    }

    async fn attempts(
        &self,
        t: &Tunnel,
        to: &To,
        mut req: Request<Incoming>,
        policy: &RequestPolicy,
        out: &mut Outcome,
    ) -> Response<Body> {
        let upgrade = is_upgrade(&req);
        let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let mut retry = policy
            .retries
            .as_deref()
            .filter(|r| r.attempts > 0 && !upgrade);
        let replayable = body.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY);
        let (mut body, replay) = match retry {
            Some(_) if replayable => match body.collect().await {
                Ok(b) => (None, Some(b.to_bytes())),
                Err(e) => {
                    out.reason = Some(format!("reading the request body: {e}"));
                    return text(StatusCode::BAD_REQUEST, "bad request body");
                }
            },
            _ => (Some(body.boxed()), None),
        };
        if replay.is_none() {
            retry = None;
        }
        let mut backend = to.first.clone();
        let mut tried: Vec<Name> = Vec::new();
        loop {
            out.attempts += 1;
            out.backend = Some(backend.uid.clone());
            let body = match (&replay, body.take()) {
                (Some(bytes), _) => replayed(bytes.clone()),
                (None, Some(body)) => body,
                // Unreachable: without a replayable body there is one attempt.
                (None, None) => {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
                }
            };
            let head = if retry.is_some() {
                parts.clone()
            } else {
                std::mem::replace(&mut parts, Request::new(()).into_parts().0)
            };
            let result = self
                .attempt(
                    t,
                    &backend,
                    to.port,
                    Request::from_parts(head, body),
                    retry.and_then(|r| r.per_try_timeout),
                )
                .await;
            let attempt = match &result {
                Ok(r) => Attempt::Answered {
                    status: r.status().as_u16(),
                    grpc_status: r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                },
                Err(AttemptError::Forward(ForwardError::Http(_))) => Attempt::Reset,
                Err(AttemptError::Forward(_)) => Attempt::ConnectFailed,
                Err(AttemptError::PerTryTimeout(_)) => Attempt::PerTryTimeout,
            };
            if let (Some(d), Some(service)) = (&to.outlier, &to.service) {
                let failed = match attempt {
                    Attempt::Answered { status, .. } => status >= 500,
                    _ => true,
                };
                let of = service.endpoints.len();
                self.outliers.observe(d, &backend.uid, failed, of);
            }
            let again = retry.filter(|r| out.attempts <= r.attempts && r.on.retries(attempt));
            if again.is_some() {
                debug!(backend = %backend.uid, ?attempt, attempt_no = out.attempts, "retrying");
                tried.push(backend.uid.clone());
                tokio::time::sleep(backoff(out.attempts)).await;
                if let Some(next) = self.reroute(t, to, &parts, &tried) {
                    backend = next;
                }
                continue;
            }
            return match result {
                Ok(mut r) => {
                    if let (StatusCode::SWITCHING_PROTOCOLS, Some(down)) = (r.status(), downstream)
                    {
                        splice_upgrade(down, hyper::upgrade::on(&mut r));
                    } else {
                        strip_hop_by_hop(r.headers_mut(), false);
                    }
                    r.map(BodyExt::boxed)
                }
                Err(AttemptError::PerTryTimeout(limit)) => {
                    out.reason = Some(format!("per-try timeout ({limit:?})"));
                    text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                }
                Err(AttemptError::Forward(e)) => {
                    let reset = matches!(e, ForwardError::Http(_));
                    out.reason = Some(e.to_string());
                    let body = if reset { RESET } else { CONNECT_FAILURE };
                    text(StatusCode::SERVICE_UNAVAILABLE, body)
                }
            };
        }
    }

    /// One attempt: to `backend`'s address in the dialed family, until
    /// response headers or `per_try`.
    async fn attempt(
        &self,
        t: &Tunnel,
        backend: &Workload,
        port: u16,
        req: Request<Body>,
        per_try: Option<Duration>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let Some(ip) = pick_address(backend, t.target.ip(), IpFamilies::Automatic) else {
            let why = format!("{} has no address", backend.uid);
            return Err(AttemptError::Forward(ForwardError::Unreachable(why)));
        };
        let send = t
            .upstreams
            .send(self, t.src, SocketAddr::new(ip, port), req);
        match per_try {
            None => send.await.map_err(AttemptError::Forward),
            Some(limit) => match tokio::time::timeout(limit, send).await {
                Ok(r) => r.map_err(AttemptError::Forward),
                Err(_) => Err(AttemptError::PerTryTimeout(limit)),
            },
        }
    }

    /// The workload a retry goes to: the rule decides again, avoiding
    /// those already tried while others remain.
    fn reroute(
        &self,
        t: &Tunnel,
        to: &To,
        parts: &http::request::Parts,
        tried: &[Name],
    ) -> Option<Arc<Workload>> {
        let service = to.service.as_ref()?;
        let snap = self.state.snapshot();
        let head = Request::from_parts(parts.clone(), ());
        let mut avoid = match to.outlier {
            Some(_) => self.outliers.ejected(),
            None => Vec::new(),
        };
        avoid.extend_from_slice(tried);
        match snap.route_request(service, t.target.ip(), &head, &avoid).0 {
            L7Decision::Forward(w) => Some(w),
            _ => None,
        }
    }
}

enum AttemptError {
    Forward(ForwardError),
    PerTryTimeout(Duration),
}

fn replayed(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

/// Back-off before retry `n` (1-based): 25 ms doubling per retry, at most
/// 250 ms, a random part of it (full jitter, as Envoy).
fn backoff(n: u32) -> Duration {
    use rand::Rng;
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << n.min(4))
        .min(BACKOFF_BASE * 10);
    rand::rng().random_range(Duration::ZERO..=ceiling)
}
