//! TODO(owner: see issue) config
