//! IPC records on arbitrary bytes, decoded as the daemon decodes a worker's
//! record (`FromWorker`) and as a worker decodes clusterd's (`ToWorker`),
//! with `MAX_IPC_RECORD`: never panics, never `Ok` above the limit, and a
//! record that decodes re-encodes to one that decodes to the same message
//! (decode, encode, decode). The property tests `decode_*` and
//! `round_trip_*` in tests/props.rs check the same on stable.

#![no_main]

use std::fmt::Debug;

use clusterd::proto::{self, FromWorker, MAX_IPC_RECORD, ToWorker};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    match proto::decode::<T>(data, MAX_IPC_RECORD) {
        Ok(msg) => {
            assert!(data.len() <= MAX_IPC_RECORD);
            let again = proto::encode(&msg);
            // The encoding is the shortest one.
            assert!(again.len() <= data.len(), "{msg:?}");
            assert_eq!(
                proto::decode::<T>(&again, MAX_IPC_RECORD).as_ref(),
                Ok(&msg)
            );
        }
        Err(proto::Error::TooLarge { len, .. }) => assert!(len > MAX_IPC_RECORD),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    check::<FromWorker>(data);
    check::<ToWorker>(data);
});
