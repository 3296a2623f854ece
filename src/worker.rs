//! The worker side of the clusterd protocol.
