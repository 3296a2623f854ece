//! The daemon: the imperative shell around [`crate::lifecycle`].
