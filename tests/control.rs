//! clusterctl end to end.
