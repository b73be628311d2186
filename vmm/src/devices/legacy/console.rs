//! Where the serial console's bytes go.
//!
//! The guest writes as fast as it likes; the host's stdout may not be drained (a full pipe, a
//! non-blocking descriptor that says `EAGAIN`). The buffer is therefore bounded: at most
//! [`CONSOLE_BUFFER_MAX`] bytes wait, and
//!
//! * a write that does not fit drops the **newest** bytes (what did not fit), and
//! * a failed write to the host drops **everything buffered** (the host refused it; keeping it
//!   would only grow the backlog while the guest keeps writing),
//!
//! each counted ([`ConsoleWriter::dropped`]) and reported in a rate-limited warning. A console
//! that cannot be written never fails the guest's port write.

use std::io::{self, Write};

/// A line-buffered, bounded sink for the serial console. vm-superio flushes after every byte;
/// passing that through would cost one `write(2)` per guest character, so we only write out whole
/// lines (or a full buffer), and everything left at exit.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    dropped: u64,
}

/// Bytes written out at once when no newline comes.
const CONSOLE_FLUSH_AT: usize = 4096;
/// The most bytes the console holds for the host.
pub const CONSOLE_BUFFER_MAX: usize = 64 * 1024;

impl ConsoleWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(CONSOLE_FLUSH_AT),
            dropped: 0,
        }
    }

    /// Writes out whatever is buffered, even a partial line. On failure the buffer is dropped
    /// (and counted) and the error returned.
    pub fn flush_all(&mut self) -> io::Result<()> {
        let mut written = 0;
        let result = loop {
            if written == self.buf.len() {
                break self.out.flush();
            }
            match self.out.write(&self.buf[written..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = &result {
            let lost = self.buf.len() - written;
            self.drop_bytes(lost);
            guest_warn!(
                "serial console: the host did not take the guest's output ({e}); {lost} bytes \
                 dropped, {} in all",
                self.dropped
            );
        }
        self.buf.clear();
        result
    }

    /// Bytes of guest output dropped so far (buffer full, or the host refused them).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes waiting to be written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn drop_bytes(&mut self, n: usize) {
        self.dropped = self.dropped.saturating_add(n as u64);
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CONSOLE_BUFFER_MAX.saturating_sub(self.buf.len());
        let (kept, lost) = data.split_at(data.len().min(room));
        self.buf.extend_from_slice(kept);
        if !lost.is_empty() {
            self.drop_bytes(lost.len());
            guest_warn!(
                "serial console: buffer full ({CONSOLE_BUFFER_MAX} bytes); {} bytes of guest \
                 output dropped, {} in all",
                lost.len(),
                self.dropped
            );
        }
        // Taken, as far as the guest is concerned.
        Ok(data.len())
    }

    /// Writes out a complete line or a full chunk. A host that does not take it costs the
    /// buffered bytes, never an error for the guest's port write.
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.last() == Some(&b'\n') || self.buf.len() >= CONSOLE_FLUSH_AT {
            let _ = self.flush_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A host stdout that is never drained: a non-blocking pipe that is full.
    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn writes_whole_lines_and_the_rest_at_exit() {
        let sink = Shared::default();
        let mut w = ConsoleWriter::new(Box::new(sink.clone()));
        for b in b"hello" {
            w.write_all(&[*b]).unwrap();
            w.flush().unwrap();
        }
        assert!(sink.0.lock().unwrap().is_empty());
        w.write_all(b"\n").unwrap();
        w.flush().unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        w.write_all(b"tail").unwrap();
        w.flush_all().unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\ntail");
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn an_undrained_host_stdout_costs_bytes_not_memory() {
        let mut w = ConsoleWriter::new(Box::new(Full));
        // 64 MiB of guest output, a line at a time as a chatty guest writes it, flushed after
        // every write as vm-superio does.
        let line = [b'x'; 1023];
        for _ in 0..64 * 1024 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
            w.flush().unwrap();
            assert!(w.buffered() <= CONSOLE_BUFFER_MAX);
        }
        assert_eq!(w.buffered(), 0, "the failed write cleared the buffer");
        assert_eq!(w.dropped(), 64 << 20);
    }

    #[test]
    fn output_without_flushes_is_capped_and_the_newest_dropped() {
        let sink = Shared::default();
        let mut w = ConsoleWriter::new(Box::new(sink.clone()));
        w.write_all(b"first").unwrap();
        w.write_all(&[b'y'; 2 * CONSOLE_BUFFER_MAX]).unwrap();
        assert_eq!(w.buffered(), CONSOLE_BUFFER_MAX);
        assert_eq!(w.dropped(), (CONSOLE_BUFFER_MAX + 5) as u64);
        w.flush_all().unwrap();
        let out = sink.0.lock().unwrap();
        assert!(out.starts_with(b"first"), "the oldest bytes are kept");
        assert_eq!(out.len(), CONSOLE_BUFFER_MAX);
    }
}
