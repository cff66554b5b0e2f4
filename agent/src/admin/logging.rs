//! The process's logger and run-time level changes
//! (`POST /logging?level=<filter>`): the binary installs its subscriber
//! through [`LogHandle::init`] (an `EnvFilter` behind a `reload` layer) and
//! hands the handle to the admin server.
//!
//! In JSON, access-log lines (target [`ACCESS_TARGET`]) are written flat —
//! their fields at the top level, no span context — so each is one
//! self-contained object with stable keys; other lines keep their spans.

use std::sync::{Arc, Mutex, PoisonError};

use tracing::Subscriber;
use tracing_subscriber::filter::{filter_fn, ParseError};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;
use crate::proxy::record::ACCESS_TARGET;

/// A subscriber built by [`LogHandle::build`].
pub type BoxedSubscriber = Box<dyn Subscriber + Send + Sync>;

/// The reload handle of a filter sitting directly on the registry.
pub type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Why the log filter could not be installed or changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("bad log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: ParseError,
    },
    #[error("installing the logger: {0}")]
    Install(String),
    #[error("reloading the log filter: {0}")]
    Reload(#[from] reload::Error),
}

/// Changes the process's log filter. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LogHandle {
    handle: FilterHandle,
    current: Arc<Mutex<String>>,
}

impl LogHandle {
    /// Wraps the handle of a subscriber built elsewhere, whose filter is
    /// currently `current`.
    pub fn new(handle: FilterHandle, current: &str) -> Self {
        LogHandle {
            handle,
            current: Arc::new(Mutex::new(current.to_string())),
        }
    }

    /// Installs the process's subscriber (`level` filter, text or JSON
    /// lines on stdout, colours only on a terminal) and returns the handle
    /// that changes its filter.
    pub fn init(level: &str, format: LogFormat) -> Result<LogHandle, LogError> {
        use std::io::IsTerminal as _;
        let ansi = std::io::stdout().is_terminal();
        let (subscriber, handle) = LogHandle::build(level, format, ansi, std::io::stdout)?;
        subscriber
            .try_init()
            .map_err(|e| LogError::Install(e.to_string()))?;
        Ok(handle)
    }

    /// The subscriber [`LogHandle::init`] installs, writing to `writer`, and
    /// the handle that changes its filter; for a caller (a test) that
    /// installs it itself.
    pub fn build<W>(
        level: &str,
        format: LogFormat,
        ansi: bool,
        writer: W,
    ) -> Result<(BoxedSubscriber, LogHandle), LogError>
    where
        W: for<'w> MakeWriter<'w> + Clone + Send + Sync + 'static,
    {
        let (filter, handle) = reload::Layer::new(parse(level)?);
        let registry = tracing_subscriber::registry().with(filter);
        let is_access = |m: &tracing::Metadata<'_>| m.target() == ACCESS_TARGET;
        let subscriber: BoxedSubscriber = match format {
            LogFormat::Text => {
                Box::new(registry.with(fmt::layer().with_ansi(ansi).with_writer(writer)))
            }
            LogFormat::Json => Box::new(
                registry
                    .with(
                        fmt::layer()
                            .json()
                            .flatten_event(true)
                            .with_current_span(false)
                            .with_span_list(false)
                            .with_writer(writer.clone())
                            .with_filter(filter_fn(is_access)),
                    )
                    .with(
                        fmt::layer()
                            .json()
                            .with_writer(writer)
                            .with_filter(filter_fn(move |m| !is_access(m))),
                    ),
            ),
        };
        Ok((subscriber, LogHandle::new(handle, level)))
    }

    /// Replaces the filter, e.g. `debug` or `info,ambient_agent::proxy=trace`.
    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let parsed = parse(filter)?;
        self.handle.reload(parsed)?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = filter.to_string();
        Ok(())
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn parse(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(filter).map_err(|source| LogError::Filter {
        filter: filter.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filters_are_refused_and_good_ones_kept() {
        let (_layer, handle) = reload::Layer::<EnvFilter, Registry>::new(EnvFilter::new("info"));
        let log = LogHandle::new(handle, "info");
        assert!(matches!(
            log.set("ambient_agent=loud"),
            Err(LogError::Filter { .. })
        ));
        assert_eq!(log.current(), "info");
    }
}
