//! Zeroed space ahead of a segment's last record, prepared off the ingest
//! path.
//!
//! Why: an `fdatasync` after appending to a file must also commit the new
//! blocks and the new file size (an ext4 journal commit); after overwriting
//! blocks that are already allocated and written it flushes data only.
//! Measured here for a 525 KB CT slice (`fdatasync` after each write):
//! 415–460 µs appended, 175–260 µs into zeroed space, also while the
//! zeroing of the next stretch runs alongside. So a background thread keeps
//! durable zeroed space ahead of each segment's end and writers overwrite
//! it. Nothing depends on the zeros for correctness: recovery stops at the
//! first incomplete record (zeros are one) and checks digests.
//!
//! What keeps the zeroer and the writers apart: an extension is planned
//! only after a record was made durable, while its segment is still held,
//! and it starts at or past both that record's end and the zeroed end. A
//! writer below the zeroed end needs no check; one going past it waits
//! while an extension in progress lies below its end.

use std::fs::File;
use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// The first extension of a segment; each next one is about as large as
/// the segment has grown, up to [`MAX_EXTENSION`]. (A gateway that stores a
/// few instances zeroes a few MiB, a busy one runs well ahead.)
const MIN_EXTENSION: u64 = 1 << 20;
const MAX_EXTENSION: u64 = 32 << 20;

/// One segment's zeroed space.
#[derive(Default)]
pub(super) struct Runway {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Space below this that no record uses is zeros on written blocks,
    /// durably.
    zeroed_to: u64,
    /// An extension is being zeroed from here.
    extending_from: Option<u64>,
}

impl Runway {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain integers behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes ending at or below this never meet an extension.
    pub(super) fn zeroed_to(&self) -> u64 {
        self.state().zeroed_to
    }

    /// Before a write ending at `end` past [`zeroed_to`](Self::zeroed_to):
    /// wait while an extension in progress starts below `end`. Returns the
    /// zeroed end after the wait.
    pub(super) fn clear_for(&self, end: u64) -> u64 {
        let mut state = self.state();
        while state.extending_from.is_some_and(|from| from < end) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.zeroed_to
    }

    /// The segment is cut back to `to`: wait for any extension, then forget
    /// the zeroed space past `to`.
    pub(super) fn cut(&self, to: u64) {
        let mut state = self.state();
        while state.extending_from.is_some() {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.zeroed_to = state.zeroed_to.min(to);
    }

    /// After the record ending at `end` is durable: the stretch to zero
    /// next (`from`, `len`), if the zeroed space ahead is short. Marks it
    /// in progress.
    fn plan(&self, end: u64) -> Option<(u64, u64)> {
        let mut state = self.state();
        if state.extending_from.is_some() {
            return None;
        }
        let len = end.next_power_of_two().clamp(MIN_EXTENSION, MAX_EXTENSION);
        if state.zeroed_to >= end.saturating_add(len) {
            return None;
        }
        // Without zeroed space ahead, leave the next writer a stretch to
        // append to while the zeroing runs, rather than have it wait.
        let from = if state.zeroed_to > end {
            state.zeroed_to
        } else {
            end + len / 4
        };
        state.extending_from = Some(from);
        Some((from, len))
    }

    fn finish(&self, zeroed_to: Option<u64>) {
        let mut state = self.state();
        state.extending_from = None;
        if let Some(to) = zeroed_to {
            state.zeroed_to = state.zeroed_to.max(to);
        }
        self.changed.notify_all();
    }
}

struct Extension {
    runway: Arc<Runway>,
    file: File,
    from: u64,
    len: u64,
}

/// The background thread that zeroes extensions, one at a time.
#[derive(Default)]
pub(super) struct Zeroer {
    jobs: Mutex<Option<Sender<Extension>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Zeroer {
    /// After the record ending at `end` in `file` is durable: zero more
    /// space ahead of it if there is little. Best effort: without it,
    /// writers append, which is slower, not less safe.
    pub(super) fn extend(&self, runway: &Arc<Runway>, file: &File, end: u64) {
        let Some((from, len)) = runway.plan(end) else {
            return;
        };
        let job = file.try_clone().map(|file| Extension {
            runway: Arc::clone(runway),
            file,
            from,
            len,
        });
        let sent = match job {
            Ok(job) => self.send(job),
            Err(_) => false,
        };
        if !sent {
            runway.finish(None);
        }
    }

    fn send(&self, job: Extension) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.is_none() {
            let (tx, rx) = mpsc::channel::<Extension>();
            let spawned = std::thread::Builder::new()
                .name("konsil-zeroer".into())
                .spawn(move || {
                    for job in rx {
                        let done = zero(&job);
                        if let Err(e) = &done {
                            tracing::debug!(error = %e, "cannot zero space ahead of a segment; writers append");
                        }
                        job.runway.finish(done.ok().map(|()| job.from + job.len));
                    }
                });
            match spawned {
                Ok(handle) => {
                    *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
                    *jobs = Some(tx);
                }
                Err(_) => return false,
            }
        }
        jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Finish the extensions in progress and stop the thread (a later
    /// [`extend`](Self::extend) starts it again).
    pub(super) fn stop(&self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Zeroer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn zero(job: &Extension) -> io::Result<()> {
    super::segments::write_zeros(&job.file, job.from, job.from + job.len)?;
    job.file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extensions_start_past_the_record_and_grow_with_the_segment() {
        let runway = Runway::default();
        // A new segment: the next writer gets a stretch to append to.
        let (from, len) = runway.plan(1000).unwrap();
        assert_eq!(len, MIN_EXTENSION);
        assert_eq!(from, 1000 + MIN_EXTENSION / 4);
        // One at a time.
        assert!(runway.plan(2000).is_none());
        runway.finish(Some(from + len));
        assert_eq!(runway.zeroed_to(), from + len);
        // Enough space ahead: nothing to do.
        assert!(runway.plan(2000).is_none());
        // Short of space: continue where the zeroed space ends, larger.
        let end = from + len - 10;
        let (next, next_len) = runway.plan(end).unwrap();
        assert_eq!(next, from + len);
        assert_eq!(next_len, end.next_power_of_two());
        // A failed extension changes nothing but releases waiters.
        runway.finish(None);
        assert_eq!(runway.zeroed_to(), from + len);
        assert_eq!(runway.clear_for(u64::MAX), from + len);
        runway.cut(100);
        assert_eq!(runway.zeroed_to(), 100);
        let huge = runway.plan(1 << 40).unwrap();
        assert_eq!(huge.1, MAX_EXTENSION);
    }

    #[test]
    fn the_zeroer_writes_durable_zeros_where_planned() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("seg"))
            .unwrap();
        file.write_all_at(&[7u8; 100], 0).unwrap();
        let runway = Arc::new(Runway::default());
        let zeroer = Zeroer::default();
        zeroer.extend(&runway, &file, 100);
        // A writer appending past the planned start waits for the zeroing.
        let zeroed = runway.clear_for(u64::MAX);
        assert_eq!(zeroed, 100 + MIN_EXTENSION / 4 + MIN_EXTENSION);
        assert_eq!(file.metadata().unwrap().len(), zeroed);
        let mut head = [0u8; 100];
        file.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, [7u8; 100], "the record before is untouched");
        zeroer.stop();
    }
}
