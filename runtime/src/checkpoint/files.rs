//! The safetensors files of a model directory: which ones (one `model.safetensors`, or
//! the shards a `model.safetensors.index.json` names), each memory-mapped with its header
//! parsed and validated.
//!
//! Opening a file reads only its header: the mapping costs address space, not memory,
//! and tensor bytes are paged in when a tensor is first decoded. The header is checked
//! against the file size before anything else (safetensors' `read_metadata` verifies that
//! the offsets tile the data section exactly), so a truncated or padded file is an error
//! here and no later slice of the mapping can go out of bounds.

use super::error::CheckpointError;
use memmap2::Mmap;
use safetensors::tensor::{SafeTensorError, TensorInfo};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The single-file name transformers writes.
pub const SINGLE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    /// Where the data section starts (8-byte length + header).
    data_start: usize,
    pub tensors: HashMap<String, TensorInfo>,
    /// This mapping's entry in the SIGBUS handler's table.
    slot: Option<usize>,
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            sigbus::unregister(s);
        }
    }
}

impl Shard {
    /// Maps `path` and validates its header against the file's size.
    pub fn open(path: &Path) -> Result<Shard, CheckpointError> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        let len = file.metadata().map_err(|e| CheckpointError::io(path, e))?.len();
        // An empty file cannot be mapped on every platform; it is corrupt either way.
        if len < 8 {
            return Err(CheckpointError::corrupt(path, format!("the file is {len} bytes, shorter than the 8-byte header length")));
        }
        // SAFETY: the mapping is read-only and private to this process. Like every
        // memory-mapped reader (safetensors' own examples, candle) this relies on the
        // file not being truncated by another process while it is mapped; if it is, the
        // read dies with SIGBUS, and `sigbus` names the file on the way out.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        let slot = sigbus::register(&map, path);
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| CheckpointError::corrupt(path, describe(&e, &map)))?;
        if let Some(name) = duplicate_name(&map) {
            return Err(CheckpointError::corrupt(path, format!("its header names tensor `{name}` twice (the format forbids it)")));
        }
        let tensors = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        Ok(Shard { path: path.to_path_buf(), map, data_start: 8 + n, tensors, slot })
    }

    /// The stored bytes of one of this file's tensors. In range by construction: the
    /// header was validated against the file size when it was opened.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let (s, e) = info.data_offsets;
        &self.map[self.data_start + s..self.data_start + e]
    }

    /// Drops the pages that hold only this tensor from the process's memory, once it has
    /// been copied out (widened or kept as bf16): otherwise a decoded weight costs its
    /// copy *and* its mapped pages in resident memory. The file's contents do not change,
    /// so a later read faults the pages back in, from the page cache.
    pub fn release(&self, info: &TensorInfo) {
        let (s, e) = info.data_offsets;
        self.release_range(self.data_start + s..self.data_start + e);
    }

    /// One of this file's tensors' bytes handed to `f` a few MiB at a time, each piece's
    /// whole pages released once `f` has it: copying a tensor out then holds at most one
    /// piece of its mapping resident beside the copy (a whole 32 MiB embedding mapped and
    /// copied at once, on two threads, raised a bf16 model's peak resident memory by a
    /// quarter of the checkpoint). `f` gets pieces whose lengths are multiples of `unit`.
    pub fn stream(&self, info: &TensorInfo, unit: usize, mut f: impl FnMut(&[u8])) {
        const PIECE: usize = 4 << 20;
        let (s, e) = info.data_offsets;
        let step = (PIECE / unit.max(1)).max(1) * unit.max(1);
        let mut at = self.data_start + s;
        let end = self.data_start + e;
        while at < end {
            let next = (at + step).min(end);
            f(&self.map[at..next]);
            self.release_range(at..next);
            at = next;
        }
    }

    /// Drops the whole pages inside `range` of the mapping (see [`Shard::release`]).
    fn release_range(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
            let (start, end) = (range.start.div_ceil(page) * page, range.end / page * page);
            if end > start {
                // SAFETY: the mapping is read-only and never written; after DONTNEED a read
                // of these pages faults in the file's contents again (the same bytes,
                // under the same no-truncation assumption as the mapping itself). Advice
                // only: a failure leaves the pages resident, nothing else.
                let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }

    /// Bytes of the file (its mapping).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A tensor name that the header of safetensors file `bytes` holds twice. JSON parsers,
/// safetensors' among them, keep one of two equal keys silently; the format forbids them,
/// and which tensor a name means must not depend on the parser. `None` when there is none
/// or the header is not a JSON object (which the format's own checks report).
pub(crate) fn duplicate_name(bytes: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Option<String>, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                if !seen.insert(k.clone()) {
                    return Ok(Some(k));
                }
            }
            Ok(None)
        }
    }
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    serde_json::Deserializer::from_slice(header).deserialize_map(Keys).ok().flatten()
}

/// safetensors' error in words that say what is wrong with the file.
fn describe(e: &SafeTensorError, bytes: &[u8]) -> String {
    let declared = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match e {
        SafeTensorError::InvalidHeaderLength => format!(
            "its header length ({} bytes) runs past the end of the file ({} bytes): the file is truncated or not safetensors",
            declared.unwrap_or(0),
            bytes.len()
        ),
        SafeTensorError::MetadataIncompleteBuffer => {
            "its data section is not the size its header describes: the file is truncated, or has bytes appended".to_string()
        }
        SafeTensorError::HeaderTooLarge => format!("its header length ({} bytes) is implausibly large", declared.unwrap_or(0)),
        other => other.to_string(),
    }
}

/// The files of the checkpoint in `dir`, opened; for a sharded checkpoint also checks
/// that the index and the shards agree.
pub fn open_all(dir: &Path) -> Result<Vec<Shard>, CheckpointError> {
    let index = dir.join(INDEX);
    if index.is_file() {
        return open_sharded(&index);
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![Shard::open(&single)?]);
    }
    if !dir.is_dir() {
        return Err(CheckpointError::io(dir, "no such directory"));
    }
    let mut others: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| CheckpointError::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    others.sort();
    let found = if others.is_empty() { String::new() } else { format!(" (found {}, but no index naming them)", others.join(", ")) };
    Err(CheckpointError::io(dir, format!("no `{SINGLE}` or `{INDEX}`{found}")))
}

/// `model.safetensors.index.json`: `{"metadata": {...}, "weight_map": {tensor: file}}`.
fn open_sharded(index: &Path) -> Result<Vec<Shard>, CheckpointError> {
    let text = std::fs::read_to_string(index).map_err(|e| CheckpointError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| CheckpointError::index(index, format!("not valid JSON: {e}")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(CheckpointError::index(index, "no `weight_map` object"));
    };
    let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(CheckpointError::index(index, format!("`weight_map` gives `{tensor}` a non-string file: {file}")));
        };
        // Shards live beside the index; a path that climbs out of the directory is not
        // a shard of this checkpoint.
        if Path::new(file).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(CheckpointError::index(index, format!("`{tensor}` is in `{file}`, which is not a file beside the index")));
        }
        by_file.entry(file.to_string()).or_default().insert(tensor.clone());
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards = Vec::new();
    let mut problems = Vec::new();
    for (file, listed) in &by_file {
        let path = dir.join(file);
        if !path.is_file() {
            problems.push(format!("`{file}` (named for {} tensors) is not there", listed.len()));
            continue;
        }
        let shard = Shard::open(&path)?;
        let mut absent: Vec<&String> = listed.iter().filter(|t| !shard.tensors.contains_key(*t)).collect();
        absent.sort();
        if !absent.is_empty() {
            problems.push(format!("`{file}` lacks {} tensor(s) the index puts there: {}", absent.len(), preview(&absent)));
        }
        let mut unlisted: Vec<&String> = shard.tensors.keys().filter(|t| !listed.contains(*t)).collect();
        unlisted.sort();
        if !unlisted.is_empty() {
            problems.push(format!("`{file}` holds {} tensor(s) the index does not list there: {}", unlisted.len(), preview(&unlisted)));
        }
        shards.push(shard);
    }
    if !problems.is_empty() {
        return Err(CheckpointError::index(index, format!("the index and its shards disagree:\n  {}", problems.join("\n  "))));
    }
    Ok(shards)
}

fn preview(names: &[&String]) -> String {
    let shown: Vec<String> = names.iter().take(8).map(|n| format!("`{n}`")).collect();
    let more = if names.len() > 8 { format!(" and {} more", names.len() - 8) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

/// A file that shrinks while it is mapped (another process truncates or rewrites a
/// checkpoint during a run) makes the next read of a page past its new end raise SIGBUS,
/// which kills the process with no word of why. This cannot be prevented short of
/// copying the file, so the handler says which file it was: it looks the faulting address
/// up in a fixed table of mappings (atomics, no locks or allocation, as a signal handler
/// must), writes the message, and restores the default action, so the retried read ends
/// the process with SIGBUS as before.
#[cfg(unix)]
mod sigbus {
    use std::ffi::c_int;
    use std::path::Path;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
    use std::sync::Once;

    const SLOTS: usize = 256;
    /// `[start, end)` of a mapping (0..0 when free) and its message (leaked: a message
    /// the handler may be reading is never freed).
    struct Slot {
        start: AtomicUsize,
        end: AtomicUsize,
        msg: AtomicPtr<u8>,
        len: AtomicUsize,
    }
    static TABLE: [Slot; SLOTS] = [const {
        Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), msg: AtomicPtr::new(std::ptr::null_mut()), len: AtomicUsize::new(0) }
    }; SLOTS];
    static INSTALL: Once = Once::new();
    const UNKNOWN: &[u8] =
        b"dsc: SIGBUS: a memory-mapped file shrank while it was read (a checkpoint truncated or rewritten during the run?)\n";

    extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        let (mut msg, mut len) = (UNKNOWN.as_ptr(), UNKNOWN.len());
        for s in &TABLE {
            if s.start.load(Ordering::SeqCst) <= addr && addr < s.end.load(Ordering::SeqCst) {
                let p = s.msg.load(Ordering::SeqCst);
                if !p.is_null() {
                    (msg, len) = (p as *const u8, s.len.load(Ordering::SeqCst));
                }
                break;
            }
        }
        // SAFETY: write, signal and raise are async-signal-safe; `msg` points to `len`
        // bytes that are never freed.
        unsafe {
            libc::write(2, msg.cast(), len);
            libc::signal(sig, libc::SIG_DFL);
        }
    }

    /// Enters `map` (the mapping of `path`) in the table; `None` when it is full (a
    /// SIGBUS there then gets the message without the file's name).
    pub fn register(map: &[u8], path: &Path) -> Option<usize> {
        INSTALL.call_once(|| {
            // SAFETY: installs a handler that only calls async-signal-safe functions.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigbus as extern "C" fn(c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
        });
        let text = format!(
            "dsc: `{}` changed while dsc had it mapped (truncated or rewritten by another process?): reading it raised SIGBUS\n",
            path.display()
        );
        let text: &'static mut [u8] = Box::leak(text.into_bytes().into_boxed_slice());
        let start = map.as_ptr() as usize;
        for (i, s) in TABLE.iter().enumerate() {
            if s.start.load(Ordering::SeqCst) == 0 && s.start.compare_exchange(0, usize::MAX, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                // Claimed (start = MAX matches no address) until the range is complete.
                s.msg.store(text.as_mut_ptr(), Ordering::SeqCst);
                s.len.store(text.len(), Ordering::SeqCst);
                s.end.store(start + map.len(), Ordering::SeqCst);
                s.start.store(start, Ordering::SeqCst);
                return Some(i);
            }
        }
        None
    }

    pub fn unregister(slot: usize) {
        let s = &TABLE[slot];
        s.end.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
    }
}

#[cfg(not(unix))]
mod sigbus {
    pub fn register(_: &[u8], _: &std::path::Path) -> Option<usize> {
        None
    }
    pub fn unregister(_: usize) {}
}
