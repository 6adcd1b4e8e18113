//! Writing the files a command produces (`-o`, `--out`, run directories' logs and plots)
//! so that they never destroy what they replace:
//!
//! - a new path, or a regular file, is replaced atomically: the bytes go to a temporary
//!   file next to it, are synced, take the old file's permissions, and are renamed over
//!   it; a reader sees the old content or all of the new, never a part;
//! - a symlink stays a symlink: what it points to is written (followed to the end of the
//!   chain; a dangling link creates its target);
//! - a device, FIFO or socket is written to directly, as any Unix tool does (`-o
//!   /dev/null` discards, `-o /dev/stdout` prints); it is never unlinked;
//! - a directory is an error.
//!
//! A directory of generated files is written whole and swapped in ([`write_dir`]).
//!
//! Temporaries are named `.NAME.tmp-PID-N`. They are removed when the write fails, when
//! the process is stopped by SIGINT, SIGTERM or SIGHUP while one is open, and, if a
//! killed process left one behind, by the next write into the same directory once that
//! PID is gone.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` as the module header says.
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let written = resolve(path).and_then(|target| match target {
        Target::Special(p) => {
            // Devices and FIFOs are opened, not created or truncated: `/dev/null` stays a
            // device, a FIFO's reader gets the bytes.
            let mut f = OpenOptions::new().write(true).open(&p)?;
            f.write_all(bytes).and_then(|()| f.flush())
        }
        Target::File { path: p, permissions } => replace(&p, bytes, permissions.as_ref()),
    });
    written.map_err(|e| format!("cannot write `{}`: {e}", path.display()))
}

/// Checks, before a long run, that `path` can be written at its end: it is none of
/// `inputs` ([`refuse_input_as_output`]), its directory exists and it is not a directory.
/// The write itself still reports later failures.
pub fn check_output(path: &Path, inputs: &[PathBuf]) -> Result<(), String> {
    refuse_input_as_output(path, inputs)?;
    let shown = path.display();
    match resolve(path).map_err(|e| format!("cannot write `{shown}`: {e}"))? {
        Target::Special(_) => Ok(()),
        Target::File { path: p, .. } => {
            let dir = parent(&p);
            if dir.is_dir() {
                Ok(())
            } else {
                Err(format!("cannot write `{shown}`: the directory `{}` does not exist", dir.display()))
            }
        }
    }
}

/// Refuses an output that is one of the run's inputs (the same file, under any name):
/// writing it would destroy the input, and a memory-mapped checkpoint read during the
/// write would change under the reader.
pub fn refuse_input_as_output(out: &Path, inputs: &[PathBuf]) -> Result<(), String> {
    let Ok(target) = resolve(out) else { return Ok(()) };
    let (Target::File { path: p, .. } | Target::Special(p)) = target;
    for input in inputs {
        if same_file(&p, input) {
            return Err(format!("refusing to write `{}`: it is one of this command's inputs (`{}`)", out.display(), input.display()));
        }
    }
    Ok(())
}

/// Every file directly in `dir` (a model directory's config, weights and shards), for
/// [`refuse_input_as_output`].
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect()).unwrap_or_default()
}

/// Writes a directory of generated files (`dsc compile --target … -o DIR`) as a whole:
/// every file goes into `.NAME.tmp-PID-N/` beside `dir`, which is then swapped in, so
/// `dir` holds the old output or all of the new one, and no file of an earlier output
/// survives into the new one. `owned` names the entries a previous output may hold: a
/// directory with anything else in it is refused rather than replaced (it is not ours to
/// delete). A symlink to a directory stays a symlink.
pub fn write_dir(dir: &Path, files: &[(PathBuf, Vec<u8>)], owned: &[&str]) -> Result<(), String> {
    let shown = dir.display();
    let target = check_dir(dir, owned)?;
    let parent = parent(&target);
    let name = target.file_name().ok_or_else(|| format!("cannot write `{shown}`: no directory name"))?.to_os_string();
    remove_stale_temps(&parent, &name);
    let tmp = TempDir::create(&parent, &name).map_err(|e| format!("cannot write `{shown}`: {e}"))?;
    for (rel, bytes) in files {
        let p = tmp.0.join(rel);
        let made = p.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            let mut f = File::create(&p)?;
            f.write_all(bytes)?;
            f.sync_all()
        });
        made.map_err(|e| format!("cannot write `{}`: {e}", dir.join(rel).display()))?;
    }
    swap_in(&tmp.0, &target).map_err(|e| format!("cannot write `{shown}`: {e}"))?;
    Ok(())
}

/// Checks, before a long run, that [`write_dir`] may write `dir`: its parent exists and it
/// is new, empty, or holds only `owned` entries. Returns the directory a symlink names.
pub fn check_dir(dir: &Path, owned: &[&str]) -> Result<PathBuf, String> {
    let shown = dir.display();
    let (p, meta) = follow(dir).map_err(|e| format!("cannot write `{shown}`: {e}"))?;
    match meta {
        Some(m) if m.is_dir() => {
            let entries = std::fs::read_dir(&p).map_err(|e| format!("cannot write `{shown}`: {e}"))?;
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !owned.contains(&n.as_str()) {
                    return Err(format!(
                        "refusing to replace `{shown}`: it holds `{n}`, which an earlier output did not write; give a new or empty directory"
                    ));
                }
            }
            Ok(p)
        }
        Some(_) => Err(format!("cannot write `{shown}`: it exists and is not a directory")),
        None => {
            let up = parent(&p);
            if up.is_dir() {
                Ok(p)
            } else {
                Err(format!("cannot write `{shown}`: the directory `{}` does not exist", up.display()))
            }
        }
    }
}

/// Puts the finished `tmp` at `target`: a plain rename when `target` does not exist, else
/// an atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`) and the removal of the old
/// tree; where the exchange is not supported, two renames.
fn swap_in(tmp: &Path, target: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(target).is_err() {
        return std::fs::rename(tmp, target);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (a, b) = (std::ffi::CString::new(tmp.as_os_str().as_bytes())?, std::ffi::CString::new(target.as_os_str().as_bytes())?);
        // SAFETY: two valid NUL-terminated paths; the call only renames.
        let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            // `tmp` now holds the old output.
            return std::fs::remove_dir_all(tmp);
        }
    }
    let old = parent(target).join(format!(".{}.old-{}", target.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    std::fs::rename(target, &old)?;
    std::fs::rename(tmp, target)?;
    std::fs::remove_dir_all(&old)
}

/// A temporary directory removed (with its contents) when dropped; after a successful
/// [`swap_in`] it no longer exists or holds the old output, removed there.
struct TempDir(PathBuf);

impl TempDir {
    fn create(parent: &Path, name: &std::ffi::OsStr) -> std::io::Result<TempDir> {
        let pid = std::process::id();
        for attempt in 0..1000 {
            let p = parent.join(temp_name(name, pid, attempt));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary directory name"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the bytes go.
enum Target {
    /// A regular file (its permissions, when it exists) or a new path.
    File { path: PathBuf, permissions: Option<std::fs::Permissions> },
    /// A character or block device, a FIFO or a socket.
    Special(PathBuf),
}

/// Follows symlinks (at most 40, as the kernel does) to what `path` finally names: that
/// path, and its metadata unless nothing is there (a new path, a dangling link's target).
fn follow(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::Metadata>)> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((p, None)),
            Err(e) => return Err(e),
        };
        if !meta.file_type().is_symlink() {
            return Ok((p, Some(meta)));
        }
        let link = std::fs::read_link(&p)?;
        let next = if link.is_absolute() { link } else { parent(&p).join(link) };
        if let (Err(e), Ok(m)) = (std::fs::symlink_metadata(&next), std::fs::metadata(&p)) {
            if e.kind() == std::io::ErrorKind::NotFound {
                // A link whose text names no path but that the kernel opens all the same:
                // `/proc/self/fd/1` reads `pipe:[1234]`. It stays `p`, and is written
                // through ([`resolve`] makes it a special target).
                return Ok((p, Some(m)));
            }
        }
        p = next;
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// What a file output's `path` finally names, as a [`Target`].
fn resolve(path: &Path) -> std::io::Result<Target> {
    match follow(path)? {
        (p, None) => Ok(Target::File { path: p, permissions: None }),
        (_, Some(m)) if m.is_dir() => Err(std::io::Error::other("it is a directory")),
        // Still a link: one only the kernel resolves, written through whatever it is.
        (p, Some(_)) if std::fs::symlink_metadata(&p).is_ok_and(|l| l.file_type().is_symlink()) => Ok(Target::Special(p)),
        (p, Some(m)) if m.is_file() => Ok(Target::File { path: p, permissions: Some(m.permissions()) }),
        (p, Some(_)) => Ok(Target::Special(p)),
    }
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    }
}

/// The atomic replacement of a regular file (or creation of a new one).
fn replace(path: &Path, bytes: &[u8], permissions: Option<&std::fs::Permissions>) -> std::io::Result<()> {
    let dir = parent(path);
    let name = path.file_name().ok_or_else(|| std::io::Error::other("no file name"))?.to_os_string();
    remove_stale_temps(&dir, &name);
    let (mut file, tmp) = create_temp(&dir, &name)?;
    let mut result = file.write_all(bytes);
    if let (Ok(()), Some(p)) = (&result, permissions) {
        result = file.set_permissions(p.clone());
    }
    let result = result.and_then(|()| file.sync_all());
    drop(file);
    result.and_then(|()| std::fs::rename(&tmp.path, path))?;
    tmp.keep();
    Ok(())
}

/// A temporary file that is deleted when dropped (and on SIGINT/SIGTERM/SIGHUP while it
/// lives), unless [`TempPath::keep`] says it has been renamed into place.
struct TempPath {
    path: PathBuf,
    slot: Option<usize>,
}

impl TempPath {
    /// The file has been renamed into place: nothing to remove (the drop only unregisters).
    fn keep(mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            signals::unregister(s);
        }
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn temp_name(name: &std::ffi::OsStr, pid: u32, attempt: u32) -> OsString {
    let mut n = OsString::from(".");
    n.push(name);
    n.push(format!(".tmp-{pid}-{attempt}"));
    n
}

/// Creates `.NAME.tmp-PID-N` in `dir`; `create_new` never reuses an existing file, which
/// could belong to a concurrent writer.
fn create_temp(dir: &Path, name: &std::ffi::OsStr) -> std::io::Result<(File, TempPath)> {
    let pid = std::process::id();
    let mut attempt = 0u32;
    loop {
        let tmp = dir.join(temp_name(name, pid, attempt));
        // Registered before it exists, so that a signal between the two cannot leave it.
        let slot = signals::register(&tmp);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((f, TempPath { path: tmp, slot })),
            Err(e) => {
                if let Some(s) = slot {
                    signals::unregister(s);
                }
                if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 {
                    attempt += 1;
                } else {
                    return Err(e);
                }
            }
        }
    }
}

/// Removes `.NAME.tmp-PID-N` files in `dir` whose process no longer runs (left by a run
/// that was killed with SIGKILL, or lost power). Only where `/proc` tells which PIDs run.
fn remove_stale_temps(dir: &Path, name: &std::ffi::OsStr) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let Some((pid, n)) = rest.split_once('-') else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_file() => {
                let _ = std::fs::remove_file(e.path());
            }
            // A directory output's temporary ([`write_dir`]).
            Ok(t) if t.is_dir() => {
                let _ = std::fs::remove_dir_all(e.path());
            }
            _ => {}
        }
    }
}

/// Removal of open temporaries when the process is stopped by a signal. The handler may
/// only call async-signal-safe functions, so the paths live in a fixed table of C strings
/// (atomic pointers) that it reads without locking, and it calls `unlink` on each, then
/// re-raises the signal with its default action so the exit status tells what happened.
#[cfg(unix)]
mod signals {
    use std::ffi::{c_char, c_int, CString};
    use std::path::Path;
    use std::sync::atomic::{AtomicPtr, Ordering};
    use std::sync::Once;

    const SLOTS: usize = 64;
    static TEMPS: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
    static INSTALL: Once = Once::new();

    extern "C" fn on_signal(sig: c_int) {
        for slot in &TEMPS {
            let p = slot.load(Ordering::SeqCst);
            if !p.is_null() {
                // SAFETY: `p` came from `CString::into_raw` and is freed only after it has
                // been swapped out of the table; unlink is async-signal-safe.
                unsafe { libc::unlink(p) };
            }
        }
        // SAFETY: restoring the default action and re-raising are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }

    /// Puts `path` in the table; `None` when it is full (the file is then only removed on
    /// drop and by the next run's stale-temporary sweep).
    pub fn register(path: &Path) -> Option<usize> {
        use std::os::unix::ffi::OsStrExt;
        INSTALL.call_once(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: installs a handler that only calls async-signal-safe functions.
                // A signal that was ignored (nohup) stays ignored.
                unsafe {
                    let old = libc::signal(sig, on_signal as extern "C" fn(c_int) as libc::sighandler_t);
                    if old == libc::SIG_IGN {
                        libc::signal(sig, libc::SIG_IGN);
                    }
                }
            }
        });
        let c = CString::new(path.as_os_str().as_bytes()).ok()?.into_raw();
        for (i, slot) in TEMPS.iter().enumerate() {
            if slot.compare_exchange(std::ptr::null_mut(), c, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Some(i);
            }
        }
        // SAFETY: `c` came from `into_raw` above and was never published.
        drop(unsafe { CString::from_raw(c) });
        None
    }

    pub fn unregister(slot: usize) {
        let p = TEMPS[slot].swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` came from `into_raw` in `register`, and the table no longer holds it.
            drop(unsafe { CString::from_raw(p) });
        }
    }
}

#[cfg(not(unix))]
mod signals {
    pub fn register(_: &std::path::Path) -> Option<usize> {
        None
    }
    pub fn unregister(_: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn new_and_regular_files_are_replaced_whole_keeping_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let d = TestDir::new("regular");
        let f = d.0.join("out.txt");
        write_output(&f, b"one").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_output(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(d.names(), ["out.txt"], "no temporary left");
        let e = write_output(&d.0, b"x").unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let e = write_output(&d.0.join("missing/out.txt"), b"x").unwrap_err();
        assert!(e.contains("missing/out.txt"), "{e}");
        let e = check_output(&d.0.join("missing/out.txt"), &[]).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        check_output(&f, &[]).unwrap();
    }

    #[test]
    fn symlinks_stay_symlinks() {
        let d = TestDir::new("symlink");
        let real = d.0.join("real.txt");
        std::fs::write(&real, b"old").unwrap();
        let link = d.0.join("link.txt");
        std::os::unix::fs::symlink("real.txt", &link).unwrap();
        let chain = d.0.join("chain.txt");
        std::os::unix::fs::symlink(&link, &chain).unwrap();
        write_output(&chain, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(std::fs::symlink_metadata(&chain).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        // A dangling link creates its target.
        let dangling = d.0.join("dangling.txt");
        std::os::unix::fs::symlink("target.txt", &dangling).unwrap();
        write_output(&dangling, b"made").unwrap();
        assert_eq!(std::fs::read(d.0.join("target.txt")).unwrap(), b"made");
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
    }

    /// A link to `/proc/self/fd/N` (its text, `pipe:[…]`, names no path) is written
    /// through to the pipe, as a shell's `> /proc/self/fd/1` would, and stays a link.
    #[test]
    fn a_link_to_a_proc_fd_writes_through() {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let d = TestDir::new("procfd");
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors this test then owns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (mut r, w) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        let link = d.0.join("out");
        std::os::unix::fs::symlink(format!("/proc/self/fd/{}", fds[1]), &link).unwrap();
        write_output(&link, b"to the pipe").unwrap();
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"to the pipe");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }

    #[test]
    fn a_fifo_is_written_to_not_replaced() {
        let d = TestDir::new("fifo");
        let fifo = d.0.join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).unwrap())
        };
        write_output(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");
        // /dev/null is a device every machine has; writing it must leave it one.
        write_output(Path::new("/dev/null"), b"discarded").unwrap();
        assert!(std::fs::symlink_metadata("/dev/null").unwrap().file_type().is_char_device());
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_swept() {
        let d = TestDir::new("stale");
        // 4294967294 is no running process; a live PID (ours) must be left alone.
        let dead = d.0.join(".out.txt.tmp-4294967294-0");
        let live = d.0.join(format!(".out.txt.tmp-{}-7", std::process::id()));
        let other = d.0.join(".other.txt.tmp-4294967294-0");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        write_output(&d.0.join("out.txt"), b"done").unwrap();
        assert!(!dead.exists() && live.exists() && other.exists(), "{:?}", d.names());
    }

    #[test]
    fn directories_are_replaced_whole_and_only_when_ours() {
        let d = TestDir::new("dir");
        let out = d.0.join("out");
        let owned = ["kernels", "plan.json"];
        let files =
            |names: &[&str]| -> Vec<(PathBuf, Vec<u8>)> { names.iter().map(|n| (PathBuf::from(n), n.as_bytes().to_vec())).collect() };
        write_dir(&out, &files(&["kernels/a.cu", "kernels/b.cu", "plan.json"]), &owned).unwrap();
        assert_eq!(std::fs::read(out.join("kernels/b.cu")).unwrap(), b"kernels/b.cu");
        // Rewritten: the stale kernel b.cu is gone, no temporary is left.
        write_dir(&out, &files(&["kernels/a.cu", "plan.json"]), &owned).unwrap();
        assert!(out.join("kernels/a.cu").is_file() && !out.join("kernels/b.cu").exists());
        assert_eq!(d.names(), ["out"]);
        // Through a symlink: the link stays.
        let link = d.0.join("link");
        std::os::unix::fs::symlink("out", &link).unwrap();
        write_dir(&link, &files(&["plan.json"]), &owned).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink() && !out.join("kernels").exists());
        // A directory with files that are not ours is refused and left alone.
        std::fs::write(out.join("notes.md"), b"mine").unwrap();
        let e = write_dir(&out, &files(&["plan.json"]), &owned).unwrap_err();
        assert!(e.contains("`notes.md`"), "{e}");
        assert!(out.join("notes.md").is_file());
        let e = check_dir(&d.0.join("missing/out"), &owned).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }

    /// A process stopped by SIGTERM while a temporary is open removes it and still dies of
    /// the signal. The test runs itself as the child (`DSC_OUTPUT_SIGNAL_CHILD` set): the
    /// child opens a temporary, prints its path and raises SIGTERM.
    #[test]
    fn a_signal_removes_open_temporaries() {
        if let Some(dir) = std::env::var_os("DSC_OUTPUT_SIGNAL_CHILD") {
            let (_file, tmp) = create_temp(Path::new(&dir), std::ffi::OsStr::new("out.bin")).unwrap();
            println!("TEMP {}", tmp.path.display());
            std::io::stdout().flush().unwrap();
            // SAFETY: raising a signal at ourselves.
            unsafe { libc::raise(libc::SIGTERM) };
            unreachable!("SIGTERM's default action ends the process");
        }
        let d = TestDir::new("signal");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "output::tests::a_signal_removes_open_temporaries", "--nocapture", "--test-threads=1"])
            .env("DSC_OUTPUT_SIGNAL_CHILD", &d.0)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let temp = stdout.lines().find_map(|l| l.split_once("TEMP ").map(|(_, p)| p.trim())).unwrap_or_else(|| panic!("{stdout}"));
        assert!(temp.contains(".out.bin.tmp-"), "{temp}");
        assert!(!Path::new(temp).exists() && d.names().is_empty(), "{:?}", d.names());
    }

    #[test]
    fn an_input_is_refused_as_the_output() {
        let d = TestDir::new("input");
        let input = d.0.join("model.safetensors");
        std::fs::write(&input, b"weights").unwrap();
        let link = d.0.join("alias");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let e = refuse_input_as_output(&link, &files_in(&d.0)).unwrap_err();
        assert!(e.contains("one of this command's inputs"), "{e}");
        refuse_input_as_output(&d.0.join("new.safetensors"), &files_in(&d.0)).unwrap();
    }
}
