//! `config::parse_str` on arbitrary bytes, read as `config::load` reads a
//! file (lossy UTF-8): never panics; a config that parses is complete; every
//! error is on a line of the file (or 0 for the whole file), in line order.
//! The property test `config_arbitrary_bytes` in tests/props.rs checks the
//! same on stable.

#![no_main]

use std::path::Path;

use clusterd::config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count();
    // A usual path, and the degenerate ones (no folder, no stem).
    for path in ["/etc/clusterd/shop.conf", "", "/"] {
        match config::parse_str(&text, Path::new(path)) {
            Ok(c) => {
                assert!(!c.exec.is_empty() && !c.exec[0].is_empty(), "{c:?}");
                assert!(!c.listen.is_empty(), "{c:?}");
                assert!(c.restart_delay <= c.restart_delay_max, "{c:?}");
            }
            Err(errors) => {
                assert!(!errors.is_empty());
                for e in &errors {
                    assert!(e.line <= lines, "line {} of {lines}: {e:?}", e.line);
                }
                assert!(errors.is_sorted_by_key(|e| e.line), "{errors:?}");
            }
        }
    }
});
