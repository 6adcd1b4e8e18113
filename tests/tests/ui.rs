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
                if d.span.is_some() {
                    assert!(rendered.contains(&format!("[{}:", rel.display())), "location missing in:\n{rendered}");
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
