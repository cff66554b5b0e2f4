//! Profiles on the admin endpoint, at ztunnel's paths and with its answers
//! (istio/ztunnel `src/admin.rs`), for `go tool pprof`:
//!
//! - `/debug/pprof/profile?seconds=&frequency=`: the process's CPU, sampled
//!   with pprof-rs (SIGPROF) for `seconds`, as an uncompressed pprof
//!   `Profile` protobuf. One at a time: the profiler is process-global.
//! - `/debug/pprof/heap`: jemalloc's heap profile (gzipped pprof), and
//!   `/debug/pprof/heap/profiling?activate=true|false` to start and stop
//!   its sampling. Only with the `jemalloc` feature; otherwise both answer
//!   500 `jemalloc not enabled`, as ztunnel does.
//!
//! This module owns the query parsing, the one-profile-at-a-time rule and
//! keeping the blocking parts (symbolizing, encoding, dumping) off the
//! runtime's workers.

use std::time::Duration;

use ::http::{Method, Response, StatusCode};
use tracing::info;

use super::http::{query_param, respond, text, Body};

/// The CPU profile's path.
pub const PROFILE_PATH: &str = "/debug/pprof/profile";
/// The heap profile's path.
pub const HEAP_PATH: &str = "/debug/pprof/heap";
/// Where heap profiling is switched on and off.
pub const HEAP_PROFILING_PATH: &str = "/debug/pprof/heap/profiling";

const DEFAULT_SECONDS: u64 = 10;
const SECONDS: std::ops::RangeInclusive<u64> = 1..=300;
/// Go's CPU profiler's rate, and ztunnel's default. Higher rates
/// under-report on a busy multi-core process: SIGPROF does not queue, so
/// expirations coalesce, and pprof-rs drops a sample that arrives while
/// another thread's handler holds its lock.
const DEFAULT_FREQUENCY: i32 = 100;
const FREQUENCY: std::ops::RangeInclusive<i32> = 1..=1000;

/// What to sample, from the query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuProfileParams {
    pub seconds: u64,
    /// Samples per second, in Hz.
    pub frequency: i32,
}

/// A query parameter out of range or not a number. The messages are
/// ztunnel's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("invalid seconds value; expected 1-300")]
    Seconds,
    #[error("invalid frequency value; expected 1-1000")]
    Frequency,
    #[error("invalid activate value {0:?}; expected true or false")]
    Activate(String),
}

impl CpuProfileParams {
    /// From `seconds` (default 10) and `frequency` (default 100).
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let seconds = match query_param(query, "seconds") {
            None => DEFAULT_SECONDS,
            Some(s) => s
                .parse()
                .ok()
                .filter(|s| SECONDS.contains(s))
                .ok_or(QueryError::Seconds)?,
        };
        let frequency = match query_param(query, "frequency") {
            None => DEFAULT_FREQUENCY,
            Some(f) => f
                .parse()
                .ok()
                .filter(|f| FREQUENCY.contains(f))
                .ok_or(QueryError::Frequency)?,
        };
        Ok(CpuProfileParams { seconds, frequency })
    }
}

/// `?activate=`: `Some` to switch heap profiling on or off, `None` to ask.
pub fn parse_activate(query: Option<&str>) -> Result<Option<bool>, QueryError> {
    match query_param(query, "activate").as_deref() {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(QueryError::Activate(other.to_string())),
    }
}

/// Why no CPU profile was taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("a CPU profile is already being taken; try again when it ends")]
    Busy,
    #[error("starting the CPU profiler: {0}")]
    Start(#[source] ::pprof::Error),
    #[error("building the CPU profile: {0}")]
    Report(#[source] ::pprof::Error),
    #[error("encoding the CPU profile: {0}")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the profiling task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Samples the process's CPU as `params` say and returns the pprof
/// `Profile`, encoded. Stops sampling early if dropped.
pub async fn cpu_profile(params: CpuProfileParams) -> Result<Vec<u8>, ProfileError> {
    let CpuProfileParams { seconds, frequency } = params;
    // Starting resolves a backtrace of its own first (pprof-rs warms its
    // unwinder up), and building the report symbolizes every sampled
    // frame: both block, so neither runs on a worker.
    let guard = tokio::task::spawn_blocking(move || {
        ::pprof::ProfilerGuardBuilder::default()
            .frequency(frequency)
            .build()
            .map_err(|e| match e {
                ::pprof::Error::Running => ProfileError::Busy,
                e => ProfileError::Start(e),
            })
    })
    .await??;
    info!(seconds, frequency, "taking a CPU profile");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    tokio::task::spawn_blocking(move || {
        use ::pprof::protos::Message as _;
        let report = guard.report().build().map_err(ProfileError::Report)?;
        // Stop sampling before the encoding, which is not worth profiling.
        drop(guard);
        let profile = report.pprof().map_err(ProfileError::Report)?;
        profile
            .write_to_bytes()
            .map_err(|e| ProfileError::Encode(e.into()))
    })
    .await?
}

/// `GET /debug/pprof/profile`.
pub async fn profile(method: &Method, query: Option<&str>) -> Response<Body> {
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let params = match CpuProfileParams::parse(query) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match cpu_profile(params).await {
        Ok(body) => respond(StatusCode::OK, "application/octet-stream", body),
        Err(e @ ProfileError::Busy) => text(StatusCode::CONFLICT, e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /debug/pprof/heap`.
pub async fn heap(method: &Method) -> Response<Body> {
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    jemalloc::heap().await
}

/// `GET` or `POST /debug/pprof/heap/profiling[?activate=true|false]`
/// (ztunnel takes either; `curl` sends `GET`).
pub async fn heap_profiling(method: &Method, query: Option<&str>) -> Response<Body> {
    if method != Method::GET && method != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
    }
    jemalloc::heap_profiling(query).await
}

/// A plain-text answer without the newline [`text`] adds: ztunnel's 500s
/// here have none.
fn bare(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

#[cfg(not(feature = "jemalloc"))]
mod jemalloc {
    use super::*;

    const NOT_ENABLED: &str = "jemalloc not enabled";

    pub async fn heap() -> Response<Body> {
        bare(StatusCode::INTERNAL_SERVER_ERROR, NOT_ENABLED)
    }

    pub async fn heap_profiling(_query: Option<&str>) -> Response<Body> {
        bare(StatusCode::INTERNAL_SERVER_ERROR, NOT_ENABLED)
    }
}

/// jemalloc built with `--enable-prof` (the `jemalloc` feature turns on
/// tikv-jemallocator's `profiling`); sampling also needs `prof:true` in
/// jemalloc's options when the process starts (`malloc_conf`, or
/// `_RJEM_MALLOC_CONF` in the environment), as ztunnel sets it.
#[cfg(feature = "jemalloc")]
mod jemalloc {
    use super::*;

    const NOT_ENABLED: &str = "heap profiling is not enabled; start the agent with jemalloc's \
                               prof:true, e.g. _RJEM_MALLOC_CONF=prof:true,prof_active:false";
    const NOT_ACTIVE: &str =
        "heap profiling not active; activate with /debug/pprof/heap/profiling?activate=true";

    pub async fn heap() -> Response<Body> {
        let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
            return bare(StatusCode::INTERNAL_SERVER_ERROR, NOT_ENABLED);
        };
        let mut ctl = ctl.clone().lock_owned().await;
        if !ctl.activated() {
            return bare(StatusCode::INTERNAL_SERVER_ERROR, NOT_ACTIVE);
        }
        // jemalloc writes the dump to a file, which is then read back and
        // symbolized: blocking work.
        match tokio::task::spawn_blocking(move || ctl.dump_pprof()).await {
            Ok(Ok(body)) => respond(StatusCode::OK, "application/octet-stream", body),
            Ok(Err(e)) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("dumping the heap profile: {e:#}"),
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the heap profiling task failed: {e}"),
            ),
        }
    }

    pub async fn heap_profiling(query: Option<&str>) -> Response<Body> {
        let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
            return bare(StatusCode::INTERNAL_SERVER_ERROR, NOT_ENABLED);
        };
        let activate = match parse_activate(query) {
            Ok(a) => a,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let mut ctl = ctl.lock().await;
        // A dump holds only allocations sampled while profiling was
        // active; deactivating also resets what was sampled.
        let changed = match activate {
            Some(true) => ctl.activate(),
            Some(false) => ctl.deactivate(),
            None => Ok(()),
        };
        if let Err(e) = changed {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("switching heap profiling: {e}"),
            );
        }
        if let Some(active) = activate {
            info!(active, "heap profiling switched over the admin endpoint");
        }
        text(
            StatusCode::OK,
            format!("heap profiling active: {}", ctl.activated()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_profile_params_are_ztunnels() {
        let ok = |seconds, frequency| Ok(CpuProfileParams { seconds, frequency });
        let cases: &[(Option<&str>, Result<CpuProfileParams, QueryError>)] = &[
            (None, ok(10, 100)),
            (Some(""), ok(10, 100)),
            (Some("seconds=1"), ok(1, 100)),
            (Some("seconds=300"), ok(300, 100)),
            (Some("frequency=1"), ok(10, 1)),
            (Some("frequency=1000&seconds=5"), ok(5, 1000)),
            (Some("debug=1&seconds=30"), ok(30, 100)),
            (Some("seconds=0"), Err(QueryError::Seconds)),
            (Some("seconds=301"), Err(QueryError::Seconds)),
            (Some("seconds=-1"), Err(QueryError::Seconds)),
            (Some("seconds="), Err(QueryError::Seconds)),
            (Some("seconds=1.5"), Err(QueryError::Seconds)),
            (Some("seconds=ten"), Err(QueryError::Seconds)),
            (
                Some("seconds=99999999999999999999"),
                Err(QueryError::Seconds),
            ),
            (Some("frequency=0"), Err(QueryError::Frequency)),
            (Some("frequency=1001"), Err(QueryError::Frequency)),
            (Some("frequency=-100"), Err(QueryError::Frequency)),
            (Some("frequency=3000000000"), Err(QueryError::Frequency)),
            (Some("frequency"), Err(QueryError::Frequency)),
            // Seconds are checked first, as ztunnel does.
            (Some("frequency=0&seconds=0"), Err(QueryError::Seconds)),
        ];
        for (query, want) in cases {
            assert_eq!(&CpuProfileParams::parse(*query), want, "{query:?}");
        }
    }

    #[test]
    fn query_errors_are_ztunnels_messages() {
        let cases = [
            (QueryError::Seconds, "invalid seconds value; expected 1-300"),
            (
                QueryError::Frequency,
                "invalid frequency value; expected 1-1000",
            ),
            (
                QueryError::Activate("yes".into()),
                "invalid activate value \"yes\"; expected true or false",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn activate_is_true_false_or_absent() {
        let bad = |v: &str| Err(QueryError::Activate(v.into()));
        let cases = [
            (None, Ok(None)),
            (Some("x=1"), Ok(None)),
            (Some("activate=true"), Ok(Some(true))),
            (Some("activate=false"), Ok(Some(false))),
            (Some("activate=TRUE"), bad("TRUE")),
            (Some("activate=1"), bad("1")),
            (Some("activate"), bad("")),
        ];
        for (query, want) in cases {
            assert_eq!(parse_activate(query), want, "{query:?}");
        }
    }

    #[cfg(not(feature = "jemalloc"))]
    #[tokio::test]
    async fn heap_without_jemalloc_is_ztunnels_500() {
        for response in [
            heap(&Method::GET).await,
            heap_profiling(&Method::GET, Some("activate=true")).await,
        ] {
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(&body[..], b"jemalloc not enabled");
        }
    }
}
