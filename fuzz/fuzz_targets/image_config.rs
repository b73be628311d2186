//! Image metadata from a hostile registry or archive: the manifest or index (and the platform
//! choice in an index), the image configuration, and `-u USER[:GROUP]` against the image's
//! /etc/passwd and /etc/group. The first byte picks which.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let _ = image::fuzzing::parse_manifest(rest);
        }
        1 => {
            let _ = image::fuzzing::parse_config(rest);
        }
        _ => {
            // passwd, group and the user spec, separated by NUL bytes.
            let text = String::from_utf8_lossy(rest);
            let mut parts = text.splitn(3, '\0');
            let passwd = parts.next().unwrap_or_default();
            let group = parts.next().unwrap_or_default();
            let spec = parts.next().unwrap_or_default();
            let _ = image::fuzzing::resolve_user(passwd, group, spec);
        }
    }
});
