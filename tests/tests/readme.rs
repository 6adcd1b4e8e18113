//! The README's examples are what the repository holds: the headline spec is
//! `specs/deepseek_v2_lite.dsc`, character for character, so copying it works.

use std::path::Path;

#[test]
fn the_headline_spec_is_the_published_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("```\n").expect("a code block") + 4;
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let file = std::fs::read_to_string(root.join("specs/deepseek_v2_lite.dsc")).unwrap();
    assert_eq!(block, file, "the README's first code block must be specs/deepseek_v2_lite.dsc");
    // And it resolves as written, from the directory it names.
    dsc_dsl::load_str(&root.join("specs/readme_example.dsc"), block, None).unwrap_or_else(|f| panic!("{}", f.render()));
}
