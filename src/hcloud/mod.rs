//! hcloud
