//! ktgt node agent library.
//!
//! # Layout
//! - [`config`]: the API objects and the pure computation of the desired state (shared by
//!   both modes).
//! - [`kube`]: cluster mode: watches, the Target reconciler, status, Events.
//! - [`admin`]: the admin socket and `ktgt-agent ls` (both modes).
//! - [`metrics`]: what `/metrics` exports (both modes).

pub mod admin;
pub mod config;
pub mod kube;
pub mod metrics;
