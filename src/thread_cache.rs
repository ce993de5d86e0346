//! Empties glibc's per-thread caches of freed chunks, so that a trim can give their pages back.
//!
//! glibc keeps up to 7 freed chunks of each small size (up to 1,032 bytes, 64 sizes) in a
//! cache of the thread that freed them, and counts them as in use: `malloc_trim` neither
//! frees them nor the pages they sit on. After a burst of connections has closed, a worker's
//! cache holds chunks from all over the tens of megabytes its arena grew to, each on a page of
//! its own, and those pages stay resident for good: about 2 MB per worker, most of what a
//! server kept after 10,000 connections had come and gone. glibc has no call that empties a
//! thread's cache, so [`flush_this_thread`] takes the cached chunks out and frees them again
//! while the cache is full of fresh stand-ins, which sends them back to the arena.
//!
//! Only the thread itself can do that for its cache: the runtime's workers do it when they
//! park or wake after [`flush_workers`] asked them to (see [`hook_workers`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Builder, Handle};

/// Set once a runtime's workers have the hooks: otherwise no one would answer a request.
static HOOKED: AtomicBool = AtomicBool::new(false);
/// Requests so far; a worker flushes once for each.
static ASKED: AtomicU64 = AtomicU64::new(0);
/// Workers that have flushed for the latest request.
static FLUSHED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ANSWERED: Cell<u64> = const { Cell::new(0) };
}

/// How long [`flush_workers`] waits for every worker; one that has not flushed by then keeps
/// its cache until the next request.
const WAIT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(10);

/// Makes the runtime's workers answer [`flush_workers`] when they park or wake. The cost
/// otherwise is one atomic load per park.
pub fn hook_workers(builder: &mut Builder) -> &mut Builder {
    HOOKED.store(true, Ordering::Relaxed);
    builder.on_thread_park(answer).on_thread_unpark(answer)
}

fn answer() {
    let asked = ASKED.load(Ordering::Acquire);
    ANSWERED.with(|answered| {
        if answered.get() != asked {
            answered.set(asked);
            flush_this_thread();
            FLUSHED.fetch_add(1, Ordering::AcqRel);
        }
    });
}

/// Asks every worker of the current runtime to flush its cache and waits until they all have
/// (at most [`WAIT`]). True if they all did.
pub async fn flush_workers() -> bool {
    if !HOOKED.load(Ordering::Relaxed) {
        return false;
    }
    let workers = Handle::current().metrics().num_workers();
    FLUSHED.store(0, Ordering::Release);
    ASKED.fetch_add(1, Ordering::AcqRel);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if FLUSHED.load(Ordering::Acquire) >= workers {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        // A parked worker answers when it wakes: something to steal wakes it.
        for _ in 0..workers {
            tokio::spawn(async {});
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends the chunks this thread's cache holds back to the arena. About 900 small allocations,
/// some microseconds.
pub fn flush_this_thread() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::flush();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use libc::{c_void, free, malloc};

    /// The cache's sizes: chunks of 32 to 1,040 bytes, 16 apart.
    const BINS: usize = 64;
    /// Chunks per size (glibc's `tcache_count`, unless changed by `GLIBC_TUNABLES`).
    const PER_BIN: usize = 7;

    /// The request whose chunk falls in `bin`: 8 bytes of header, rounded up to 16.
    fn request(bin: usize) -> usize {
        24 + 16 * bin
    }

    type Chunks = [[*mut c_void; PER_BIN]; BINS];

    pub(super) fn flush() {
        // Taken first, the cached chunks; then as many again, fresh from the arena.
        let cached = take();
        let stand_ins = take();
        // The stand-ins fill the cache, so the old chunks, freed after them, go to the arena.
        give(&stand_ins);
        give(&cached);
    }

    fn take() -> Chunks {
        let mut chunks = [[std::ptr::null_mut(); PER_BIN]; BINS];
        for (bin, slots) in chunks.iter_mut().enumerate() {
            for slot in slots {
                // SAFETY: malloc has no preconditions; a null result is never freed below.
                *slot = unsafe { malloc(request(bin)) };
            }
        }
        chunks
    }

    fn give(chunks: &Chunks) {
        for &chunk in chunks.iter().flatten() {
            if !chunk.is_null() {
                // SAFETY: each chunk came from malloc in `take` and is freed exactly once.
                unsafe { free(chunk) };
            }
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// A thread's cache filled with chunks, each alone on its page, in 40 MB of otherwise
    /// freed memory: the pattern a worker is left with after a burst of connections. The last
    /// chunk stays allocated until dropped, so that none of the seven borders the arena's top.
    struct Scattered {
        pages: Vec<usize>,
        fence: usize,
    }

    impl Scattered {
        fn make() -> Scattered {
            const SIZE: usize = 200;
            const COUNT: usize = 200_000;
            const STRIDE: usize = COUNT / 7;
            let all: Vec<usize> = (0..COUNT)
                // SAFETY: malloc has no preconditions.
                .map(|_| unsafe { libc::malloc(SIZE) } as usize)
                .collect();
            assert!(all.iter().all(|&p| p != 0));
            let cached = |i: usize| i % STRIDE == STRIDE / 2 && i / STRIDE < 7;
            // Freed first, while the cache has room: these seven stay in it.
            for (_, &p) in all.iter().enumerate().filter(|(i, _)| cached(*i)) {
                free(p);
            }
            for (_, &p) in all[..COUNT - 1]
                .iter()
                .enumerate()
                .filter(|(i, _)| !cached(*i))
            {
                free(p);
            }
            Scattered {
                pages: (0..COUNT)
                    .filter(|&i| cached(i))
                    .map(|i| all[i] / PAGE)
                    .collect(),
                fence: all[COUNT - 1],
            }
        }

        fn resident(&self) -> usize {
            self.pages
                .iter()
                .filter(|&&page| resident(page * PAGE))
                .count()
        }
    }

    impl Drop for Scattered {
        fn drop(&mut self) {
            free(self.fence);
        }
    }

    fn free(chunk: usize) {
        // SAFETY: every chunk freed here came from malloc and is freed once.
        unsafe { libc::free(chunk as *mut libc::c_void) };
    }

    fn resident(page: usize) -> bool {
        let mut vec = 0u8;
        // SAFETY: one page of this process's mapped heap, one byte of result.
        let rc = unsafe { libc::mincore(page as *mut libc::c_void, PAGE, &mut vec) };
        assert_eq!(rc, 0);
        vec & 1 == 1
    }

    fn trim() {
        // SAFETY: no preconditions.
        unsafe { libc::malloc_trim(0) };
    }

    #[test]
    fn a_trim_gives_back_the_pages_of_a_threads_cached_chunks_only_after_a_flush() {
        // A thread of its own: its own arena and cache, which nothing else uses meanwhile.
        std::thread::spawn(|| {
            let scattered = Scattered::make();
            trim();
            assert_eq!(scattered.resident(), 7, "cached chunks keep their pages");
            flush_this_thread();
            trim();
            assert_eq!(
                scattered.resident(),
                0,
                "flushed, their pages are given back"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn every_worker_flushes_when_asked() {
        let runtime = hook_workers(Builder::new_multi_thread().worker_threads(3).enable_all())
            .build()
            .unwrap();
        runtime.block_on(async {
            assert!(tokio::spawn(flush_workers()).await.unwrap());
            assert!(tokio::spawn(flush_workers()).await.unwrap(), "and again");
        });
    }
}
