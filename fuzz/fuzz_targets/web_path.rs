//! Request paths of the signaling server's static files (`map_path`): no
//! path may climb out of the web root or reach a hidden file.
#![no_main]

use cocoon_signaling::web::{content_type, map_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(parts) = map_path(path) else {
        return;
    };
    assert!(!parts.is_empty());
    if path != "/" {
        // The parts are the path, nothing dropped or added.
        assert_eq!(format!("/{}", parts.join("/")), path);
    }
    for part in &parts {
        assert!(!part.is_empty(), "{path:?}");
        assert!(!part.starts_with('.'), "{path:?}: dot files, '.' and '..'");
        assert!(!part.contains(['/', '\\', '%', '\0']), "{path:?}");
        content_type(part);
    }
});
