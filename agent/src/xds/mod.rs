//! Configuration sources that build the mesh model: the local YAML file
//! (local mode) and, later, Delta xDS from istiod.

pub mod delta;
pub mod local;
