//! Reading the text files dsc takes as input (specs, includes, configs, token-id lists,
//! recipes): only regular files, since a device or FIFO given where a file is expected
//! could be endless (`dsc check /dev/zero` used 4 GB before failing), and at most a
//! stated size, named in the message when a file is larger.

use std::io::Read;
use std::path::Path;

/// Specs, includes and recipes: hand-written text.
pub const TEXT_LIMIT: u64 = 16 << 20;
/// JSON inputs (configs, token ids, GRPO batches), which programs write.
pub const JSON_LIMIT: u64 = 1 << 30;

/// The whole of `path` as UTF-8, if it is a regular file (symlinks followed) of at most
/// `limit` bytes. The error says what is wrong, without the path (callers name it).
pub fn read_text(path: &Path, limit: u64) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("it is a directory".into());
    }
    if !meta.is_file() {
        return Err("it is not a regular file (a device, FIFO or socket)".into());
    }
    let too_big = |n: u64| format!("it is {n} bytes; files of this kind are limited to {limit} bytes");
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // `take` also bounds a file that grows while it is read.
    std::fs::File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes)).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| format!("it is not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let d = std::env::temp_dir().join(format!("dsc-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("a.txt");
        std::fs::write(&f, "hello").unwrap();
        assert_eq!(read_text(&f, 5).unwrap(), "hello");
        assert_eq!(read_text(&f, 4).unwrap_err(), "it is 5 bytes; files of this kind are limited to 4 bytes");
        assert_eq!(read_text(&d, 100).unwrap_err(), "it is a directory");
        assert!(read_text(Path::new("/dev/zero"), 100).unwrap_err().contains("not a regular file"));
        std::fs::write(&f, [0x66, 0xff, 0x66]).unwrap();
        assert!(read_text(&f, 100).unwrap_err().contains("not UTF-8"));
        assert!(read_text(&d.join("missing"), 100).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
