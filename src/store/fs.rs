//! The embedded blob store: one file per object under `<data_dir>/blobs`,
//! written first under `<data_dir>/tmp` and renamed into place after fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlobError, BlobKey, BlobStore, BlobWrite, ReadSeek};

/// Blobs as files in a local directory.
#[derive(Debug)]
pub struct FsBlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
}

impl FsBlobStore {
    /// Open (creating if needed) a store rooted at `data_dir`.
    pub fn open(data_dir: &Path) -> io::Result<FsBlobStore> {
        let blobs = data_dir.join("blobs");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&blobs)?;
        fs::create_dir_all(&tmp)?;
        Ok(FsBlobStore {
            blobs,
            tmp,
            counter: AtomicU64::new(0),
        })
    }

    fn path_of(&self, key: &BlobKey) -> PathBuf {
        self.blobs.join(key.as_str())
    }
}

impl BlobStore for FsBlobStore {
    fn begin(&self) -> Result<Box<dyn BlobWrite>, BlobError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{}.part", std::process::id(), n));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(BlobError::CreateTemp)?;
        Ok(Box::new(FsTemp {
            file,
            path,
            blobs: self.blobs.clone(),
            done: false,
        }))
    }

    fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, BlobError> {
        let file = File::open(self.path_of(key)).map_err(|source| BlobError::Open {
            key: key.as_str().to_owned(),
            source,
        })?;
        Ok(Box::new(file))
    }

    fn recover(&self) -> Result<usize, BlobError> {
        // A temp object whose writer process is gone can never be published:
        // temp objects are never visible, so removing it loses nothing that
        // was acknowledged. Objects of a live process (an import running next
        // to the server) are left alone.
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp).map_err(BlobError::Recover)? {
            let entry = entry.map_err(BlobError::Recover)?;
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| pid != std::process::id() && process_alive(pid)) {
                continue;
            }
            fs::remove_file(entry.path()).map_err(BlobError::Recover)?;
            removed += 1;
        }
        Ok(removed)
    }

    fn ping(&self) -> Result<(), BlobError> {
        fs::metadata(&self.blobs)
            .and_then(|m| {
                if m.permissions().readonly() {
                    Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
                } else {
                    Ok(())
                }
            })
            .map_err(|source| BlobError::Open {
                key: String::new(),
                source,
            })
    }
}

struct FsTemp {
    file: File,
    path: PathBuf,
    blobs: PathBuf,
    done: bool,
}

impl Write for FsTemp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWrite for FsTemp {
    fn read_back(&mut self) -> io::Result<Box<dyn ReadSeek + '_>> {
        let mut reader = File::open(&self.path)?;
        reader.seek(SeekFrom::Start(0))?;
        Ok(Box::new(reader))
    }

    fn commit(mut self: Box<Self>, key: &BlobKey) -> Result<(), BlobError> {
        let target = self.blobs.join(key.as_str());
        let publish_err = |source| BlobError::Publish {
            key: key.as_str().to_owned(),
            source,
        };
        if target.exists() {
            // Same key means the same data set bytes and transfer syntax:
            // the published copy is already durable. Drop removes ours.
            return Ok(());
        }
        self.file.sync_data().map_err(BlobError::Sync)?;
        let parent = target
            .parent()
            .ok_or_else(|| publish_err(io::Error::other("key without a directory")))?;
        if !parent.exists() {
            fs::create_dir_all(parent).map_err(publish_err)?;
            sync_dir(&self.blobs).map_err(publish_err)?;
        }
        fs::rename(&self.path, &target).map_err(publish_err)?;
        self.done = true;
        // The rename is durable only once the directory entry is on disk.
        sync_dir(parent).map_err(publish_err)?;
        Ok(())
    }
}

impl Drop for FsTemp {
    fn drop(&mut self) {
        if !self.done {
            // Best effort; recover() removes what a crash leaves.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Whether a process with this id exists (Linux: /proc). Elsewhere we
/// cannot tell, and say no.
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Uid;

    #[test]
    fn commit_publishes_and_drop_discards() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let key = BlobKey::for_instance(&[7; 32], &Uid::parse("1.2.840.10008.1.2").unwrap());

        let mut w = store.begin().unwrap();
        w.write_all(b"hello").unwrap();
        let mut back = String::new();
        w.read_back().unwrap().read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello");
        w.commit(&key).unwrap();
        let mut read = String::new();
        store.open(&key).unwrap().read_to_string(&mut read).unwrap();
        assert_eq!(read, "hello");

        let mut w = store.begin().unwrap();
        w.write_all(b"abandoned").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn recover_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        // No process has id 4294967295, so the object is an orphan.
        fs::write(dir.path().join("tmp/4294967295-0.part"), b"partial").unwrap();
        assert_eq!(store.recover().unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
