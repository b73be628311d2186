//! Port forwarding (`kubectl port-forward`): a TCP connection to a port of the pod's loopback,
//! carried on its own vsock connection to [`crate::FORWARD_PORT`].
//!
//! The host opens the connection and sends one line naming the port:
//!
//! ```text
//! TCP <port>\n
//! ```
//!
//! The agent connects to `127.0.0.1:<port>` in the VM's network namespace (the pod's) and
//! answers `OK\n` or `ERR <reason>\n` (then closes), as on the stdio port
//! ([`crate::stdio::Reply`]); after `OK` the connection carries the TCP stream's bytes both
//! ways, and a shutdown of either side's writing half is passed on.

/// Why a forward request line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("expected TCP <port> with a port from 1 to 65535, got {0:?}")]
    BadRequest(String),
}

/// The request line for `port`, newline included.
pub fn encode_request(port: u16) -> Vec<u8> {
    format!("TCP {port}\n").into_bytes()
}

/// The port a request line (without or with its newline) names.
pub fn parse_request(line: &[u8]) -> Result<u16, ForwardError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let bad = || ForwardError::BadRequest(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let digits = text.strip_prefix("TCP ").ok_or_else(bad)?;
    // Digits only: no sign, no spaces, no leading zeros to read two ways.
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if digits.starts_with('0') {
        return Err(bad());
    }
    digits.parse::<u16>().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        for port in [1, 80, 8080, 65535] {
            assert_eq!(parse_request(&encode_request(port)), Ok(port));
        }
        for bad in [
            &b"TCP 0\n"[..],
            b"TCP 65536",
            b"TCP 080",
            b"TCP -1",
            b"TCP +80",
            b"TCP  80",
            b"TCP 80 ",
            b"UDP 53",
            b"TCP",
            b"TCP \xff",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }
}
