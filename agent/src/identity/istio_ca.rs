//! Client of the Istio CA. (being written)
