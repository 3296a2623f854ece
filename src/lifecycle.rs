//! The supervisor state machine (pure).
