//! Thread-per-core: a process's connections spread over N threads, each
//! running its own current-thread tokio runtime.
//!
//! With tokio's work-stealing scheduler the task of a client connection and
//! the task driving a shared connection it uses (a pooled HTTP/2 connection
//! to a peer, a keep-alive connection to the app) run on different threads,
//! so every request is a cross-thread wake-up (futex, eventfd, context
//! switch) each way. Here a connection accepted by [`crate::serve`] is handed
//! to one worker, round robin per listener, and stays there: its tasks, its
//! timers and the connections it opens run on that worker's thread. Shared per-worker
//! things ([`PerWorker`], or anything keyed by [`index`]) keep each worker's
//! outgoing connections its own.
//!
//! Worker 0 is the runtime that called [`start`] (the process's main
//! runtime, which also runs the accept loops and the control-plane streams);
//! workers 1..N are threads started here. Without [`start`] (one worker, or
//! tests running a sidecar in-process) there is one worker, the current
//! runtime, and connections run where they are accepted.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The process's workers, once [`start`] ran.
static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    /// This thread's worker index (0: the main runtime's thread, and any thread not a worker).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

struct Workers {
    handles: Vec<Handle>,
}

/// Why [`start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("worker threads were already started in this process")]
    AlreadyStarted,
    #[error("start must be called from inside a tokio runtime (worker 0)")]
    NoRuntime,
    #[error("cannot start worker thread {index}: {source}")]
    Thread { index: usize, source: std::io::Error },
}

/// Starts `n - 1` worker threads named `name`, each running a current-thread
/// runtime until the process exits; the calling runtime is worker 0. `n` of
/// 0 or 1 starts none (everything stays on the calling runtime).
///
/// Errors: called twice, called outside a runtime, or the OS refused a
/// thread or an epoll instance.
pub fn start(n: usize, name: &str) -> Result<(), StartError> {
    let main = Handle::try_current().map_err(|_| StartError::NoRuntime)?;
    // Checked before any thread starts: a second call must not leave threads behind.
    if WORKERS.get().is_some() {
        return Err(StartError::AlreadyStarted);
    }
    let mut handles = vec![main];
    for index in 1..n.max(1) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread_name = name.to_string();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                INDEX.with(|i| i.set(index));
                let rt = tokio::runtime::Builder::new_current_thread().thread_name(thread_name).enable_all().build();
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        // Runs the tasks handed to this worker until the process exits.
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| StartError::Thread { index, source })?;
        let handle = rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended before its runtime started")))
            .map_err(|source| StartError::Thread { index, source })?;
        handles.push(handle);
    }
    WORKERS.set(Workers { handles }).map_err(|_| StartError::AlreadyStarted)
}

/// How many workers this process runs (1 without [`start`]).
pub fn count() -> usize {
    WORKERS.get().map_or(1, |w| w.handles.len())
}

/// The worker running the caller: 0..[`count`] (0 off the worker threads).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The worker whose turn `turn` is (a listener's count of connections, so
/// each listener deals its own round robin); `None` when there is only one
/// (run it where it is).
pub(crate) fn nth(turn: usize) -> Option<&'static Handle> {
    let w = WORKERS.get().filter(|w| w.handles.len() > 1)?;
    Some(&w.handles[turn % w.handles.len()])
}

/// One `T` per worker, each used only by its own worker's tasks (e.g. a
/// connection pool whose connections are driven on that worker's thread).
#[derive(Debug)]
pub struct PerWorker<T>(Vec<T>);

impl<T> PerWorker<T> {
    /// `make(i)` for each worker `i` in 0..[`count`]; build it after [`start`].
    pub fn new(make: impl FnMut(usize) -> T) -> Self {
        Self((0..count()).map(make).collect())
    }

    /// The calling worker's `T`.
    pub fn get(&self) -> &T {
        // `%`: a thread that is not one of the workers counted at `new` uses one of them.
        self.at(index())
    }

    /// Worker `index`'s `T` (`index` modulo the workers counted at `new`),
    /// for a task that must reach the `T` of the worker it was started for.
    pub fn at(&self, index: usize) -> &T {
        &self.0[index % self.0.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_start_there_is_one_worker_and_no_hand_off() {
        // Test binaries run each test on its own thread: none of them called start here.
        assert_eq!(index(), 0);
        let per = PerWorker::new(|i| i * 10);
        assert_eq!(*per.get(), 0);
    }
}
