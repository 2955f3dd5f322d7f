//! sea-orm entities for the controller's tables.

pub mod event;
pub mod lease;
pub mod subscription;
pub mod subscription_deletion;
