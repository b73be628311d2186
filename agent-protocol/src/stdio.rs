//! Stdio streams: how a process's stdin, stdout and stderr travel, each on its own vsock
//! connection to [`crate::STDIO_PORT`].
//!
//! The host opens the connection and sends one header line naming the process and the stream:
//!
//! ```text
//! STDIO <stream> <container-id> [<exec-id>]\n
//! ```
//!
//! `<stream>` is `stdin`, `stdout` or `stderr`; without `<exec-id>` the stream belongs to the
//! container's init process. The line is at most [`MAX_LINE`] bytes, newline included. The agent
//! answers with one line, `OK\n` or `ERR <reason>\n` (then closes), and after `OK` the
//! connection carries the raw bytes of the stream: host to guest for `stdin` (the host's
//! `shutdown(Write)` is the process's EOF), guest to host for `stdout` and `stderr` (the agent
//! closes them after the process's last byte, before `WaitProcess` answers).

use std::fmt;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest header or reply line, newline included.
pub const MAX_LINE: usize = 256;

/// One of a process's standard streams. In terminal mode the terminal's output travels as
/// `Stdout` and there is no `Stderr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

impl Stream {
    pub const ALL: [Stream; 3] = [Stream::Stdin, Stream::Stdout, Stream::Stderr];

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdin => "stdin",
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The header that opens a stdio stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    pub stream: Stream,
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
}

/// Why a header or reply line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the stream ended before the header line was complete")]
    Truncated,
    #[error("the header line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the header line is not UTF-8")]
    NotUtf8,
    #[error("the header line does not start with \"STDIO \"")]
    BadMagic,
    #[error("unknown stream {0:?} (expected stdin, stdout or stderr)")]
    BadStream(String),
    #[error("invalid id {0:?} (1 to 64 of A-Z a-z 0-9 _ . -)")]
    BadId(String),
    #[error("expected STDIO <stream> <container-id> [<exec-id>], got {0:?}")]
    BadShape(String),
    #[error("bad reply line {0:?}")]
    BadReply(String),
}

impl Header {
    pub fn new(stream: Stream, container_id: &str, exec_id: &str) -> Self {
        Self {
            stream,
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        }
    }

    /// The header line, newline included. Fails if an id is invalid.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        check_ids(&self.container_id, &self.exec_id)?;
        let mut line = format!("STDIO {} {}", self.stream, self.container_id);
        if !self.exec_id.is_empty() {
            line.push(' ');
            line.push_str(&self.exec_id);
        }
        line.push('\n');
        Ok(line.into_bytes())
    }

    /// Parses a header line (with or without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.len() >= MAX_LINE {
            return Err(HeaderError::TooLong);
        }
        let line = std::str::from_utf8(line).map_err(|_| HeaderError::NotUtf8)?;
        let rest = line.strip_prefix("STDIO ").ok_or(HeaderError::BadMagic)?;
        let words: Vec<&str> = rest.split(' ').collect();
        let (stream, cid, eid) = match words.as_slice() {
            [s, c] => (*s, *c, ""),
            [s, c, e] => (*s, *c, *e),
            _ => return Err(HeaderError::BadShape(line.to_string())),
        };
        let stream = match stream {
            "stdin" => Stream::Stdin,
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            other => return Err(HeaderError::BadStream(other.to_string())),
        };
        check_ids(cid, eid)?;
        Ok(Self::new(stream, cid, eid))
    }
}

/// The container id must be valid; the exec id empty (init) or valid.
fn check_ids(container_id: &str, exec_id: &str) -> Result<(), HeaderError> {
    if !crate::valid_id(container_id) {
        return Err(HeaderError::BadId(container_id.to_string()));
    }
    if !exec_id.is_empty() && !crate::valid_id(exec_id) {
        return Err(HeaderError::BadId(exec_id.to_string()));
    }
    Ok(())
}

/// The agent's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Err(String),
}

impl Reply {
    /// The reply line, newline included (an error message is cut to fit [`MAX_LINE`] and its
    /// newlines replaced).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Ok => b"OK\n".to_vec(),
            Reply::Err(why) => {
                let mut msg: String = why
                    .chars()
                    .map(|c| if c == '\n' { ' ' } else { c })
                    .collect();
                while msg.len() > MAX_LINE - 5 {
                    msg.pop();
                }
                format!("ERR {msg}\n").into_bytes()
            }
        }
    }

    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        if text == "OK" {
            Ok(Reply::Ok)
        } else if let Some(why) = text.strip_prefix("ERR ") {
            Ok(Reply::Err(why.to_string()))
        } else {
            Err(HeaderError::BadReply(text.into_owned()))
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes, newline included, one byte at a time so that
/// nothing after the newline is consumed. Returns the line without its newline.
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::with_capacity(64);
    loop {
        let mut b = [0u8; 1];
        if r.read(&mut b).await? == 0 {
            return Err(LineError::Header(HeaderError::Truncated));
        }
        if b[0] == b'\n' {
            return Ok(line);
        }
        line.push(b[0]);
        if line.len() >= MAX_LINE {
            return Err(LineError::Header(HeaderError::TooLong));
        }
    }
}

/// Reading a line failed.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Header(#[from] HeaderError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for h in [
            Header::new(Stream::Stdout, "c1", ""),
            Header::new(Stream::Stdin, "web.1", "exec-7"),
            Header::new(Stream::Stderr, &"x".repeat(64), &"y".repeat(64)),
        ] {
            let line = h.encode().unwrap();
            assert!(line.len() <= MAX_LINE);
            assert_eq!(Header::parse(&line).unwrap(), h);
        }
        assert_eq!(
            Header::new(Stream::Stdin, "c", "e").encode().unwrap(),
            b"STDIO stdin c e\n"
        );
        assert_eq!(
            Header::new(Stream::Stdout, "c", "").encode().unwrap(),
            b"STDIO stdout c\n"
        );
    }

    #[test]
    fn bad_headers_are_refused_precisely() {
        use HeaderError::*;
        let cases: &[(&[u8], HeaderError)] = &[
            (b"HELLO stdin c\n", BadMagic),
            (b"STDIO stdio c\n", BadStream("stdio".into())),
            (b"STDIO stdin\n", BadShape("STDIO stdin".into())),
            (b"STDIO stdin a b c\n", BadShape("STDIO stdin a b c".into())),
            (b"STDIO stdin  c\n", BadId("".into())),
            (b"STDIO stdin c/d\n", BadId("c/d".into())),
            (b"STDIO stdin .. e\n", BadId("..".into())),
            (b"STDIO stdin c e \n", BadShape("STDIO stdin c e ".into())),
            (b"STDIO stdin \xff\n", NotUtf8),
        ];
        for (line, want) in cases {
            assert_eq!(
                Header::parse(line).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let long = format!("STDIO stdin {}\n", "a".repeat(300));
        assert_eq!(Header::parse(long.as_bytes()), Err(TooLong));
        assert!(Header::new(Stream::Stdin, "", "").encode().is_err());
        assert!(Header::new(Stream::Stdin, "c", "a b").encode().is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(Reply::parse(&Reply::Ok.encode()).unwrap(), Reply::Ok);
        let e = Reply::Err("no such container c1\nsecond line".into());
        assert_eq!(
            Reply::parse(&e.encode()).unwrap(),
            Reply::Err("no such container c1 second line".into())
        );
        assert!(Reply::Err("x".repeat(1000)).encode().len() <= MAX_LINE);
        assert!(Reply::parse(b"WHAT\n").is_err());
    }

    #[tokio::test]
    async fn read_line_stops_at_the_newline() {
        let data: &[u8] = b"STDIO stdin c\nraw bytes after";
        let mut r = data;
        let line = read_line(&mut r).await.unwrap();
        assert_eq!(line, b"STDIO stdin c");
        assert_eq!(
            r, b"raw bytes after",
            "nothing after the newline was consumed"
        );

        let mut short: &[u8] = b"STDIO std";
        assert!(matches!(
            read_line(&mut short).await,
            Err(LineError::Header(HeaderError::Truncated))
        ));
        let long = vec![b'a'; 1000];
        assert!(matches!(
            read_line(&mut long.as_slice()).await,
            Err(LineError::Header(HeaderError::TooLong))
        ));
    }
}
