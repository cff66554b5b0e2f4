//! stub
use std::sync::Arc; use std::path::PathBuf; use std::time::Duration; use crate::state::State;
#[derive(Debug, thiserror::Error)] #[error("stub")] pub struct LocalConfigError;
pub struct LocalSource;
impl LocalSource {
  pub fn new(_p: PathBuf, _s: Arc<State>, _d: Duration) -> Self { LocalSource }
  pub fn load_initial(&mut self) -> Result<(), LocalConfigError> { Ok(()) }
  pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) { shutdown.await }
}
