//! Test-only fault switches: `FLEETVAULT_FAULT_*` environment variables that make the
//! coordinator die, as a crash would, or misbehave at one chosen point, so that the end-to-end
//! tests can check what a crash there leaves behind.
//!
//! They exist only in debug builds (the ones the end-to-end tests start): in a release build
//! [`switch!`] is `None` without reading the environment, and no switch's name is compiled in,
//! so no environment an operator's service manager passes can trigger one.
//!
//! Every switch is read through [`switch!`]; a test below keeps it that way.

/// Fault switch `$name` (a string literal), when its variable is set, in a debug build; always
/// `None` in a release build, where the name is not compiled in.
macro_rules! switch {
    ($name:literal) => {{
        #[cfg(debug_assertions)]
        let switch = std::env::var($name)
            .ok()
            .map(|value| $crate::fault::Switch { name: $name, value });
        #[cfg(not(debug_assertions))]
        let switch: Option<$crate::fault::Switch> = None;
        switch
    }};
}
pub(crate) use switch;

/// A fault switch that is set.
pub(crate) struct Switch {
    /// The variable's name.
    pub(crate) name: &'static str,
    /// Its value.
    pub(crate) value: String,
}

impl Switch {
    /// The value parsed as a number, if it is one.
    pub(crate) fn number(&self) -> Option<u64> {
        self.value.parse().ok()
    }

    /// Dies at once, as `kill -9` would, after naming this switch on stderr (the tests wait
    /// for that line).
    pub(crate) fn crash(&self, what: &str) -> ! {
        tracing::error!(switch = self.name, "fault switch: {what}");
        eprintln!("fault switch {}: {what}", self.name);
        std::process::abort()
    }

    /// Waits while the file this switch names exists, after saying so on stderr (the tests
    /// wait for that line, do what must happen meanwhile, then remove the file).
    pub(crate) fn hold_while_file_exists(&self) {
        eprintln!(
            "fault switch {}: holding while {} exists",
            self.name, self.value
        );
        while std::path::Path::new(&self.value).exists() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn fault_switches_are_read_only_through_the_debug_only_macro() {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        assert!(files.len() > 10, "{files:?}");
        let mut found = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                if !line.contains("\"FLEETVAULT_FAULT_") || file.ends_with("fault.rs") {
                    continue;
                }
                found += 1;
                assert!(
                    line.contains("switch!(\"FLEETVAULT_FAULT_"),
                    "{}:{}: a fault switch read outside fault::switch! would be compiled into \
                     release builds: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
        assert!(found >= 3, "the known fault switches were not found");
    }

    #[test]
    fn a_switch_is_read_in_debug_builds_and_never_in_release_builds() {
        // Only this test reads this variable: setting it cannot disturb another test.
        std::env::set_var("FLEETVAULT_FAULT_SELF_TEST", "7");
        let value = switch!("FLEETVAULT_FAULT_SELF_TEST").map(|s| (s.name, s.number()));
        if cfg!(debug_assertions) {
            assert_eq!(value, Some(("FLEETVAULT_FAULT_SELF_TEST", Some(7))));
        } else {
            assert_eq!(value, None);
        }
    }
}
