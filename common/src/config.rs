//! Reading TOML configuration files: one-line errors that name the file, the line and the key.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Parses `text` (read from `path`) as `T`. The error is one line:
/// `invalid config FILE: line L, column C: unknown field `pathz`, expected …`.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        let message = e.message().trim().replace('\n', " ");
        format!("invalid config {}: {at}{message}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Conf {
        name: String,
    }

    #[test]
    fn errors_are_one_line_with_file_line_and_key() {
        let err = parse_toml::<Conf>(Path::new("/etc/x.toml"), "name = \"a\"\nnmae = \"b\"\n")
            .unwrap_err();
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.starts_with("invalid config /etc/x.toml: line 2, column 1: "),
            "{err}"
        );
        assert!(err.contains("nmae"), "{err}");
    }
}
