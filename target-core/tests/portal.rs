//! Scripted-initiator tests of the portal and sessions over a real loopback TCP socket.
//!
//! One integration binary (STYLE.md §8); each module scripts one area of RFC 7143 and quotes
//! the section it checks. `support` holds the target fixture, the initiator and PDU/CDB
//! builders.

#[path = "portal/support.rs"]
mod support;

#[path = "portal/commands.rs"]
mod commands;
#[path = "portal/hostile.rs"]
mod hostile;
#[path = "portal/lifecycle.rs"]
mod lifecycle;
#[path = "portal/login.rs"]
mod login;
#[path = "portal/memory.rs"]
mod memory;
#[path = "portal/polling.rs"]
mod polling;
#[path = "portal/portal_groups.rs"]
mod portal_groups;
#[path = "portal/reservations.rs"]
mod reservations;
#[path = "portal/resets.rs"]
mod resets;
#[path = "portal/window.rs"]
mod window;
#[path = "portal/writes.rs"]
mod writes;
