//! The control socket's framing on arbitrary bytes, read as the daemon reads
//! a request (header, `proto::frame_len`, body, `proto::decode`; see
//! `read_request` in src/daemon/control.rs) and as clusterctl reads a
//! response: never panics, never accepts more than the limit, and whatever
//! is read frames back to the same message (decode, encode, decode).
//! The property tests `read_frame_*` and `frame_*` in tests/props.rs check
//! the same on stable.

#![no_main]

use std::fmt::Debug;

use clusterd::proto::{self, FRAME_HEADER, MAX_REQUEST, MAX_RESPONSE, Request, Response};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One frame from the front of `stream`: the message and the bytes used, or
/// `None` if the stream ends first or the frame is refused.
fn read_frame<T: DeserializeOwned>(stream: &[u8], limit: usize) -> Option<(T, usize)> {
    let header: [u8; FRAME_HEADER] = stream.get(..FRAME_HEADER)?.try_into().unwrap();
    let len = match proto::frame_len(header, limit) {
        Ok(len) => len,
        Err(proto::Error::TooLarge { len, limit: l }) => {
            assert!(len > l && l == limit);
            return None;
        }
        Err(e) => panic!("frame_len: {e:?}"),
    };
    assert_eq!(len, u32::from_be_bytes(header) as usize);
    let body = stream.get(FRAME_HEADER..FRAME_HEADER + len)?;
    let msg = proto::decode(body, limit).ok()?;
    Some((msg, FRAME_HEADER + len))
}

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8], limit: usize) {
    if let Some((msg, used)) = read_frame::<T>(data, limit) {
        assert!(used <= data.len() && used - FRAME_HEADER <= limit);
        let again = proto::frame(&msg);
        let (back, back_used) = read_frame::<T>(&again, limit).expect("re-framed message");
        assert_eq!(back, msg);
        assert_eq!(back_used, again.len());
    }
    // The bytes as a bare record, too.
    if let Ok(msg) = proto::decode::<T>(data, limit) {
        assert!(data.len() <= limit);
        let again = proto::encode(&msg);
        assert!(again.len() <= data.len());
        assert_eq!(proto::decode::<T>(&again, limit).as_ref(), Ok(&msg));
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Request>(data, MAX_REQUEST);
    check::<Response>(data, MAX_RESPONSE);
});
