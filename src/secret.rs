//! A secret in the settings (an API key, a JWT secret): masked wherever it is printed
//! (`--check`, `Debug`), by its type rather than by a list of names; and the one
//! constant-time comparison of a presented secret with a known one.

use serde::{Deserialize, Serialize, Serializer};

/// What a secret prints as.
pub const MASKED: &str = "********";

/// A secret setting: its text, which only [`Secret::expose`] gives.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself, for the code that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.0.is_empty() { "" } else { MASKED }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shown())
    }
}

/// Masked: `--check` prints the settings by serializing them.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Secret {
        Secret(text.to_string())
    }
}

/// Whether `presented` is `known`, in a time that depends on neither where they differ nor
/// (beyond the longer's length) how long `known` is.
pub fn same(presented: &[u8], known: &[u8]) -> bool {
    let mut diff = presented.len() ^ known.len();
    for i in 0..presented.len().max(known.len()) {
        let a = presented.get(i).copied().unwrap_or(0);
        let b = known.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), MASKED);
        assert_eq!(serde_json::to_value(&secret).unwrap(), MASKED);
        assert_eq!(serde_json::to_value(Secret::default()).unwrap(), "");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn same_compares_whole_secrets() {
        assert!(same(b"key-1", b"key-1"));
        assert!(!same(b"key-1", b"key-2"));
        assert!(!same(b"key", b"key-1"));
        assert!(!same(b"key-1x", b"key-1"));
        assert!(same(b"", b""));
    }
}
