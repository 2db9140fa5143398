//! One process per state directory. Two control planes on one store would
//! both accept a join token; two sidecars on one directory would overwrite
//! each other's key and SVID. An exclusive lock on `<dir>/.lock`, held for
//! the life of the process (the kernel drops it when the process dies, so a
//! crash never leaves a stale lock), makes the second one stop at start-up.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error("state directory {}: {err}", dir.display())]
    Io { dir: PathBuf, err: std::io::Error },
    #[error(
        "state directory {} is in use by another weft process (it holds {}); give each process its own --state-dir",
        dir.display(),
        dir.join(LOCK_FILE).display()
    )]
    InUse { dir: PathBuf },
}

/// Held while the process owns the directory.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Creates `dir` if needed and takes its lock, or says who has it.
pub fn lock(dir: &Path) -> Result<StateLock, StateLockError> {
    let io = |err| StateLockError::Io { dir: dir.to_path_buf(), err };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE)).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(StateLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(StateLockError::InUse { dir: dir.to_path_buf() }),
        Err(TryLockError::Error(err)) => Err(io(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = lock(&dir).unwrap();
        let err = lock(&dir).unwrap_err().to_string();
        assert!(err.contains("in use by another weft process") && err.contains(".lock"), "{err}");
        drop(first);
        lock(&dir).expect("free again once the holder is gone");
    }
}
