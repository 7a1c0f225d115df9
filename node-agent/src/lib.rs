//! ktgt node agent library.

pub mod config;
