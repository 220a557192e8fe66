//! Sequential reads for downloads that stay on the task when the data is in the page cache.
//!
//! `tokio::fs::File` sends every read to the blocking pool and copies the result out of a
//! buffer of its own: per 256 KiB chunk a hand-off to another thread, a wake-up back, and a
//! copy. Most downloads read files the page cache already holds (images just written or read
//! before), so [`CachedReader`] first asks the kernel for the bytes with
//! `preadv2(RWF_NOWAIT)`, which answers from the cache or says it would block, and only then
//! goes to the blocking pool. Filesystems that refuse RWF_NOWAIT are read on the pool, as before.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::io::{Errno, ReadWriteFlags, preadv2};

pub struct CachedReader {
    file: Arc<File>,
    offset: u64,
    /// False once the filesystem refused RWF_NOWAIT: every read then goes to the pool.
    nowait: bool,
}

impl CachedReader {
    pub fn new(file: File) -> CachedReader {
        CachedReader {
            file: Arc::new(file),
            offset: 0,
            nowait: true,
        }
    }

    /// Read up to `len` bytes (`len <= buf.len()`) into `buf[..len]` at the current offset;
    /// 0 at end of file. A read that goes to the blocking pool takes `buf` with it and puts it
    /// back.
    pub async fn read(&mut self, buf: &mut Vec<u8>, len: usize) -> io::Result<usize> {
        let len = len.min(buf.len());
        if self.nowait {
            let mut slices = [IoSliceMut::new(&mut buf[..len])];
            match preadv2(
                &*self.file,
                &mut slices,
                self.offset,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                // Not (all) in the page cache: read it where blocking is allowed.
                Err(Errno::AGAIN) => {}
                // This filesystem (or kernel) does not do RWF_NOWAIT reads.
                Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => self.nowait = false,
                Err(e) => return Err(e.into()),
            }
        }
        let file = self.file.clone();
        let offset = self.offset;
        let owned = std::mem::take(buf);
        let size = owned.len();
        let job = tokio::task::spawn_blocking(move || {
            let mut owned = owned;
            let r = file.read_at(&mut owned[..len], offset);
            (owned, r)
        });
        let (owned, r) = match job.await {
            Ok(done) => done,
            Err(e) => {
                *buf = vec![0; size];
                return Err(io::Error::other(e));
            }
        };
        *buf = owned;
        let n = r?;
        self.offset += n as u64;
        Ok(n)
    }

    /// Whether reads still try the page cache first (false after the filesystem refused).
    #[cfg(test)]
    fn tries_cache(&self) -> bool {
        self.nowait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    async fn read_all(path: &std::path::Path, chunk: usize) -> (Vec<u8>, bool) {
        let mut r = CachedReader::new(File::open(path).unwrap());
        let mut buf = vec![0u8; chunk];
        let mut out = vec![];
        loop {
            let n = r.read(&mut buf, chunk).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            assert_eq!(buf.len(), chunk, "the buffer comes back whole");
        }
        (out, r.tries_cache())
    }

    /// On tmpfs (RWF_NOWAIT from the page cache) and on the temp dir's filesystem (whatever it
    /// supports), a file comes back byte for byte, in odd-sized chunks.
    #[tokio::test]
    async fn reads_files_exactly_from_the_cache_or_the_pool() {
        let want = data(3 * 1024 * 1024 + 17);
        for dir in ["/dev/shm", "/tmp"] {
            let mut f = tempfile::NamedTempFile::new_in(dir).unwrap();
            f.write_all(&want).unwrap();
            f.flush().unwrap();
            let (got, _) = read_all(f.path(), 256 * 1024 + 3).await;
            assert_eq!(got.len(), want.len(), "{dir}");
            assert!(got == want, "{dir}: content differs");
        }
    }

    /// The reader keeps using RWF_NOWAIT exactly where the kernel accepts it for this file
    /// (ext4 and xfs do for cached data; tmpfs, on the kernels seen here, refuses), and reads
    /// the file exactly either way.
    #[tokio::test]
    async fn uses_the_cache_path_where_the_filesystem_allows_it() {
        for dir in ["/dev/shm", "/tmp"] {
            let mut f = tempfile::NamedTempFile::new_in(dir).unwrap();
            let want = data(1 << 20);
            f.write_all(&want).unwrap();
            let probe = File::open(f.path()).unwrap();
            let mut b = [0u8; 4096];
            let accepted = !matches!(
                preadv2(
                    &probe,
                    &mut [IoSliceMut::new(&mut b)],
                    0,
                    ReadWriteFlags::NOWAIT
                ),
                Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS)
            );
            let (got, cache) = read_all(f.path(), 64 * 1024).await;
            assert!(got == want, "{dir}: content differs");
            assert_eq!(cache, accepted, "{dir}");
        }
    }
}
