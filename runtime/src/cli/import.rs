//! `dsc import CONFIG [--out FILE] [--name NAME]`: a Hugging Face `config.json` as a
//! canonical spec, on stdout or written to a file ([`crate::output`]).

use crate::output::write_output;
use std::io::Write;
use std::path::Path;

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
        Some(path) => {
            crate::output::refuse_input_as_output(path, &[config.to_path_buf()])?;
            write_output(path, text.as_bytes())
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use std::path::PathBuf;

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
        assert_eq!(dir.names(), ["v2.dsc"], "no temporary file may remain");

        // Replacing an existing file, with an explicit name.
        import_cmd(&fixture("llama_gqa"), Some(&out), Some("my_llama")).unwrap();
        assert_eq!(dsc_dsl::load(&out, None).unwrap().model.name, "my_llama");
        assert_eq!(dir.names(), ["v2.dsc"]);
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
        let e = write_output(&dir.0, b"text").unwrap_err();
        assert!(e.contains("directory"), "{e}");
        // A missing directory: nothing is created.
        let e = write_output(&dir.0.join("missing/x.dsc"), b"text").unwrap_err();
        assert!(e.contains("missing"), "{e}");
        assert_eq!(dir.names(), ["config.json", "x.dsc"]);
    }

    #[test]
    fn header_path_cannot_break_out_of_the_comment() {
        let model = dsc_dsl::import::import_hf_config_file(&fixture("llama_dense"), None).unwrap();
        let text = spec_text(Path::new("odd\ndir/config.json"), &model);
        assert!(text.lines().next().unwrap().ends_with("\"odd\\ndir/config.json\"."), "{text}");
        assert_eq!(dsc_dsl::load_str(Path::new("x.dsc"), &text, None).unwrap().model, model);
    }
}
