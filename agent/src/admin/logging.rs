//! Run-time log level changes (`POST /logging?level=<filter>`): the binary
//! installs its subscriber through [`LogHandle::init`] (an `EnvFilter`
//! behind a `reload` layer) and hands the handle to the admin server.

use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::filter::ParseError;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

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
    /// lines on stdout) and returns the handle that changes its filter.
    pub fn init(level: &str, format: LogFormat) -> Result<LogHandle, LogError> {
        let filter = parse(level)?;
        let (layer, handle) = reload::Layer::new(filter);
        let registry = tracing_subscriber::registry().with(layer);
        match format {
            LogFormat::Text => registry.with(fmt::layer()).try_init(),
            LogFormat::Json => registry.with(fmt::layer().json()).try_init(),
        }
        .map_err(|e| LogError::Install(e.to_string()))?;
        Ok(LogHandle::new(handle, level))
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
