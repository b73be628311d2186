//! Where the serial console's bytes go.

use std::io::Write;

/// A line-buffered sink for the serial console. vm-superio flushes after every byte; passing
/// that through would cost one `write(2)` per guest character, so we only write out whole lines
/// (or a full buffer), and everything left at exit.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
}

const CONSOLE_BUFFER: usize = 4096;

impl ConsoleWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(CONSOLE_BUFFER),
        }
    }

    /// Writes out whatever is buffered, even a partial line.
    pub fn flush_all(&mut self) -> std::io::Result<()> {
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.out.flush()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.last() == Some(&b'\n') || self.buf.len() >= CONSOLE_BUFFER {
            self.flush_all()?;
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
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
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
    }
}
