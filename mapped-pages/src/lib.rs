//! Releases the clean file-backed pages a process has mapped: its machine
//! code, its read-only data and its shared libraries' (issue 10, the
//! sidecar's memory).
//!
//! Why: a page fault on a file already in the page cache maps up to 16
//! pages around the faulting one (the kernel's fault-around, 64 KiB), and
//! the pages stay mapped, counted in the process's RSS, for as long as the
//! process lives. Start-up (TLS set-up, the first config, the SVID) runs
//! code and reads data a running sidecar never touches again, so an idle
//! `dist` sidecar held ~5–5.5 MiB of file-backed RSS, most of it start-up
//! code, and ~6 MiB under load, of which the hot path needs ~4.5.
//! [`release_clean_file_pages`], called once the sidecar is ready, unmaps
//! them; what the sidecar still runs is faulted back from the page cache on
//! first use (minor faults, no I/O), so its RSS becomes what it uses.
//!
//! Safe because only *clean* pages of *loaded objects* are released: the
//! read-only `PT_LOAD` segments of the executable and its shared libraries
//! (`dl_iterate_phdr`), which stay mapped for the process's life, and of
//! those only mappings that are file-backed, private, not writable, and
//! have no page copied on write (smaps `Anonymous: 0 kB`; RELRO data, which
//! the dynamic linker wrote before making it read-only, is kept). Such a
//! page holds exactly the file's bytes, and the kernel itself unmaps and
//! drops such pages whenever it needs memory; `madvise(MADV_DONTNEED)` does
//! the same now (madvise(2)). A file some other code maps for a moment is
//! left alone: its range could be unmapped and reused between reading smaps
//! and the `madvise`.

use std::fmt;

/// A mapping of `/proc/self/smaps` that [`release_clean_file_pages`]
/// releases: `start..end` (bytes, page-aligned), its file and its resident
/// size when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanMapping {
    /// First byte of the mapping.
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
    /// The mapped file (as smaps shows it, `(deleted)` and all).
    pub path: String,
    /// Resident before the release, KiB (smaps `Rss`).
    pub rss_kib: u64,
}

/// What [`release_clean_file_pages`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Clean file-backed mappings released.
    pub mappings: usize,
    /// Their resident size before, KiB.
    pub rss_kib: u64,
    /// Their resident size right after, KiB (smaps read again; `None` if
    /// that read failed): what the process ran and read in between.
    pub rss_after_kib: Option<u64>,
}

impl fmt::Display for Released {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KiB in {} clean file-backed mapping(s)", self.rss_kib, self.mappings)?;
        match self.rss_after_kib {
            Some(after) => write!(f, ", {after} KiB of them resident right after"),
            None => Ok(()),
        }
    }
}

/// Why the pages could not be released. The process is unaffected either
/// way: at worst it keeps pages it does not need.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("reading /proc/self/smaps (is /proc mounted?): {0}")]
    Smaps(#[source] std::io::Error),
    #[error("madvise(MADV_DONTNEED) on {path} ({start:#x}..{end:#x}): {source}")]
    Madvise {
        path: String,
        start: usize,
        end: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The clean file-backed mappings in `smaps` (the text of
/// `/proc/<pid>/smaps`, proc(5)): readable, private, neither writable nor
/// locked (`VmFlags` `lo`) nor hugetlb (`ht`), backed by a file (a path
/// starting with `/`), with resident pages and none copied on write, in
/// memory or swapped out (`Anonymous`, `Private_Dirty` and `Swap` all
/// `0 kB`).
pub fn clean_file_mappings(smaps: &str) -> Vec<CleanMapping> {
    struct Current {
        start: usize,
        end: usize,
        candidate: bool,
        path: String,
        rss_kib: Option<u64>,
        anonymous_kib: Option<u64>,
        private_dirty_kib: Option<u64>,
        swap_kib: Option<u64>,
        flags_ok: bool,
    }
    fn finish(c: Option<Current>, out: &mut Vec<CleanMapping>) {
        if let Some(c) = c {
            let unwritten = [c.anonymous_kib, c.private_dirty_kib, c.swap_kib].iter().all(|k| *k == Some(0));
            if c.candidate && c.flags_ok && unwritten && c.rss_kib.is_some_and(|r| r > 0) {
                out.push(CleanMapping { start: c.start, end: c.end, path: c.path, rss_kib: c.rss_kib.unwrap_or(0) });
            }
        }
    }
    let mut out = Vec::new();
    let mut cur: Option<Current> = None;
    for line in smaps.lines() {
        if let Some(header) = mapping_header(line) {
            finish(cur.take(), &mut out);
            cur = Some(header);
            continue;
        }
        let Some(c) = cur.as_mut() else { continue };
        if let Some(v) = line.strip_prefix("Rss:") {
            c.rss_kib = kib(v);
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            c.anonymous_kib = kib(v);
        } else if let Some(v) = line.strip_prefix("Private_Dirty:") {
            c.private_dirty_kib = kib(v);
        } else if let Some(v) = line.strip_prefix("Swap:") {
            c.swap_kib = kib(v);
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            c.flags_ok = !v.split_whitespace().any(|f| f == "lo" || f == "ht");
        }
    }
    finish(cur, &mut out);
    return out;

    /// `55d1c0a00000-55d1c0ad0000 r-xp 00000000 fe:01 1234   /usr/bin/x`.
    fn mapping_header(line: &str) -> Option<Current> {
        let mut fields = line.splitn(6, ' ');
        let (range, perms) = (fields.next()?, fields.next()?);
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
        let path = fields.next().unwrap_or("").trim_start().to_string();
        let p = perms.as_bytes();
        let candidate = p.len() == 4 && p[0] == b'r' && p[1] == b'-' && p[3] == b'p' && path.starts_with('/');
        Some(Current {
            start,
            end,
            candidate,
            path,
            rss_kib: None,
            anonymous_kib: None,
            private_dirty_kib: None,
            swap_kib: None,
            flags_ok: true,
        })
    }
    fn kib(v: &str) -> Option<u64> {
        v.trim().strip_suffix("kB")?.trim().parse().ok()
    }
}

/// The parts of `clean` mappings that lie in `segments` (`start..end`,
/// page-aligned), in order: (start, end, index into `clean`).
fn overlaps(clean: &[CleanMapping], segments: &[(usize, usize)]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (i, m) in clean.iter().enumerate() {
        for &(s, e) in segments {
            let (lo, hi) = (m.start.max(s), m.end.min(e));
            if lo < hi {
                out.push((lo, hi, i));
            }
        }
    }
    out.sort_unstable();
    out
}

/// A loaded object's read-only segments (`start..end`); false stops the walk.
type OnObject<'a> = dyn FnMut(&[(usize, usize)]) -> bool + 'a;

/// Calls `f` with the read-only `PT_LOAD` segments (no `PF_W`) of each
/// object the dynamic linker has loaded (the executable and its shared
/// libraries), `start..end` rounded out to whole pages as the loader mapped
/// them, until `f` returns false. `f` runs inside `dl_iterate_phdr`, under
/// the loader's lock, which `dlclose` takes before it unmaps an object: the
/// segments stay mapped while `f` runs. `f` must not panic (it is called
/// from C) nor load or unload objects.
fn each_loaded_object(f: &mut OnObject<'_>) {
    struct Walk<'a> {
        f: &'a mut OnObject<'a>,
        page: usize,
        segments: Vec<(usize, usize)>,
    }
    #[allow(unsafe_code)]
    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: glibc passes a valid `dl_phdr_info` whose `dlpi_phdr`
        // points to `dlpi_phnum` program headers, and `data` is the `Walk`
        // below, borrowed for the call.
        let (info, walk) = unsafe { (&*info, &mut *data.cast::<Walk<'_>>()) };
        if info.dlpi_phdr.is_null() || info.dlpi_phnum == 0 {
            return 0;
        }
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        walk.segments.clear();
        for ph in phdrs.iter().filter(|ph| ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W == 0) {
            let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
            let end = start.wrapping_add(ph.p_memsz as usize);
            walk.segments.push((start / walk.page * walk.page, end.div_ceil(walk.page) * walk.page));
        }
        if (walk.f)(&walk.segments) {
            0
        } else {
            1
        }
    }
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = usize::try_from(page).unwrap_or(4096).max(1);
    let mut walk = Walk { f, page, segments: Vec::with_capacity(8) };
    // SAFETY: `each` only reads what glibc hands it and uses `walk`, which
    // outlives the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::dl_iterate_phdr(Some(each), (&mut walk as *mut Walk<'_>).cast());
    }
}

/// This process's `/proc/self/smaps` (a path that is not UTF-8 comes out
/// lossily; only the numbers and the leading `/` are read).
fn read_smaps() -> std::io::Result<String> {
    std::fs::read("/proc/self/smaps").map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Unmaps the clean file-backed pages of this process's executable and
/// shared libraries: the parts of [`clean_file_mappings`] (of
/// `/proc/self/smaps`) that are read-only `PT_LOAD` segments of a loaded
/// object, with `madvise(MADV_DONTNEED)`, each while the loader's lock
/// holds the object mapped; the next access to any of them maps it again
/// from the page cache. Other file mappings are left alone. Call it once
/// start-up is over (it reads smaps twice and makes some tens of system
/// calls: from a blocking thread in async code). Returns what was
/// released, and what of it was resident again right after (read from
/// smaps a second time).
///
/// Errors: smaps unreadable, or the first `madvise` that failed (the
/// ranges before it are released, the rest kept).
pub fn release_clean_file_pages() -> Result<Released, ReleaseError> {
    let smaps = read_smaps().map_err(ReleaseError::Smaps)?;
    let clean = clean_file_mappings(&smaps);
    let mut released = Released::default();
    let mut counted: Vec<usize> = Vec::with_capacity(clean.len());
    let mut failed = None;
    each_loaded_object(&mut |segments| {
        for (start, end, i) in overlaps(&clean, segments) {
            // SAFETY: `start..end` is a read-only segment of a loaded
            // object, mapped private and kept mapped by the loader's lock
            // while this runs, inside a mapping with no page copied on
            // write: every page holds the file's bytes, which the next
            // access maps again (madvise(2): "repopulating the memory
            // contents from the up-to-date contents of the underlying
            // mapped file"). Nothing can write to it, so no content is lost.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
            if rc != 0 {
                failed = Some(ReleaseError::Madvise {
                    path: clean[i].path.clone(),
                    start,
                    end,
                    source: std::io::Error::last_os_error(),
                });
                return false;
            }
            if !counted.contains(&i) {
                counted.push(i);
                released.mappings += 1;
                released.rss_kib += clean[i].rss_kib;
            }
        }
        true
    });
    if let Some(e) = failed {
        return Err(e);
    }
    // Read again: what the process touched between the two reads (this
    // function, the smaps read itself) is resident again already.
    if let Ok(after) = read_smaps() {
        let starts: Vec<usize> = counted.iter().map(|&i| clean[i].start).collect();
        released.rss_after_kib =
            Some(clean_file_mappings(&after).iter().filter(|m| starts.contains(&m.start)).map(|m| m.rss_kib).sum());
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SMAPS: &str = "\
55d1c0a00000-55d1c0ad0000 r--p 00000000 fe:01 1234                       /usr/bin/weft-proxy
Size:                832 kB
Rss:                 832 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
VmFlags: rd mr mw me sd
55d1c0ad0000-55d1c1000000 r-xp 000d0000 fe:01 1234                       /usr/bin/weft-proxy
Size:               5312 kB
Rss:                2696 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me sd
55d1c1000000-55d1c1050000 r--p 00600000 fe:01 1234                       /usr/bin/weft-proxy
Size:                320 kB
Rss:                 316 kB
Anonymous:           316 kB
Private_Dirty:      316 kB
Swap:                  0 kB
VmFlags: rd mr mw me ac sd
55d1c1050000-55d1c1060000 rw-p 00650000 fe:01 1234                       /usr/bin/weft-proxy
Size:                 64 kB
Rss:                  64 kB
Anonymous:            60 kB
Private_Dirty:       60 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac sd
55d1c2000000-55d1c2100000 rw-p 00000000 00:00 0                          [heap]
Rss:                 240 kB
Anonymous:           240 kB
Private_Dirty:      240 kB
Swap:                  0 kB
7f0000000000-7f0000010000 r-xp 00000000 fe:01 99                         /usr/lib/my lib (deleted)
Rss:                  12 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me
7f0000010000-7f0000020000 r-xp 00000000 fe:01 98                         /usr/lib/cold.so
Rss:                   0 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
7f0000020000-7f0000030000 r-xp 00000000 fe:01 97                         /usr/lib/locked.so
Rss:                  64 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me lo
7f0000030000-7f0000040000 r--s 00000000 fe:01 96                         /dev/shm/shared
Rss:                  64 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
Private_Dirty:        0 kB
Swap:                  0 kB
7f0000040000-7f0000050000 r-xp 00000000 fe:01 95                         /usr/lib/swapped.so
Rss:                  32 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Swap:                  8 kB
7f0000050000-7f0000060000 r-xp 00000000 fe:01 94                         /usr/lib/dirty.so
Rss:                  32 kB
Anonymous:             0 kB
Private_Dirty:         4 kB
Swap:                  0 kB
7f0000060000-7f0000070000 r-xp 00000000 fe:01 93                         /usr/lib/no-swap-line.so
Rss:                  32 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_private_read_only_file_mappings_are_chosen() {
        let chosen = clean_file_mappings(SMAPS);
        let got: Vec<(usize, &str, u64)> = chosen.iter().map(|m| (m.start, m.path.as_str(), m.rss_kib)).collect();
        assert_eq!(
            got,
            [
                (0x55d1c0a00000, "/usr/bin/weft-proxy", 832),
                (0x55d1c0ad0000, "/usr/bin/weft-proxy", 2696),
                (0x7f0000000000, "/usr/lib/my lib (deleted)", 12),
            ],
            "RELRO (copied on write), writable, heap, nothing resident, locked, shared, vdso, swapped-out or dirty \
             copied pages, and a mapping smaps says too little about are kept"
        );
        assert_eq!(chosen[1].end, 0x55d1c1000000);
    }

    /// Resident KiB of the mapping at `start`, from this process's smaps.
    fn rss_kib_at(start: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&format!("{start:x}-")));
        assert!(lines.next().is_some(), "no mapping at {start:#x}");
        let rss = lines.find_map(|l| l.strip_prefix("Rss:")).expect("an Rss line");
        rss.trim().strip_suffix("kB").unwrap().trim().parse().unwrap()
    }

    #[allow(unsafe_code)]
    fn map(file: &std::fs::File, len: usize, prot: libc::c_int) -> &'static mut [u8] {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of a file this test owns, `len`
        // bytes long; it lives until the process ends.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE, file.as_raw_fd(), 0);
            assert_ne!(p, libc::MAP_FAILED);
            std::slice::from_raw_parts_mut(p.cast::<u8>(), len)
        }
    }

    #[test]
    fn only_the_parts_inside_segments_are_released() {
        let m = |start, end| CleanMapping { start, end, path: "/x".into(), rss_kib: 4 };
        let clean = [m(0x1000, 0x5000), m(0x8000, 0x9000), m(0x10000, 0x11000)];
        let segments = [(0x0, 0x2000), (0x3000, 0x9000)];
        assert_eq!(
            overlaps(&clean, &segments),
            [(0x1000, 0x2000, 0), (0x3000, 0x5000, 0), (0x8000, 0x9000, 1)],
            "a mapping outside every segment (a file mapped by other code) is left alone"
        );
    }

    #[test]
    fn the_executable_s_code_is_among_the_loaded_segments() {
        let here = the_executable_s_code_is_among_the_loaded_segments as fn() as usize;
        let mut all = Vec::new();
        each_loaded_object(&mut |segments| {
            all.extend_from_slice(segments);
            true
        });
        assert!(all.iter().any(|&(s, e)| (s..e).contains(&here)), "{all:x?}");
        assert!(all.iter().all(|&(s, e)| s < e && s % 4096 == 0 && e % 4096 == 0), "{all:x?}");
    }

    #[test]
    #[allow(unsafe_code)]
    fn the_executable_s_pages_leave_the_rss_and_other_mappings_stay() {
        const LEN: usize = 256 * 1024;
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();

        // A clean file mapping that is no loaded object's: kept.
        let other = map(&f, LEN, libc::PROT_READ);
        assert_eq!(&other[..], &bytes[..]);
        // Like the dynamic linker's RELRO: written, then made read-only.
        let written = map(&f, LEN, libc::PROT_READ | libc::PROT_WRITE);
        written[5] = 0xee;
        // SAFETY: the mapping `written` covers, made read-only.
        assert_eq!(unsafe { libc::mprotect(written.as_mut_ptr().cast(), LEN, libc::PROT_READ) }, 0);
        std::hint::black_box(written.iter().map(|b| *b as u64).sum::<u64>());
        let (other_at, written_at) = (other.as_ptr() as usize, written.as_ptr() as usize);
        assert_eq!(rss_kib_at(other_at), 256, "read: all resident");
        assert_eq!(rss_kib_at(written_at), 256);

        let released = release_clean_file_pages().unwrap();
        // At least the test binary's code and read-only data.
        assert!(released.mappings >= 2 && released.rss_kib > 0, "{released}");
        let after = released.rss_after_kib.expect("smaps read again");
        assert!(after < released.rss_kib / 2, "{released}");
        assert_eq!(rss_kib_at(other_at), 256, "a file mapping of no loaded object is kept");
        assert_eq!(rss_kib_at(written_at), 256, "so is one with a page copied on write");
        assert_eq!(written[5], 0xee, "and it keeps what was written");
        assert_eq!(&other[..], &bytes[..]);
        // The released code still runs.
        assert_eq!(clean_file_mappings(SMAPS).len(), 3);
    }
}
