//! The agent-fleet test bed: everything the end-to-end tests, `make demo` and
//! `make bench` run against, on 127.0.0.1 with ephemeral ports. Nothing here
//! reaches AWS or Semaphore.

pub mod bed;
pub mod faults;
pub mod fleet;
pub mod github;
pub mod hub;
pub mod imds;
pub mod moto;
pub mod probe;
pub mod semaphore_wire;
