//! Parsing L1's serial console.
//!
//! Everything L1 prints arrives on one serial line (QEMU's `-serial stdio`): the kernel's messages,
//! `/init`'s own messages, and CMD's merged stdout and stderr. `/init` frames CMD's output with two
//! markers that carry a per-run nonce, so that CMD printing the marker text (say, a test that greps
//! this file) cannot fake an exit status:
//!
//! ```text
//! TESTBED-BEGIN <nonce>
//! ...CMD's output...
//! TESTBED-EXIT=<status> <nonce>
//! ```
//!
//! Only the text between the markers is CMD's. Within it, lines that look like kernel messages
//! (`[   12.345678] ...`) are dropped: the kernel runs with `quiet loglevel=1`, so only emergencies
//! should reach the console at all, but a stray one must not land in CMD's output.

use std::collections::VecDeque;

/// How many raw console lines are kept to explain a failed run.
pub(crate) const TAIL_LINES: usize = 30;

/// The marker `/init` prints just before starting CMD.
pub(crate) fn begin_marker(nonce: &str) -> String {
    format!("TESTBED-BEGIN {nonce}")
}

/// The start of the marker `/init` prints after CMD, followed by `<status> <nonce>`.
pub(crate) const EXIT_MARKER: &str = "TESTBED-EXIT=";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Kernel boot and `/init` setup: nothing is CMD's yet.
    Boot,
    /// Between the markers: CMD's output.
    Command,
    /// After the exit marker: shutdown noise.
    Done,
}

/// A line-by-line parser of L1's console (see the module documentation).
pub(crate) struct Console {
    begin: Vec<u8>,
    nonce: Vec<u8>,
    state: State,
    exit: Option<i32>,
    tail: VecDeque<Vec<u8>>,
}

impl Console {
    pub(crate) fn new(nonce: &str) -> Self {
        Console {
            begin: begin_marker(nonce).into_bytes(),
            nonce: nonce.as_bytes().to_vec(),
            state: State::Boot,
            exit: None,
            tail: VecDeque::with_capacity(TAIL_LINES),
        }
    }

    /// Feeds one raw line (with its `\n`, if it had one: the last line of the stream may not).
    /// Returns the bytes to show as CMD's output, if any.
    pub(crate) fn feed(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        // The tty's ONLCR turns every "\n" into "\r\n".
        let line: Vec<u8> = raw.iter().copied().filter(|&b| b != b'\r').collect();
        let (body, newline) = match line.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (&line[..], false),
        };
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(body.to_vec());

        match self.state {
            State::Boot => {
                if find(body, &self.begin).is_some() {
                    self.state = State::Command;
                }
                None
            }
            State::Command => {
                if let Some((pos, code)) = self.exit_marker(body) {
                    self.state = State::Done;
                    self.exit = Some(code);
                    // CMD's last line had no newline: the marker follows it on the same line.
                    return (pos > 0).then(|| body[..pos].to_vec());
                }
                if is_kernel_message(body) {
                    return None;
                }
                let mut out = body.to_vec();
                if newline {
                    out.push(b'\n');
                }
                Some(out)
            }
            State::Done => None,
        }
    }

    /// CMD's exit status, once the exit marker was seen.
    pub(crate) fn exit_code(&self) -> Option<i32> {
        self.exit
    }

    /// The last [`TAIL_LINES`] lines of the raw console, `\r` removed.
    pub(crate) fn tail(&self) -> impl Iterator<Item = &[u8]> {
        self.tail.iter().map(Vec::as_slice)
    }

    /// Finds `TESTBED-EXIT=<digits> <nonce>` ending the line; returns where it starts and the status.
    fn exit_marker(&self, line: &[u8]) -> Option<(usize, i32)> {
        let marker = EXIT_MARKER.as_bytes();
        let mut from = 0;
        while let Some(off) = find(&line[from..], marker) {
            let pos = from + off;
            let rest = &line[pos + marker.len()..];
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            let after = &rest[digits..];
            if digits > 0
                && after.first() == Some(&b' ')
                && after[1..].trim_ascii_end() == self.nonce.as_slice()
            {
                if let Some(code) = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|s| s.parse().ok())
                {
                    return Some((pos, code));
                }
            }
            from = pos + 1;
        }
        None
    }
}

/// Whether a console line looks like a kernel message: `[` spaces digits `.` digits `]`, as printed
/// with `CONFIG_PRINTK_TIME` (Debian's kernels have it).
pub(crate) fn is_kernel_message(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"[") else {
        return false;
    };
    let rest = rest.trim_ascii_start();
    let secs = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if secs == 0 {
        return false;
    }
    let Some(rest) = rest[secs..].strip_prefix(b".") else {
        return false;
    };
    let frac = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    frac > 0 && rest[frac..].first() == Some(&b']')
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "0123456789abcdef";

    /// Feeds a whole console transcript; returns what would be shown and the exit status.
    fn parse(transcript: &str) -> (String, Option<i32>) {
        let mut console = Console::new(NONCE);
        let mut shown = Vec::new();
        for line in transcript.split_inclusive('\n') {
            if let Some(out) = console.feed(line.as_bytes()) {
                shown.extend(out);
            }
        }
        (String::from_utf8(shown).unwrap(), console.exit_code())
    }

    #[test]
    fn kernel_message_shapes() {
        assert!(is_kernel_message(b"[    0.000000] Linux version 6.1.0"));
        assert!(is_kernel_message(b"[   12.345678] kvm: Unhandled WRMSR"));
        assert!(is_kernel_message(b"[12345.678901] x"));
        assert!(is_kernel_message(b"[    3.1]"));
        assert!(!is_kernel_message(b"[ok] test passed"));
        assert!(!is_kernel_message(b"[1, 2, 3]"));
        assert!(!is_kernel_message(b"[    ] 1.5"));
        assert!(!is_kernel_message(b" [    1.000000] indented"));
        assert!(!is_kernel_message(b"[12.] x"));
        assert!(!is_kernel_message(b""));
    }

    #[test]
    fn output_between_markers_with_kernel_noise_dropped() {
        let transcript = format!(
            "SeaBIOS (version 1.16)\r\n\
             [    0.000000] Linux version 6.1.0-56-amd64\r\n\
             Loading modules\r\n\
             \r\n\
             TESTBED-BEGIN {NONCE}\r\n\
             hello\r\n\
             [   12.345678] kvm: Unhandled WRMSR(0xc0010007)\r\n\
             \r\n\
             [ok] world\r\n\
             TESTBED-EXIT=7 {NONCE}\r\n\
             [   13.000000] reboot: Restarting system\r\n"
        );
        let (shown, code) = parse(&transcript);
        assert_eq!(shown, "hello\n\n[ok] world\n");
        assert_eq!(code, Some(7));
    }

    #[test]
    fn last_line_without_newline_keeps_its_text() {
        let transcript = format!("TESTBED-BEGIN {NONCE}\na b|c'd|TESTBED-EXIT=0 {NONCE}\n");
        assert_eq!(parse(&transcript), ("a b|c'd|".to_string(), Some(0)));
    }

    #[test]
    fn begin_marker_may_follow_other_text() {
        let transcript = format!(
            "[    1.0] x\r\ngarbageTESTBED-BEGIN {NONCE}\r\nout\r\nTESTBED-EXIT=255 {NONCE}\r\n"
        );
        assert_eq!(parse(&transcript), ("out\n".to_string(), Some(255)));
    }

    #[test]
    fn markers_with_another_nonce_are_output() {
        let transcript = format!(
            "TESTBED-BEGIN {NONCE}\n\
             TESTBED-EXIT=3 ffffffffffffffff\n\
             TESTBED-EXIT=3\n\
             TESTBED-EXIT= {NONCE}\n\
             TESTBED-EXIT=4 {NONCE}\n"
        );
        let (shown, code) = parse(&transcript);
        assert_eq!(
            shown,
            format!("TESTBED-EXIT=3 ffffffffffffffff\nTESTBED-EXIT=3\nTESTBED-EXIT= {NONCE}\n")
        );
        assert_eq!(code, Some(4));
    }

    #[test]
    fn nothing_before_begin_is_output() {
        let transcript = format!("TESTBED-EXIT=0 {NONCE}\nKernel panic - not syncing\n");
        assert_eq!(parse(&transcript), (String::new(), None));
    }

    #[test]
    fn died_without_exit_marker() {
        let transcript =
            format!("TESTBED-BEGIN {NONCE}\npartial output\n[    5.000000] Kernel panic\n");
        assert_eq!(parse(&transcript), ("partial output\n".to_string(), None));
    }

    #[test]
    fn tail_keeps_the_last_raw_lines() {
        let mut console = Console::new(NONCE);
        for i in 0..100 {
            console.feed(format!("[    {i}.000000] line {i}\r\n").as_bytes());
        }
        console.feed(b"no newline");
        let tail: Vec<String> = console
            .tail()
            .map(|l| String::from_utf8(l.to_vec()).unwrap())
            .collect();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "[    71.000000] line 71");
        assert_eq!(tail[TAIL_LINES - 1], "no newline");
    }

    #[test]
    fn partial_last_line_is_shown_without_a_newline() {
        let mut console = Console::new(NONCE);
        console.feed(format!("TESTBED-BEGIN {NONCE}\n").as_bytes());
        assert_eq!(console.feed(b"cut off"), Some(b"cut off".to_vec()));
        assert_eq!(console.exit_code(), None);
    }
}
