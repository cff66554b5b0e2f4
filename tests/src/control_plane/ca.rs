//! Test Istio CA server. (being written)
