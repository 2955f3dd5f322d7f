//! TODO(owner: see issue) cloud_init
