//! Diagnostics golden tests: each `tests/ui/*.dsc` is a broken spec whose rendered errors
//! are snapshotted in `golden/diagnostics/`. Beyond the snapshot, every case must fail
//! (never resolve, never panic) and every error must point at a line of the file, so a
//! careless re-bless cannot turn an error into a success or lose its location.

use std::path::Path;

/// A case may pick its model with a `//@ model: NAME` line (as `--model NAME` would).
fn model_directive(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix("//@ model: ").map(|m| m.trim().to_string()))
}

#[test]
fn broken_specs_render_pointed_diagnostics() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../golden/diagnostics");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::glob!("..", "ui/*.dsc", |path| {
            // cargo runs tests from the package root, so `ui/x.dsc` names the file the same
            // way on every machine and includes resolve next to it.
            let rel = Path::new("ui").join(path.file_name().unwrap());
            let failure = match dsc_dsl::load(&rel, model_directive(path).as_deref()) {
                Ok(spec) => panic!("{} resolved to model `{}` but must fail", rel.display(), spec.model.name),
                Err(f) => f,
            };
            assert!(!failure.diagnostics.is_empty());
            let rendered = failure.render();
            for d in &failure.diagnostics.0 {
                // Most point into the case itself; a child's error may point into its parent.
                if let Some(span) = d.span {
                    assert!(rendered.contains(&format!("[{}]", failure.sources.location(span))), "location missing in:\n{rendered}");
                }
            }
            insta::assert_snapshot!("ui", rendered);
        });
    });
}

/// The `did you mean` hints are the point of several cases; assert them outright.
#[test]
fn misspellings_get_suggestions() {
    for (file, hint) in [
        ("ui/unknown_field.dsc", "did you mean `intermediate`?"),
        ("ui/bad_enum_value.dsc", "did you mean `sigmoid`?"),
        ("ui/unknown_parent.dsc", "did you mean `base`?"),
    ] {
        let f = dsc_dsl::load(Path::new(file), model_directive(Path::new(file)).as_deref()).expect_err(file);
        assert!(f.render().contains(hint), "{file}: no `{hint}` in\n{}", f.render());
    }
}

/// An included file is named without `dir/..` steps (`mine/../specs/x.dsc` is shown as
/// `specs/x.dsc`), except where a symlink makes `..` lead elsewhere.
#[cfg(unix)]
#[test]
fn included_files_are_named_without_dot_dot() {
    let root = std::env::temp_dir().join(format!("dsc-ui-tidy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["mine", "specs", "far/deep"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // A parent with an error, so that a diagnostic names its file.
    std::fs::write(root.join("specs/base.dsc"), "model base {\n  vocab = -1\n}\n").unwrap();
    std::fs::write(root.join("far/base.dsc"), "model base {\n  vocab = -1\n}\n").unwrap();
    std::fs::write(root.join("mine/child.dsc"), "include \"../specs/base.dsc\"\nmodel child extends base {}\n").unwrap();
    let f = dsc_dsl::load(&root.join("mine/child.dsc"), Some("child")).expect_err("vocab = -1");
    let text = f.render();
    assert!(text.contains(&format!("[{}:2:", root.join("specs/base.dsc").display())), "{text}");
    assert!(!text.contains("/../"), "{text}");
    // `link` is `far/deep`, so `link/../base.dsc` is `far/base.dsc`, not `base.dsc`.
    std::os::unix::fs::symlink(root.join("far/deep"), root.join("link")).unwrap();
    std::fs::write(root.join("far/deep/child.dsc"), "include \"../base.dsc\"\nmodel child extends base {}\n").unwrap();
    let f = dsc_dsl::load(&root.join("link/child.dsc"), Some("child")).expect_err("vocab = -1");
    assert!(f.render().contains(&format!("[{}:2:", root.join("link/../base.dsc").display())), "{}", f.render());
    std::fs::remove_dir_all(&root).unwrap();
}
