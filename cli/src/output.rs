//! Writing to stdout without panicking when the reader has gone.
//!
//! Rust ignores SIGPIPE, so `println!` into a closed pipe (`weft top | head -2`)
//! panics. Commands write with [`outln!`] instead, which returns the
//! `io::Error`; `main` turns a broken pipe into a quiet, successful exit, as
//! `cat` or `ls` would.

/// `println!` that returns `std::io::Result<()>` instead of panicking.
macro_rules! outln {
    () => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock())
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use outln;

/// `print!` (no newline) that returns `std::io::Result<()>`; flushes, so a
/// closed pipe is noticed now rather than at exit.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*).and_then(|()| stdout.flush())
    }};
}
pub(crate) use out;

/// Whether `err` (anywhere in its chain) is stdout's reader having gone away.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
