//! The ambient node agent: captures pod traffic, carries it in HBONE
//! (mutual TLS + HTTP/2 CONNECT) between nodes, and enforces identity-based
//! L4 policy. See `DESIGN.md` for the architecture; data flows
//! capture -> proxy -> (state, identity) -> hbone -> socket.

pub mod admin;
pub mod agent;
pub mod capture;
pub mod cli;
pub mod config;
pub mod copy;
pub mod demo;
pub mod dns;
pub mod fswatch;
pub mod gateway;
pub mod hbone;
pub mod heap;
pub mod identity;
pub mod proxy;
pub mod socket;
pub mod state;
pub mod waypoint;
pub mod xds;

#[cfg(test)]
mod test_heap;
