//! Golden snapshots of the resolved form of every spec in `specs/` (`golden/resolved/`):
//! what `dsc check --resolved` prints, with inheritance flattened and every documented
//! default written out. A change to resolution or to a spec shows up here as a diff.

#[test]
fn every_spec_resolves_to_its_snapshot() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../golden/resolved");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::glob!("../..", "specs/**/*.dsc", |path| {
            let spec = dsc_dsl::load(path, None).unwrap_or_else(|f| panic!("{}:\n{}", path.display(), f.render()));
            let text = dsc_dsl::print::print_model(&spec.model);
            // The printed form is itself a spec that resolves to the same model.
            let again = dsc_dsl::load_str(std::path::Path::new("resolved.dsc"), &text, None).expect("printed spec resolves");
            assert_eq!(again.model, spec.model);
            insta::assert_snapshot!("resolved", text);
        });
    });
}
