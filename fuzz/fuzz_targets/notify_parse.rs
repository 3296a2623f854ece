//! `notify::parse` (sd_notify datagrams from `protocol = systemd` workers) on
//! arbitrary bytes: never panics, and returns fields only if the datagram is
//! UTF-8 and every non-empty line is `KEY=VALUE` (KEY of `A-Z`, `0-9`, `_`);
//! the fields written back parse to the same fields. The property tests
//! `notify_*` in tests/props.rs check the same on stable.

#![no_main]

use clusterd::daemon::notify;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(fields) = notify::parse(data) else {
        return;
    };
    let text = std::str::from_utf8(data).expect("Some for invalid UTF-8");
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
    assert!(!fields.is_empty());
    assert_eq!(fields.len(), lines.len());
    for ((key, value), line) in fields.iter().zip(&lines) {
        assert!(!key.is_empty());
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "{key:?}"
        );
        assert_eq!(format!("{key}={value}"), *line);
    }
    let back: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(notify::parse(back.join("\n").as_bytes()), Some(fields));
});
