//! A fresh, empty directory per test under the system temp dir, removed when the test
//! ends (pass or fail): for tests of what commands write.

use std::path::PathBuf;

pub(crate) struct TestDir(pub PathBuf);

impl TestDir {
    /// `dsc-test-TAG-PID`, emptied first.
    pub fn new(tag: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("dsc-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }

    /// The names of the entries, sorted.
    pub fn names(&self) -> Vec<String> {
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
