//! Load generation for clusterd tests and benchmarks.
