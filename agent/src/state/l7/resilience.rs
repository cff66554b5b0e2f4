//! What a rule asks of the waypoint around forwarding a request, beyond
//! where it goes: a timeout, retries and injected faults (Istio's
//! VirtualService `timeout`, `retries` and `fault`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Istio's retry conditions for a route whose `retries` leaves `retryOn`
/// out, and of its default policy (istiod's `defaultRetryOn`, with no
/// retriable status codes: pilot/pkg/networking/core/route/retry).
const ISTIO_DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// One rule's timeout, retries and faults, shared by every request it
/// decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Until the backend's response headers, retries included; then 504.
    pub timeout: Option<Duration>,
    pub retries: Option<Arc<RetryPolicy>>,
    pub fault: Option<Fault>,
}

impl RequestPolicy {
    /// What istiod gives a route that says nothing of retries, and a
    /// service's default route: [`RetryPolicy::istio_default`].
    pub fn istio_default() -> RequestPolicy {
        RequestPolicy {
            retries: Some(RetryPolicy::istio_default()),
            ..RequestPolicy::default()
        }
    }
}

/// When a waypoint leaves an endpoint out (Istio's DestinationRule
/// `outlierDetection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Failures in a row (5xx answers, or none) that eject.
    pub consecutive_errors: u32,
    /// Out for this long times the number of ejections so far.
    pub base_ejection_time: Duration,
    /// The most of a service's endpoints out at once, in percent.
    pub max_ejection_percent: u32,
}

/// Envoy's defaults, which Istio keeps: 5 errors, 30 s, 10%.
impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_errors: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// Envoy's `retry_policy` as Istio fills it in from `retries`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub attempts: u32,
    /// Each attempt's time to response headers; on expiry the attempt
    /// counts as a 504 (retried on `5xx` and `gateway-error`).
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

impl RetryPolicy {
    /// istiod's `DefaultPolicy`: 2 retries on [`ISTIO_DEFAULT_RETRY_ON`],
    /// each to another endpoint when there is one. Built once and shared
    /// (it is handed to every request of a route without retries).
    pub fn istio_default() -> Arc<RetryPolicy> {
        static DEFAULT: OnceLock<Arc<RetryPolicy>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                Arc::new(RetryPolicy {
                    attempts: 2,
                    per_try_timeout: None,
                    on: RetryOn::parse(ISTIO_DEFAULT_RETRY_ON).unwrap_or_default(),
                })
            })
            .clone()
    }
}

/// The conditions a failed attempt is retried on (Envoy's `retry_on`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer, a connect failure, a reset, a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504 (and a per-try timeout).
    pub gateway_error: bool,
    /// `connect-failure`: the backend could not be connected to.
    pub connect_failure: bool,
    /// `reset`: the connection or stream failed before response headers.
    pub reset: bool,
    /// `retriable-status-codes` (or bare codes in Istio's `retryOn`).
    pub status_codes: Vec<u16>,
    /// gRPC conditions: these `grpc-status` values in a trailers-only answer.
    pub grpc_statuses: Vec<u32>,
}

/// How one attempt ended, as far as retrying goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Response headers came; `grpc_status` if they carry one.
    Answered {
        status: u16,
        grpc_status: Option<u32>,
    },
    ConnectFailed,
    /// The connection or stream broke before response headers.
    Reset,
    PerTryTimeout,
}

/// Why a `retryOn` text cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown retry condition {0:?}")]
pub struct UnknownCondition(pub String);

impl RetryOn {
    /// Parses Istio's `retryOn`: Envoy's HTTP and gRPC conditions, comma
    /// separated, where a bare number is a retriable status code.
    pub fn parse(text: &str) -> Result<RetryOn, UnknownCondition> {
        let mut on = RetryOn::default();
        for cond in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" | "refused-stream" => on.reset = true,
                // The codes come as bare numbers beside it.
                "retriable-status-codes" => {}
                "cancelled" => on.grpc_statuses.push(1),
                "deadline-exceeded" => on.grpc_statuses.push(4),
                "resource-exhausted" => on.grpc_statuses.push(8),
                "internal" => on.grpc_statuses.push(13),
                "unavailable" => on.grpc_statuses.push(14),
                code => match code.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => on.status_codes.push(c),
                    _ => return Err(UnknownCondition(code.to_string())),
                },
            }
        }
        Ok(on)
    }

    /// Whether an attempt that ended so should be tried again.
    pub fn retries(&self, attempt: Attempt) -> bool {
        match attempt {
            Attempt::ConnectFailed => self.server_error || self.connect_failure,
            Attempt::Reset => self.server_error || self.reset,
            Attempt::PerTryTimeout => self.server_error || self.gateway_error,
            Attempt::Answered {
                status,
                grpc_status,
            } => {
                (self.server_error && (500..600).contains(&status))
                    || (self.gateway_error && matches!(status, 502..=504))
                    || self.status_codes.contains(&status)
                    || grpc_status.is_some_and(|g| self.grpc_statuses.contains(&g))
            }
        }
    }
}

/// Faults injected before a request is forwarded: a delay, then an abort,
/// each on a share of requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    /// HTTP status to answer with instead of forwarding.
    pub abort: Option<(u16, Share)>,
}

/// A share of requests, in millionths (Istio gives a percentage as a
/// double; Envoy a fraction of a million at most).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share(u32);

impl Share {
    pub const ALL: Share = Share(1_000_000);

    /// From a percentage in 0..=100; `None` outside it.
    pub fn percent(p: f64) -> Option<Share> {
        (0.0..=100.0)
            .contains(&p)
            .then(|| Share((p * 10_000.0).round() as u32))
    }

    pub fn per_million(self) -> u32 {
        self.0
    }

    /// Whether this request is among the share.
    pub fn draw(self) -> bool {
        use rand::Rng;
        self.0 >= 1_000_000 || rand::rng().random_range(0..1_000_000) < self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parses_istio_conditions() {
        let on = RetryOn::parse("5xx, connect-failure,retriable-status-codes,409,unavailable")
            .expect("valid");
        assert!(on.server_error && on.connect_failure && !on.gateway_error && !on.reset);
        assert_eq!(on.status_codes, [409]);
        assert_eq!(on.grpc_statuses, [14]);
        assert_eq!(
            RetryOn::parse("5xx,sometimes"),
            Err(UnknownCondition("sometimes".into()))
        );
        assert_eq!(RetryOn::parse("600"), Err(UnknownCondition("600".into())));
    }

    #[test]
    fn which_attempts_are_retried() {
        let answered = |status| Attempt::Answered {
            status,
            grpc_status: None,
        };
        let grpc = |g| Attempt::Answered {
            status: 200,
            grpc_status: Some(g),
        };
        // (retryOn, attempt, retried)
        let cases: &[(&str, Attempt, bool)] = &[
            ("5xx", answered(500), true),
            ("5xx", answered(503), true),
            ("5xx", answered(404), false),
            ("5xx", Attempt::ConnectFailed, true),
            ("5xx", Attempt::Reset, true),
            ("5xx", Attempt::PerTryTimeout, true),
            ("gateway-error", answered(500), false),
            ("gateway-error", answered(502), true),
            ("gateway-error", answered(504), true),
            ("gateway-error", Attempt::ConnectFailed, false),
            ("gateway-error", Attempt::PerTryTimeout, true),
            ("connect-failure", Attempt::ConnectFailed, true),
            ("connect-failure", Attempt::Reset, false),
            ("connect-failure", answered(503), false),
            ("reset", Attempt::Reset, true),
            ("reset", Attempt::PerTryTimeout, false),
            ("retriable-status-codes,409", answered(409), true),
            ("retriable-status-codes,409", answered(500), false),
            ("unavailable", grpc(14), true),
            ("unavailable", grpc(13), false),
            ("unavailable", answered(200), false),
            ("", answered(503), false),
        ];
        for (text, attempt, want) in cases {
            let on = RetryOn::parse(text).expect("valid");
            assert_eq!(on.retries(*attempt), *want, "{text:?} {attempt:?}");
        }
    }

    #[test]
    fn shares() {
        assert_eq!(Share::percent(100.0), Some(Share::ALL));
        assert_eq!(Share::percent(0.5).map(Share::per_million), Some(5_000));
        assert_eq!(Share::percent(100.1), None);
        assert_eq!(Share::percent(-1.0), None);
        assert!((0..1000).all(|_| Share::ALL.draw()));
        assert!((0..1000).all(|_| !Share(0).draw()));
        let some = (0..100_000).filter(|_| Share(250_000).draw()).count();
        // 25,000 expected; the standard deviation is about 137.
        assert!((24_000..=26_000).contains(&some), "{some}");
    }
}
