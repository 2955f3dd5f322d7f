//! TODO(owner: see issue) keys
