//! Out-of-memory kills: each container's cgroup `memory.events` is watched with inotify (the
//! kernel signals a modification whenever a counter changes); an increase of `oom_kill` becomes
//! an [`OomEvent`] queued for `GetOomEvent`.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use agent_protocol::agent::OomEvent;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

struct Watched {
    container_id: String,
    events: PathBuf,
    oom_kills: u64,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct OomWatcher {
    inotify: AsyncFd<InotifyFd>,
    watched: Mutex<HashMap<WatchDescriptor, Watched>>,
    tx: mpsc::UnboundedSender<OomEvent>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<OomEvent>>,
}

/// The `oom_kill` counter of a `memory.events` file.
pub fn oom_kills(events: &Path) -> u64 {
    std::fs::read_to_string(events)
        .ok()
        .and_then(|t| parse_oom_kill(&t))
        .unwrap_or(0)
}

fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

impl OomWatcher {
    pub fn new() -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Self {
            // SAFETY: the Inotify moves into the AsyncFd, which keeps its descriptor open.
            inotify: unsafe { AsyncFd::register(InotifyFd(inotify)) }
                .map_err(|e| e.into_parts().1)?,
            watched: Mutex::default(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    pub fn watch(&self, container_id: &str, events: &Path) -> std::io::Result<()> {
        let wd = self
            .inotify
            .get_ref()
            .0
            .add_watch(events, AddWatchFlags::IN_MODIFY)?;
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                wd,
                Watched {
                    container_id: container_id.to_string(),
                    events: events.to_path_buf(),
                    oom_kills: oom_kills(events),
                },
            );
        Ok(())
    }

    pub fn unwatch(&self, container_id: &str) {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let wds: Vec<WatchDescriptor> = w
            .iter()
            .filter(|(_, v)| v.container_id == container_id)
            .map(|(k, _)| *k)
            .collect();
        for wd in wds {
            w.remove(&wd);
            // The watch is gone already if the cgroup was removed.
            let _ = self.inotify.get_ref().0.rm_watch(wd);
        }
    }

    /// Re-reads the counters of `container_id` (also called when one of its processes exits,
    /// in case a notification raced with it).
    pub fn check(&self, container_id: &str) {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        for v in w.values_mut().filter(|v| v.container_id == container_id) {
            self.update(v);
        }
    }

    fn update(&self, v: &mut Watched) {
        let now = oom_kills(&v.events);
        if now > v.oom_kills {
            v.oom_kills = now;
            tracing::warn!(container = %v.container_id, oom_kills = now, "out-of-memory kill");
            let _ = self.tx.send(OomEvent {
                container_id: v.container_id.clone(),
                oom_kill_count: now,
                ..Default::default()
            });
        }
    }

    /// Runs forever, turning inotify events into OOM events.
    pub async fn run(&self) {
        loop {
            let mut guard = match self.inotify.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("inotify: {e}; OOM events stop");
                    return;
                }
            };
            let events = match guard.try_io(|i| i.get_ref().0.read_events().map_err(Into::into)) {
                Ok(Ok(events)) => events,
                Ok(Err(e)) => {
                    tracing::warn!("inotify read: {e}");
                    continue;
                }
                Err(_would_block) => continue,
            };
            let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            for ev in events {
                if let Some(v) = w.get_mut(&ev.wd) {
                    self.update(v);
                }
            }
        }
    }

    /// The next event (waits for one).
    pub async fn next(&self) -> Option<OomEvent> {
        self.rx.lock().await.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_events() {
        let text = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(text), Some(1));
        assert_eq!(parse_oom_kill("low 0\n"), None);
    }

    /// A modified watched file with a higher count queues one event.
    #[tokio::test]
    async fn a_rising_count_is_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "oom 0\noom_kill 0\n").unwrap();
        let w = std::sync::Arc::new(OomWatcher::new().unwrap());
        w.watch("c1", &events).unwrap();
        let runner = {
            let w = w.clone();
            tokio::spawn(async move { w.run().await })
        };
        std::fs::write(&events, "oom 1\noom_kill 1\n").unwrap();
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), w.next())
            .await
            .expect("an event")
            .unwrap();
        assert_eq!((ev.container_id.as_str(), ev.oom_kill_count), ("c1", 1));
        w.unwatch("c1");
        runner.abort();
    }
}
