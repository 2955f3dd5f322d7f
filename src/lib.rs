//! vps-controller: converges rows of the `subscriptions` table to Hetzner Cloud servers,
//! firewalls and SSH keys. See README.md for the tour; the folders name the parts:
//! `reconcile/` (desired state, observation, the pure planner, the executor),
//! `controller/` (queue, triggers, leader lease), `fencing.rs` (what a reconcile may do and
//! for how long), `hcloud/` (the API client), `db/` (entities and queries). The Hetzner Cloud API
//! simulator is the workspace crate `hcloud-simulator` (`simulator/`), re-exported as [`simulator`].

pub mod cloud_init;
pub mod config;
pub mod controller;
pub mod db;
pub mod fencing;
pub mod hcloud;
pub mod keys;
pub mod reconcile;
pub mod ssh;
pub mod telemetry;

/// The Hetzner Cloud API simulator (its own crate, so it cannot use controller code).
pub use hcloud_simulator as simulator;
