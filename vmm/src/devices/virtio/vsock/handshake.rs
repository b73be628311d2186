//! The host side's connection request: `CONNECT <port>\n`.
//!
//! Grammar, exactly: the ASCII bytes `CONNECT`, one or more spaces, 1 to 10 decimal digits whose
//! value fits in a `u32`, an optional `\r`, and `\n`; at most [`MAX_LINE`] bytes in all. The
//! reply, once the guest accepts, is `OK <local port>\n`.
//!
//! The line is fed one byte at a time, as it is read one byte at a time from the non-blocking
//! stream: that never consumes bytes past the newline (the client's first payload bytes stay in
//! the socket for the data path), costs at most [`MAX_LINE`] small reads once per connection,
//! and lets garbage be refused at its first wrong byte.

/// Longest accepted request line, newline included.
pub(super) const MAX_LINE: usize = 32;

const PREFIX: &[u8] = b"CONNECT";
const MAX_DIGITS: usize = 10;

/// Where a request line stands after a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Parse {
    /// Valid so far; more bytes needed.
    Incomplete,
    /// A complete, valid request for this guest port.
    Connect(u32),
    /// Not a valid request (garbage, bad port, too long).
    Invalid,
}

/// Accumulates a request line.
#[derive(Debug)]
pub(super) struct LineBuf {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl LineBuf {
    pub fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
        }
    }

    /// Adds one byte and says where the line stands. After `Connect` or `Invalid` the buffer
    /// should not be fed again.
    pub fn feed(&mut self, b: u8) -> Parse {
        if self.len == MAX_LINE {
            return Parse::Invalid;
        }
        self.buf[self.len] = b;
        self.len += 1;
        parse(&self.buf[..self.len])
    }
}

/// Parses a (possibly partial) request line.
pub(super) fn parse(line: &[u8]) -> Parse {
    match parse_unbounded(line) {
        // No room left for the rest of the line.
        Parse::Incomplete if line.len() >= MAX_LINE => Parse::Invalid,
        Parse::Connect(_) if line.len() > MAX_LINE => Parse::Invalid,
        p => p,
    }
}

fn parse_unbounded(line: &[u8]) -> Parse {
    // The fixed prefix, possibly still arriving.
    let n = line.len().min(PREFIX.len());
    if line[..n] != PREFIX[..n] {
        return Parse::Invalid;
    }
    let rest = &line[n..];
    if n < PREFIX.len() {
        return Parse::Incomplete;
    }
    // One or more spaces.
    let spaces = rest.iter().take_while(|&&b| b == b' ').count();
    let rest = &rest[spaces..];
    if rest.is_empty() {
        return Parse::Incomplete;
    }
    if spaces == 0 {
        return Parse::Invalid;
    }
    // Digits.
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > MAX_DIGITS {
        return Parse::Invalid;
    }
    let (num, rest) = rest.split_at(digits);
    let port = num.iter().try_fold(0u32, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
    });
    let Some(port) = port else {
        return Parse::Invalid;
    };
    // Optional CR, then LF.
    match rest {
        [] => Parse::Incomplete,
        _ if digits == 0 => Parse::Invalid,
        [b'\n'] => Parse::Connect(port),
        [b'\r'] => Parse::Incomplete,
        [b'\r', b'\n'] => Parse::Connect(port),
        _ => Parse::Invalid,
    }
}

/// Formats the success reply into `buf`, returning its length.
pub(super) fn ok_reply(local_port: u32, buf: &mut [u8; 16]) -> usize {
    use std::io::Write;
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    // "OK 4294967295\n" is 14 bytes: always fits.
    let _ = writeln!(cur, "OK {local_port}");
    cur.position() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(bytes: &[u8]) -> Vec<Parse> {
        let mut lb = LineBuf::new();
        bytes.iter().map(|&b| lb.feed(b)).collect()
    }

    #[test]
    fn good_lines() {
        assert_eq!(parse(b"CONNECT 1234\n"), Parse::Connect(1234));
        assert_eq!(parse(b"CONNECT 0\n"), Parse::Connect(0));
        assert_eq!(parse(b"CONNECT   52\r\n"), Parse::Connect(52));
        assert_eq!(parse(b"CONNECT 4294967295\n"), Parse::Connect(u32::MAX));
        assert_eq!(parse(b"CONNECT 0000000007\n"), Parse::Connect(7));
    }

    #[test]
    fn partial_arrival_is_incomplete_until_the_newline() {
        let line = b"CONNECT 1234\n";
        let results = feed_all(line);
        let (last, before) = results.split_last().unwrap();
        assert!(before.iter().all(|&p| p == Parse::Incomplete), "{before:?}");
        assert_eq!(*last, Parse::Connect(1234));
        for cut in 0..line.len() {
            assert_eq!(parse(&line[..cut]), Parse::Incomplete, "cut at {cut}");
        }
        assert_eq!(parse(b"CONNECT 12\r"), Parse::Incomplete);
    }

    #[test]
    fn garbage_is_refused_at_the_first_wrong_byte() {
        assert_eq!(parse(b"G"), Parse::Invalid);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parse::Invalid);
        assert_eq!(parse(b"connect 5\n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECTX"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT5\n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT \n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT 12a\n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT 12 \n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT 12\r\r"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT -1\n"), Parse::Invalid);
        let results = feed_all(b"CONNEXT 1\n");
        assert_eq!(results[5], Parse::Invalid);
    }

    #[test]
    fn bad_ports_are_refused() {
        assert_eq!(parse(b"CONNECT 4294967296\n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT 99999999999\n"), Parse::Invalid);
        assert_eq!(parse(b"CONNECT 00000000001\n"), Parse::Invalid, "11 digits");
    }

    #[test]
    fn overlong_lines_are_refused() {
        // Valid so far, but no newline within MAX_LINE bytes.
        let mut line = b"CONNECT".to_vec();
        line.resize(MAX_LINE, b' ');
        let results = feed_all(&line);
        assert_eq!(results[MAX_LINE - 2], Parse::Incomplete);
        assert_eq!(results[MAX_LINE - 1], Parse::Invalid);
        let mut lb = LineBuf::new();
        for &b in &line {
            lb.feed(b);
        }
        assert_eq!(lb.feed(b'\n'), Parse::Invalid, "no byte past MAX_LINE");
        // A number ending exactly at the limit leaves no room for the newline.
        let mut line = b"CONNECT".to_vec();
        line.resize(MAX_LINE - 1, b' ');
        line.push(b'1');
        assert_eq!(parse(&line), Parse::Invalid);
    }

    #[test]
    fn ok_reply_format() {
        let mut b = [0u8; 16];
        let n = ok_reply(1 << 30, &mut b);
        assert_eq!(&b[..n], b"OK 1073741824\n");
        let n = ok_reply(u32::MAX, &mut b);
        assert_eq!(&b[..n], b"OK 4294967295\n");
    }
}
