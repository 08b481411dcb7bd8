//! The embedded blob store: append-only segment files under
//! `<data_dir>/segments`.
//!
//! Why segments and not one file per instance: making a new file durable
//! costs an inode allocation, a rename and a directory fsync on top of the
//! data fsync; appending to a file this writer owns costs one `fdatasync`.
//! That is what lets durable ingest keep up with receivers that do not sync.
//!
//! Each writer holds one segment exclusively (a pool hands them out), so a
//! record is contiguous. A record is
//!
//! ```text
//! "KNSLREC1" | payload length (u64 LE, 0 until committed) | payload
//!            | label length (u32 LE) | label | "KNSLEND1"
//! ```
//!
//! The payload is the object (for DICOM: preamble, file meta, data set). A
//! record is complete only when its length is set and its end marker is in
//! place; recovery truncates a segment at its first incomplete record, so an
//! unfinished object never survives a restart. Discarding an object truncates
//! the segment back to where the record began.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::runway::{Runway, Zeroer};
use super::{
    BlobError, BlobLocation, BlobStore, BlobWrite, CommittedBlob, ReadSeek, RecoveredBlob,
    Recovery, SealedBlob,
};

const RECORD_MAGIC: &[u8; 8] = b"KNSLREC1";
const END_MAGIC: &[u8; 8] = b"KNSLEND1";
/// Replaces [`RECORD_MAGIC`] when retention discards a record: the record
/// keeps its length (so a scan steps over it) but is never recovered.
const DISCARDED_MAGIC: &[u8; 8] = b"KNSLDEL1";
const HEADER_LEN: u64 = 16;
/// Present while no process writes to the store and everything in it is
/// durable: written at a clean shutdown, removed (durably) when a process
/// opens the store.
const CLEAN_MARK: &str = "clean-shutdown";
/// `open-<pid>`: present while that process has the store open, so that a
/// process closing cleanly can tell whether another (`serve` and `konsil
/// import` side by side) may still write, even before that one has a
/// segment of its own.
const OPEN_PREFIX: &str = "open-";
/// A segment past this size takes no new records.
const DEFAULT_SEGMENT_LIMIT: u64 = 1 << 30;

/// Blobs as records in append-only segment files.
pub struct SegmentStore {
    dir: PathBuf,
    pool: Arc<Pool>,
    /// Names are `<start time>-<pid>-<n>.seg`: unique per process run.
    prefix: String,
    counter: AtomicU64,
    /// The clean-shutdown mark was missing when the store was opened.
    after_crash: bool,
}

/// What writers share with the store.
struct Pool {
    /// Segments not held by a writer.
    idle: Mutex<Vec<Segment>>,
    zeroer: Zeroer,
    /// A segment past this size takes no new records.
    segment_limit: u64,
}

impl Pool {
    /// A segment whose record is durable (or was withdrawn) goes back.
    fn put_back(&self, segment: Segment) {
        if segment.len < self.segment_limit {
            self.zeroer
                .extend(&segment.runway, &segment.file, segment.len);
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(segment);
        }
    }
}

struct Segment {
    name: String,
    file: File,
    /// Where the next record starts.
    len: u64,
    runway: Arc<Runway>,
}

impl SegmentStore {
    /// Open (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> io::Result<SegmentStore> {
        let dir = data_dir.join("segments");
        fs::create_dir_all(&dir)?;
        let after_crash = match fs::remove_file(dir.join(CLEAN_MARK)) {
            Ok(()) => {
                // Durably gone before anything is written, or a crash
                // during this run would look like a clean shutdown.
                sync_dir(&dir)?;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
        };
        // Presence marks of processes that are gone (a crash) go; ours comes.
        for (pid, path) in open_marks(&dir)? {
            if !super::process_alive(pid) {
                let _ = fs::remove_file(path);
            }
        }
        File::create(dir.join(format!("{OPEN_PREFIX}{}", std::process::id())))?;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Ok(SegmentStore {
            dir,
            pool: Arc::new(Pool {
                idle: Mutex::new(Vec::new()),
                zeroer: Zeroer::default(),
                segment_limit: DEFAULT_SEGMENT_LIMIT,
            }),
            prefix: format!("{started}-{}", std::process::id()),
            counter: AtomicU64::new(0),
            after_crash,
        })
    }

    fn take_segment(&self) -> Result<Segment, BlobError> {
        let reusable = self
            .pool
            .idle
            .lock()
            .map_err(|_| BlobError::Create(io::Error::other("segment pool poisoned")))?
            .pop();
        match reusable {
            Some(segment) if segment.len < self.pool.segment_limit => Ok(segment),
            _ => self.new_segment(),
        }
    }

    fn new_segment(&self) -> Result<Segment, BlobError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n:06}.seg", self.prefix);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(&name))
            .map_err(BlobError::Create)?;
        // The new name must survive a crash before any record in it is
        // acknowledged; this happens once per segment, not per object.
        sync_dir(&self.dir).map_err(BlobError::Create)?;
        Ok(Segment {
            name,
            file,
            len: 0,
            runway: Arc::new(Runway::default()),
        })
    }
}

impl BlobStore for SegmentStore {
    fn begin(&self) -> Result<Box<dyn BlobWrite>, BlobError> {
        let segment = self.take_segment()?;
        let start = segment.len;
        let mut writer = SegmentWriter {
            zeroed_to: segment.runway.zeroed_to(),
            segment: Some(segment),
            pool: Arc::clone(&self.pool),
            record_start: start,
            payload_len: 0,
        };
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(RECORD_MAGIC);
        if let Err(e) = writer.write_at(start, &header) {
            // Leave the segment out of the pool: its tail is unknown.
            writer.segment = None;
            return Err(BlobError::Write(e));
        }
        Ok(Box::new(writer))
    }

    fn open(&self, location: &BlobLocation) -> Result<Box<dyn ReadSeek>, BlobError> {
        let open_err = |source| BlobError::Open {
            object: location.object.clone(),
            source,
        };
        if !is_segment_name(&location.object) {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a segment name",
            )));
        }
        let file = File::open(self.dir.join(&location.object)).map_err(open_err)?;
        let end = location
            .offset
            .checked_add(location.length)
            .ok_or_else(|| {
                open_err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "range overflows",
                ))
            })?;
        Ok(Box::new(Window {
            file,
            start: location.offset,
            end,
            pos: location.offset,
        }))
    }

    fn recover(&self, resume_at: &HashMap<String, u64>) -> Result<Recovery, BlobError> {
        let mut recovery = Recovery {
            after_crash: self.after_crash,
            ..Recovery::default()
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(BlobError::Recover)? {
            let entry = entry.map_err(BlobError::Recover)?;
            if let Some(name) = entry.file_name().to_str() {
                if is_segment_name(name) {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        for name in names {
            // A segment of another live process (an import next to us) is
            // that process's business.
            if owner_pid(&name)
                .is_some_and(|pid| pid != std::process::id() && super::process_alive(pid))
            {
                continue;
            }
            let start = resume_at.get(&name).copied().unwrap_or(0);
            scan_segment(&self.dir.join(&name), &name, start, &mut recovery)
                .map_err(BlobError::Recover)?;
        }
        Ok(recovery)
    }

    fn discard(&self, location: &BlobLocation) -> Result<(), BlobError> {
        let fail = |source| BlobError::Retract(source);
        let invalid = |why: &str| fail(io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()));
        if !is_segment_name(&location.object) || location.offset < HEADER_LEN {
            return Err(invalid("not a record of this store"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(&location.object))
            .map_err(fail)?;
        let at = location.offset - HEADER_LEN;
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, at).map_err(fail)?;
        let payload_len = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let magic = &header[..8];
        if (magic != RECORD_MAGIC && magic != DISCARDED_MAGIC) || payload_len != location.length {
            return Err(invalid("the location is not a whole record"));
        }
        file.write_all_at(DISCARDED_MAGIC, at).map_err(fail)?;
        // Give the space back where the file system can; else overwrite.
        let punched = rustix::fs::fallocate(
            &file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            location.offset,
            location.length,
        );
        if punched.is_err() {
            write_zeros(&file, location.offset, location.offset + location.length).map_err(fail)?;
        }
        file.sync_data().map_err(fail)
    }

    fn close(&self) -> Result<(), BlobError> {
        let fail = BlobError::Sync;
        // No zeroed space is left behind: the next start would have to
        // tell it from an unfinished record.
        self.pool.zeroer.stop();
        if let Ok(idle) = self.pool.idle.lock() {
            for segment in idle.iter() {
                segment.runway.cut(segment.len);
                segment.file.set_len(segment.len).map_err(fail)?;
            }
        }
        let ours = std::process::id();
        let _ = fs::remove_file(self.dir.join(format!("{OPEN_PREFIX}{ours}")));
        // Another live process (`serve`, an import) may still be writing.
        if open_marks(&self.dir)
            .map_err(fail)?
            .iter()
            .any(|(pid, _)| *pid != ours && super::process_alive(*pid))
        {
            return Ok(());
        }
        // Whatever is still being written back reaches the disk now.
        let dir = File::open(&self.dir).map_err(fail)?;
        rustix::fs::syncfs(&dir).map_err(|e| fail(e.into()))?;
        File::create(self.dir.join(CLEAN_MARK)).map_err(fail)?;
        sync_dir(&self.dir).map_err(fail)
    }

    fn ping(&self) -> Result<(), BlobError> {
        match fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(BlobError::Open {
                object: String::new(),
                source: io::Error::other("segments is not a directory"),
            }),
            Err(source) => Err(BlobError::Open {
                object: String::new(),
                source,
            }),
        }
    }
}

/// Walk the records of one segment from `start`; truncate at the first
/// incomplete one.
fn scan_segment(path: &Path, name: &str, start: u64, recovery: &mut Recovery) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    let mut at = start.min(len);
    // The recovery point must be a record boundary. If it is not (an index
    // older or newer than this segment), walk from the start rather than
    // truncate good records: re-indexing them is idempotent.
    if at > 0 && at < len && !starts_record(&file, at, len)? {
        tracing::warn!(
            segment = name,
            resume_at = start,
            "recovery point is not a record boundary; rescanning the segment"
        );
        at = 0;
    }
    while at < len {
        match read_record(&file, at, len)? {
            Some(Record {
                end,
                discarded: true,
                ..
            }) => at = end,
            Some(Record {
                payload_len,
                label,
                end,
                ..
            }) => {
                recovery.unindexed.push(RecoveredBlob {
                    location: BlobLocation {
                        object: name.to_owned(),
                        offset: at + HEADER_LEN,
                        length: payload_len,
                    },
                    resume_at: end,
                    label,
                });
                at = end;
            }
            None => break,
        }
    }
    if at < len {
        // Zeroed space ahead of the last record (a crash before it was
        // trimmed) is no unfinished object; a record header is never zero.
        if !zeroed_from(&file, at, len)? {
            recovery.discarded_bytes += len - at;
        }
        file.set_len(at)?;
        file.sync_all()?;
    }
    if at == 0 {
        // Nothing in it (zeroed ahead, never used): gone, not kept empty.
        fs::remove_file(path)?;
    }
    Ok(())
}

/// Whether the record header at `at` is all zeros.
fn zeroed_from(file: &File, at: u64, len: u64) -> io::Result<bool> {
    let mut header = [0u8; HEADER_LEN as usize];
    let n = (len - at).min(HEADER_LEN) as usize;
    file.read_exact_at(&mut header[..n], at)?;
    Ok(header[..n].iter().all(|b| *b == 0))
}

/// Whether a record header (complete or not) starts at `at`.
fn starts_record(file: &File, at: u64, len: u64) -> io::Result<bool> {
    if at + 8 > len {
        return Ok(false);
    }
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, at)?;
    Ok(&magic == RECORD_MAGIC || &magic == DISCARDED_MAGIC)
}

/// A complete record found by a scan.
struct Record {
    payload_len: u64,
    label: Vec<u8>,
    /// Offset just past the record.
    end: u64,
    /// Retention destroyed its content.
    discarded: bool,
}

/// The complete record at `at`, if there is one.
fn read_record(file: &File, at: u64, len: u64) -> io::Result<Option<Record>> {
    if at + HEADER_LEN > len {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, at)?;
    let payload_len = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let discarded = &header[..8] == DISCARDED_MAGIC;
    if (&header[..8] != RECORD_MAGIC && !discarded) || payload_len == 0 {
        return Ok(None);
    }
    let label_at = at + HEADER_LEN + payload_len;
    if label_at + 4 > len {
        return Ok(None);
    }
    let mut label_len = [0u8; 4];
    file.read_exact_at(&mut label_len, label_at)?;
    let label_len = u64::from(u32::from_le_bytes(label_len));
    let end = label_at + 4 + label_len + END_MAGIC.len() as u64;
    if end > len {
        return Ok(None);
    }
    let mut end_magic = [0u8; 8];
    file.read_exact_at(&mut end_magic, end - 8)?;
    if &end_magic != END_MAGIC {
        return Ok(None);
    }
    let mut label = vec![0u8; label_len as usize];
    file.read_exact_at(&mut label, label_at + 4)?;
    Ok(Some(Record {
        payload_len,
        label,
        end,
        discarded,
    }))
}

fn is_segment_name(name: &str) -> bool {
    name.ends_with(".seg")
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-' || b == b'.' || b.is_ascii_lowercase())
        && !name.contains("..")
}

/// The presence marks in `dir`: each process id with its file.
fn open_marks(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut marks = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(OPEN_PREFIX))
            .and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            marks.push((pid, entry.path()));
        }
    }
    Ok(marks)
}

fn owner_pid(name: &str) -> Option<u32> {
    name.split('-').nth(1)?.parse().ok()
}

/// Ask the kernel to start writing `len` bytes at `offset` to disk now,
/// without waiting. The fsync at commit then waits only for the tail of the
/// object instead of all of it (about half the commit latency for a CT
/// slice here). Purely advisory: failure changes nothing but speed.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // valid for the duration of the call because `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes one record into a segment it holds.
struct SegmentWriter {
    segment: Option<Segment>,
    pool: Arc<Pool>,
    record_start: u64,
    payload_len: u64,
    /// The segment's zeroed end as last seen: writes below it need no
    /// check (see [`super::runway`]).
    zeroed_to: u64,
}

impl SegmentWriter {
    fn segment(&self) -> io::Result<&Segment> {
        self.segment
            .as_ref()
            .ok_or_else(|| io::Error::other("segment already released"))
    }

    /// Write `buf` at `at` of the held segment.
    fn write_at(&mut self, at: u64, buf: &[u8]) -> io::Result<()> {
        let end = at + buf.len() as u64;
        if end > self.zeroed_to {
            self.zeroed_to = self.segment()?.runway.clear_for(end);
        }
        let file = &self.segment()?.file;
        file.write_all_at(buf, at)?;
        start_writeback(file, at, buf.len() as u64);
        Ok(())
    }

    /// Where the record's bytes end so far.
    fn written_end(&self) -> u64 {
        self.record_start + HEADER_LEN + self.payload_len
    }
}

impl Write for SegmentWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_at(self.written_end(), buf)?;
        self.payload_len += buf.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWrite for SegmentWriter {
    fn seal(mut self: Box<Self>, label: &[u8]) -> Result<Box<dyn SealedBlob>, BlobError> {
        let label_len = u32::try_from(label.len())
            .map_err(|_| BlobError::Write(io::Error::other("label too long")))?;
        let record_start = self.record_start;
        let payload_len = self.payload_len;
        let mut trailer = Vec::with_capacity(label.len() + 12);
        trailer.extend_from_slice(&label_len.to_le_bytes());
        trailer.extend_from_slice(label);
        trailer.extend_from_slice(END_MAGIC);
        let trailer_at = self.written_end();
        self.write_at(trailer_at, &trailer)
            .and_then(|()| self.write_at(record_start + 8, &payload_len.to_le_bytes()))
            .map_err(BlobError::Write)?;
        let end = trailer_at + trailer.len() as u64;
        let mut segment = self
            .segment
            .take()
            .ok_or_else(|| BlobError::Write(io::Error::other("segment already released")))?;
        segment.len = end;
        let location = BlobLocation {
            object: segment.name.clone(),
            offset: record_start + HEADER_LEN,
            length: payload_len,
        };
        // The writer keeps the segment until the record is durable: the
        // next record in it starts only after this one's sync, so after a
        // crash only a segment's last record can be torn.
        Ok(Box::new(Committed {
            segment: Some(segment),
            pool: Arc::clone(&self.pool),
            location,
            record_start,
            end,
        }))
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        if let Some(segment) = self.segment.take() {
            let written = self.written_end();
            withdraw(segment, self.record_start, written, &self.pool);
        }
    }
}

/// Remove the bytes a record left in `[from, to)` and return the segment
/// to the pool: inside the zeroed space they are zeroed (the space stays
/// ready for the next record), past it the segment is truncated. A segment
/// that cannot be mended is retired (recovery cleans it at the next start).
fn withdraw(mut segment: Segment, from: u64, to: u64, pool: &Pool) -> bool {
    let mended = if to <= segment.runway.zeroed_to() {
        write_zeros(&segment.file, from, to)
    } else {
        segment.runway.cut(from);
        segment.file.set_len(from)
    };
    match mended {
        Ok(()) => {
            segment.len = from;
            pool.put_back(segment);
            true
        }
        Err(e) => {
            tracing::warn!(segment = %segment.name, error = %e, "cannot withdraw a record; retiring its segment");
            false
        }
    }
}

/// Overwrite `[from, to)` with zeros (writeback started, not waited for).
pub(super) fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; (to.saturating_sub(from)).min(1 << 20) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        start_writeback(file, at, n);
        at += n;
    }
    Ok(())
}

struct Committed {
    segment: Option<Segment>,
    pool: Arc<Pool>,
    location: BlobLocation,
    record_start: u64,
    end: u64,
}

impl SealedBlob for Committed {
    fn location(&self) -> &BlobLocation {
        &self.location
    }

    fn resume_at(&self) -> u64 {
        self.end
    }

    fn sync(mut self: Box<Self>) -> Result<Box<dyn CommittedBlob>, BlobError> {
        let synced = match &self.segment {
            Some(segment) => segment.file.sync_data(),
            None => Err(io::Error::other("segment already released")),
        };
        if let Err(e) = synced {
            // What the file holds is unknown now: retire the segment rather
            // than append to it (recovery judges it at the next start).
            if let Some(segment) = self.segment.take() {
                tracing::warn!(segment = %segment.name, error = %e, "sync failed; retiring the segment");
            }
            return Err(BlobError::Sync(e));
        }
        Ok(self)
    }
}

impl CommittedBlob for Committed {
    fn location(&self) -> &BlobLocation {
        &self.location
    }

    fn resume_at(&self) -> u64 {
        self.end
    }

    fn retract(mut self: Box<Self>) -> Result<(), BlobError> {
        match self.segment.take() {
            Some(segment) => {
                if withdraw(segment, self.record_start, self.end, &self.pool) {
                    Ok(())
                } else {
                    Err(BlobError::Retract(io::Error::other(
                        "cannot remove the record",
                    )))
                }
            }
            None => Ok(()),
        }
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        if let Some(segment) = self.segment.take() {
            self.pool.put_back(segment);
        }
    }
}

/// A byte range of a file as a seekable reader.
struct Window {
    file: File,
    start: u64,
    end: u64,
    pos: u64,
}

impl Window {
    /// `want` bytes, or fewer where the window ends.
    fn clamp(&self, want: usize) -> usize {
        let left = self.end.saturating_sub(self.pos);
        want.min(usize::try_from(left).unwrap_or(usize::MAX))
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = self.clamp(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl ReadSeek for Window {
    fn read_append(&mut self, buf: &mut Vec<u8>, n: usize) -> io::Result<usize> {
        let n = self.clamp(n);
        // The file's own reads write into `buf`'s spare capacity as it is;
        // this window's file handle is its own, so its cursor is too.
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.pos))?;
        let got = file.take(n as u64).read_to_end(buf)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = (self.end - self.start) as i128;
        let rel = (self.pos - self.start) as i128;
        let target = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => rel + d as i128,
        };
        if target < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        // Seeking past the end is allowed (reads then return 0), as for files.
        self.pos = self.start + target as u64;
        Ok(target as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_object(store: &SegmentStore, bytes: &[u8]) -> Box<dyn BlobWrite> {
        let mut w = store.begin().unwrap();
        w.write_all(bytes).unwrap();
        w
    }

    fn read_all(store: &SegmentStore, loc: &BlobLocation) -> Vec<u8> {
        let mut out = Vec::new();
        store.open(loc).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn commit_read_retract_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentStore::open(dir.path()).unwrap();

        let first = write_object(&store, b"first object")
            .commit(b"label-1")
            .unwrap();
        let first_loc = first.location().clone();
        drop(first);
        assert_eq!(read_all(&store, &first_loc), b"first object");

        // Same segment comes back from the pool; a retracted record is gone.
        let second = write_object(&store, b"duplicate")
            .commit(b"label-2")
            .unwrap();
        assert_eq!(second.location().object, first_loc.object);
        second.retract().unwrap();

        // A dropped writer leaves nothing behind.
        drop(write_object(&store, &[9u8; 10_000]));

        let third = write_object(&store, b"third").commit(b"label-3").unwrap();
        let third_loc = third.location().clone();
        drop(third);
        assert_eq!(read_all(&store, &third_loc), b"third");
        assert_eq!(read_all(&store, &first_loc), b"first object");

        // Whether they were zeroed (inside the zeroed space) or cut off,
        // the withdrawn bytes are gone from the file, and only committed
        // records come back after a crash.
        store.pool.zeroer.stop();
        let path = dir.path().join("segments").join(&first_loc.object);
        let bytes = fs::read(&path).unwrap();
        assert!(!bytes.windows(9).any(|w| w == b"duplicate"));
        assert!(!bytes.windows(100).any(|w| w == [9u8; 100]));
        let found = recovered_after_a_crash(dir.path(), &["label-1", "label-3"]);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            found.unindexed[1].resume_at
        );
    }

    #[test]
    fn records_overwrite_zeroed_space_and_a_clean_close_trims_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentStore::open(dir.path()).unwrap();
        let first = write_object(&store, b"first").commit(b"A").unwrap();
        let loc = first.location().clone();
        drop(first);
        // The zeroer was asked for space ahead; wait for it.
        let runway = Arc::clone(&store.pool.idle.lock().unwrap()[0].runway);
        let zeroed = runway.clear_for(u64::MAX);
        let path = dir.path().join("segments").join(&loc.object);
        assert!(zeroed > loc.offset + loc.length + 600_000);
        assert_eq!(fs::metadata(&path).unwrap().len(), zeroed);

        // A record reaching into the zeroed space, withdrawn: zeroed again,
        // the space kept.
        let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let second = write_object(&store, &big).commit(b"B").unwrap();
        let second_loc = second.location().clone();
        assert_eq!(read_all(&store, &second_loc), big);
        second.retract().unwrap();
        assert_eq!(
            read_all(&store, &second_loc),
            vec![0u8; second_loc.length as usize]
        );
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            runway.clear_for(u64::MAX)
        );

        let third = write_object(&store, &big).commit(b"C").unwrap();
        let third_loc = third.location().clone();
        drop(third);
        assert_eq!(read_all(&store, &third_loc), big);
        // A clean close leaves no zeroed space behind.
        store.close().unwrap();
        let end = third_loc.offset + third_loc.length + 4 + 1 + 8;
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
        recovered_after_a_crash(dir.path(), &["A", "C"]);
    }

    /// Open the store again as after a crash: recovery finds exactly the
    /// records labelled `labels` and counts no zeroed space as unfinished.
    fn recovered_after_a_crash(dir: &Path, labels: &[&str]) -> Recovery {
        let found = SegmentStore::open(dir)
            .unwrap()
            .recover(&HashMap::new())
            .unwrap();
        let got: Vec<&[u8]> = found.unindexed.iter().map(|r| r.label.as_slice()).collect();
        let want: Vec<&[u8]> = labels.iter().map(|l| l.as_bytes()).collect();
        assert_eq!(got, want);
        assert_eq!(
            found.discarded_bytes, 0,
            "zeroed space is not an unfinished record"
        );
        found
    }

    #[test]
    fn a_discarded_record_is_destroyed_and_never_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentStore::open(dir.path()).unwrap();
        let a = write_object(&store, b"patient records")
            .commit(b"A")
            .unwrap();
        let a_loc = a.location().clone();
        drop(a);
        let b = write_object(&store, b"kept").commit(b"B").unwrap();
        let b_loc = b.location().clone();
        drop(b);
        store.discard(&a_loc).unwrap();
        // Idempotent.
        store.discard(&a_loc).unwrap();
        assert_eq!(read_all(&store, &a_loc), vec![0u8; a_loc.length as usize]);
        assert_eq!(read_all(&store, &b_loc), b"kept");
        // A sub-range is refused (only whole records are discarded).
        let part = BlobLocation {
            length: 3,
            ..b_loc.clone()
        };
        assert!(store.discard(&part).is_err());
        drop(store);
        let store = SegmentStore::open(dir.path()).unwrap();
        let found = store.recover(&HashMap::new()).unwrap();
        let labels: Vec<&[u8]> = found.unindexed.iter().map(|r| r.label.as_slice()).collect();
        assert_eq!(labels, vec![b"B".as_slice()]);
        assert_eq!(found.discarded_bytes, 0);
    }

    #[test]
    fn recovery_returns_committed_records_and_truncates_the_unfinished_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentStore::open(dir.path()).unwrap();
        let a = write_object(&store, b"aaaa").commit(b"A").unwrap();
        let a_resume = a.resume_at();
        let seg = a.location().object.clone();
        drop(a);
        let b = write_object(&store, b"bbbbbb").commit(b"B").unwrap();
        drop(b);
        // A crash mid-object: the writer's bytes are on disk, not committed.
        let w = write_object(&store, &[7u8; 5000]);
        std::mem::forget(w);
        store.pool.zeroer.stop();
        let path = dir.path().join("segments").join(&seg);
        let crashed_len = fs::metadata(&path).unwrap().len();

        // Index knew about A only.
        let store2 = SegmentStore::open(dir.path()).unwrap();
        let found = store2
            .recover(&HashMap::from([(seg.clone(), a_resume)]))
            .unwrap();
        assert_eq!(found.unindexed.len(), 1);
        assert_eq!(found.unindexed[0].label, b"B");
        assert_eq!(read_all(&store2, &found.unindexed[0].location), b"bbbbbb");
        assert!(found.discarded_bytes >= 5000);
        assert!(fs::metadata(&path).unwrap().len() < crashed_len);

        // A recovery point inside a record rescans instead of truncating.
        let inside = store2
            .recover(&HashMap::from([(seg.clone(), a_resume - 3)]))
            .unwrap();
        assert_eq!(inside.unindexed.len(), 2);
        assert_eq!(inside.discarded_bytes, 0);

        // Knowing nothing, recovery hands back both.
        let all = store2.recover(&HashMap::new()).unwrap();
        assert_eq!(all.unindexed.len(), 2);
        assert_eq!(all.discarded_bytes, 0);
    }

    #[test]
    fn open_refuses_foreign_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentStore::open(dir.path()).unwrap();
        let loc = BlobLocation {
            object: "../index.sqlite".into(),
            offset: 0,
            length: 10,
        };
        assert!(store.open(&loc).is_err());
    }
}
