//! vps-controller: converges rows of the `subscriptions` table to Hetzner Cloud servers,
//! firewalls and SSH keys. See README.md for the tour; the folders name the parts:
//! `reconcile/` (desired state, observation, the pure planner, the executor),
//! `controller/` (queue, triggers, leader lease), `fencing.rs` (what a reconcile may do and
//! for how long), `hcloud/` (the API client),
//! `simulator/` (the built-in Hetzner Cloud API simulator), `db/` (entities and queries).

pub mod cloud_init;
pub mod config;
pub mod controller;
pub mod db;
pub mod fencing;
pub mod hcloud;
pub mod keys;
pub mod reconcile;
pub mod simulator;
pub mod telemetry;
