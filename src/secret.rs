//! A string that never shows itself: configuration secrets are wrapped in [`Secret`] so
//! that `Debug`, `Display`-free logging and `--print-config` cannot leak them.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `Debug` and serialization print instead of a secret's value.
pub const REDACTED: &str = "[redacted]";

/// A secret string (shared key, password, API key): its value is reachable only through
/// [`Secret::expose`], so it cannot end up in a log line or a `Debug` print by accident.
///
/// Serializing writes [`REDACTED`]; that is what `--print-config` shows. A configuration
/// whose secret is literally that placeholder is refused (see [`Secret::is_placeholder`]),
/// so a printed configuration cannot be fed back with its secrets silently replaced.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself; call only where the secret is used (signing, comparing).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Length in bytes (for validation messages that must not show the value).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether this is the placeholder that `--print-config` writes.
    pub fn is_placeholder(&self) -> bool {
        self.0 == REDACTED
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Why a secret file could not be used; the caller names the config key.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File that failed.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file holds no secret at all.
    #[error("{path} holds no secret")]
    Empty {
        /// File that failed.
        path: String,
    },
}

fn read(path: &Path) -> Result<String, SecretFileError> {
    std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Read one secret from a file (a Kubernetes Secret volume, say): the whole content
/// without its trailing newline.
pub fn read_one(path: &Path) -> Result<Secret, SecretFileError> {
    let text = read(path)?;
    let v = text.trim_end_matches(['\r', '\n']);
    if v.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(Secret::new(v))
}

/// Read a list of secrets, one per line; blank lines and lines starting with `#` are skipped.
pub fn read_list(path: &Path) -> Result<Vec<Secret>, SecretFileError> {
    let list: Vec<Secret> = read(path)?
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(Secret::from)
        .collect();
    if list.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_serialize_hide_the_value() {
        let s = Secret::from("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{:?}", Some(vec![s.clone()])), "Some([[redacted]])");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2-very-secret");
        let back: Secret = serde_json::from_str("\"x\"").unwrap();
        assert_eq!(back.expose(), "x");
    }

    #[test]
    fn files_trim_newlines_and_skip_comments() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one");
        std::fs::write(&one, "abc def\n").unwrap();
        assert_eq!(read_one(&one).unwrap().expose(), "abc def");
        let list = dir.path().join("list");
        std::fs::write(&list, "# newest first\nnew\r\n\nold\n").unwrap();
        let l = read_list(&list).unwrap();
        assert_eq!(
            l.iter().map(Secret::expose).collect::<Vec<_>>(),
            ["new", "old"]
        );
        std::fs::write(&one, "\n").unwrap();
        assert!(matches!(read_one(&one), Err(SecretFileError::Empty { .. })));
        assert!(matches!(
            read_one(&dir.path().join("missing")),
            Err(SecretFileError::Read { .. })
        ));
    }
}
