//! Test Delta xDS server. (being written)
