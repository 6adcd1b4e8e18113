//! `dsc import CONFIG [--out FILE] [--name NAME]`: a Hugging Face `config.json` as a
//! canonical spec, on stdout or written atomically to a file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Imports `config` and prints the spec, or writes it to `out`. The model is named `name`,
/// else after the config's directory (`DeepSeek-V3/config.json` → `deepseek_v3`), else
/// `imported`.
pub fn import_cmd(config: &Path, out: Option<&Path>, name: Option<&str>) -> Result<(), String> {
    let model = dsc_dsl::import::import_hf_config_file(config, name)?;
    let text = spec_text(config, &model);
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| format!("cannot write the spec to stdout: {e}"))
        }
        Some(path) => write_atomically(path, text.as_bytes()),
    }
}

/// The spec with a header saying where it came from.
fn spec_text(config: &Path, model: &dsc_dsl::Model) -> String {
    // Debug-quoting keeps a path with a newline in it from ending the comment.
    let from = format!("{:?}", config.display().to_string());
    format!(
        "// Imported by `dsc import` from {from}.\n\
         // Every field is written out, documented defaults included.\n{}",
        dsc_dsl::print::print_model(model)
    )
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of the new
/// one, never a part: the text goes to a temporary file in the same directory (so the
/// final rename stays within one file system), is flushed to disk, then renamed over
/// `path`. On any failure the temporary file is removed and `path` is untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let shown = path.display();
    if path.is_dir() {
        return Err(format!("cannot write `{shown}`: it is a directory"));
    }
    let file_name = path.file_name().ok_or_else(|| format!("cannot write `{shown}`: no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (mut file, tmp) = create_temp(&dir, &file_name.to_string_lossy()).map_err(|e| format!("cannot write `{shown}`: {e}"))?;
    let result = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    let result = result.and_then(|()| std::fs::rename(&tmp.0, path));
    match result {
        Ok(()) => {
            tmp.keep();
            Ok(())
        }
        // `tmp` is removed when dropped.
        Err(e) => Err(format!("cannot write `{shown}`: {e}")),
    }
}

/// A temporary file that is deleted when dropped, unless [`TempPath::keep`] says it has
/// been renamed into place.
struct TempPath(PathBuf);

impl TempPath {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates `.NAME.tmp-PID-N` in `dir`; `create_new` never reuses an existing file, which
/// could belong to a concurrent writer.
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(File, TempPath)> {
    let pid = std::process::id();
    let mut attempt = 0u32;
    loop {
        let tmp = dir.join(format!(".{name}.tmp-{pid}-{attempt}"));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((f, TempPath(tmp))),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty directory under the system temp dir, removed at the end of the test.
    struct TestDir(PathBuf);
    impl TestDir {
        fn new(tag: &str) -> TestDir {
            let d = std::env::temp_dir().join(format!("dsc-import-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TestDir(d)
        }
        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> =
                std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }
    }
    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(name).join("config_legacy.json")
    }

    #[test]
    fn writes_a_spec_that_resolves_to_the_imported_model() {
        let dir = TestDir::new("spec");
        let out = dir.0.join("v2.dsc");
        import_cmd(&fixture("deepseek_v2"), Some(&out), None).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("// Imported by `dsc import` from \""), "{text}");
        assert!(text.contains("config_legacy.json"), "{text}");
        let spec = dsc_dsl::load(&out, None).unwrap_or_else(|f| panic!("{}", f.render()));
        // Named after the fixture's directory.
        assert_eq!(spec.model.name, "deepseek_v2");
        assert_eq!(spec.model, dsc_dsl::import::import_hf_config_file(&fixture("deepseek_v2"), None).unwrap());
        assert_eq!(dir.entries(), ["v2.dsc"], "no temporary file may remain");

        // Replacing an existing file, with an explicit name.
        import_cmd(&fixture("llama_gqa"), Some(&out), Some("my_llama")).unwrap();
        assert_eq!(dsc_dsl::load(&out, None).unwrap().model.name, "my_llama");
        assert_eq!(dir.entries(), ["v2.dsc"]);
    }

    #[test]
    fn a_failed_import_or_write_leaves_nothing_behind() {
        let dir = TestDir::new("fail");
        let out = dir.0.join("x.dsc");
        std::fs::write(&out, "old").unwrap();
        // A config that does not import: the old file stays as it was.
        let bad = dir.0.join("config.json");
        std::fs::write(&bad, r#"{"model_type": "gpt2"}"#).unwrap();
        let e = import_cmd(&bad, Some(&out), None).unwrap_err();
        assert!(e.contains("model_type") && e.contains("config.json"), "{e}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old");
        // A directory in place of the output file.
        let e = write_atomically(&dir.0, b"text").unwrap_err();
        assert!(e.contains("directory"), "{e}");
        // A missing directory: nothing is created.
        let e = write_atomically(&dir.0.join("missing/x.dsc"), b"text").unwrap_err();
        assert!(e.contains("missing"), "{e}");
        assert_eq!(dir.entries(), ["config.json", "x.dsc"]);
    }

    #[test]
    fn header_path_cannot_break_out_of_the_comment() {
        let model = dsc_dsl::import::import_hf_config_file(&fixture("llama_dense"), None).unwrap();
        let text = spec_text(Path::new("odd\ndir/config.json"), &model);
        assert!(text.lines().next().unwrap().ends_with("\"odd\\ndir/config.json\"."), "{text}");
        assert_eq!(dsc_dsl::load_str(Path::new("x.dsc"), &text, None).unwrap().model, model);
    }
}
