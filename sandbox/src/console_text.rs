//! The end of a guest's console log, made fit to quote in an error message: only the last bytes
//! are read (the file is the guest's to fill), and terminal escape sequences and control
//! characters are dropped (the guest chooses every byte, and an error reaches a terminal).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// The last `n` bytes of the file at `path`, sanitized; empty if it cannot be read.
pub(crate) fn tail(path: &Path, n: u64) -> String {
    read_tail(path, n)
        .map(|bytes| printable(&bytes))
        .unwrap_or_default()
}

fn read_tail(path: &Path, n: u64) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
    let mut out = Vec::new();
    // A file still growing is read up to `n` bytes, no further.
    f.take(n).read_to_end(&mut out)?;
    Ok(out)
}

/// Where [`printable`] is within an escape sequence.
enum Escape {
    None,
    /// After ESC.
    Start,
    /// A control sequence (`ESC [` or CSI), up to its final byte.
    Csi,
    /// A string (OSC, DCS, SOS, PM, APC) up to BEL or the string terminator.
    Str,
    /// ESC inside a string: `\` ends it.
    StrEsc,
}

/// `bytes` as text without escape sequences or control characters other than newline and tab
/// (invalid UTF-8 becomes U+FFFD).
pub(crate) fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut state = Escape::None;
    for c in String::from_utf8_lossy(bytes).chars() {
        state = match state {
            Escape::None => match c {
                '\x1b' => Escape::Start,
                '\u{9b}' => Escape::Csi,
                '\u{90}' | '\u{98}' | '\u{9d}' | '\u{9e}' | '\u{9f}' => Escape::Str,
                '\n' | '\t' => {
                    out.push(c);
                    Escape::None
                }
                c if c.is_control() => Escape::None,
                c => {
                    out.push(c);
                    Escape::None
                }
            },
            Escape::Start => match c {
                '[' => Escape::Csi,
                ']' | 'P' | 'X' | '^' | '_' => Escape::Str,
                _ => Escape::None,
            },
            Escape::Csi if ('\x40'..='\x7e').contains(&c) => Escape::None,
            Escape::Csi => Escape::Csi,
            Escape::Str => match c {
                '\x07' | '\u{9c}' => Escape::None,
                '\x1b' => Escape::StrEsc,
                _ => Escape::Str,
            },
            Escape::StrEsc if c == '\\' => Escape::None,
            Escape::StrEsc => Escape::Str,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_are_dropped_text_kept() {
        let raw =
            b"ok \x1b[31mred\x1b[0m\r\n\x1b]0;title\x07tab\there\x1b]52;c;Zm9v\x1b\\ end\x07\x08\
                    \x1bcreset \xc2\x9b2Jc1 \xff\n";
        assert_eq!(printable(raw), "ok red\ntab\there endreset c1 \u{fffd}\n");
    }

    #[test]
    fn only_the_tail_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut text = vec![b'x'; 1 << 20];
        text.extend_from_slice(b"\nlast line\x1b[2J\n");
        std::fs::write(&p, &text).unwrap();
        let t = tail(&p, 15);
        assert_eq!(t, "\nlast line\n");
        assert_eq!(tail(&p, 4096).len(), 4096 - 4);
        assert_eq!(tail(&dir.path().join("missing"), 4096), "");
    }
}
