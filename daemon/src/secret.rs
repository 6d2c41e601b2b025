//! Master credentials: where they come from, and the only type that ever holds one.
//!
//! A [`Secret`] has no `Clone`, `Serialize` or derived `Debug`; its bytes are zeroized on drop and
//! read only through [`Secret::expose`]. The copies that reqwest makes of an injected header value
//! are marked sensitive (kept out of its `Debug`) but live in its buffers until reused: a known limit.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use zeroize::Zeroizing;

/// Shorter secrets are refused: scrubbing them from responses would mangle ordinary text.
pub const MIN_SECRET_BYTES: usize = 8;
const MAX_SECRET_BYTES: u64 = 64 * 1024;

pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where a service's master credential is read from. Exactly one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    /// The name of a systemd credential, read from `$CREDENTIALS_DIRECTORY/<name>`.
    pub credential: Option<String>,
}

impl SecretSource {
    pub fn env(name: &str) -> SecretSource {
        SecretSource {
            env: Some(name.to_owned()),
            file: None,
            credential: None,
        }
    }

    /// The file this source reads, if any (for `--check` and for watching).
    pub fn path(&self) -> Result<Option<PathBuf>, SecretError> {
        if let Some(f) = &self.file {
            return Ok(Some(f.clone()));
        }
        if let Some(name) = &self.credential {
            if name.contains('/') || name.is_empty() || name.starts_with('.') {
                return Err(SecretError::Invalid(format!(
                    "credential name {name:?} must be a plain file name"
                )));
            }
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                SecretError::Invalid(format!(
                    "secret {{ credential = {name:?} }} needs $CREDENTIALS_DIRECTORY, which systemd \
                     sets for units with LoadCredential=; it is not set"
                ))
            })?;
            return Ok(Some(PathBuf::from(dir).join(name)));
        }
        Ok(None)
    }

    pub fn describe(&self) -> String {
        match (&self.env, &self.file, &self.credential) {
            (Some(e), _, _) => format!("env {e}"),
            (_, Some(f), _) => format!("file {}", f.display()),
            (_, _, Some(c)) => format!("credential {c}"),
            _ => "nothing".into(),
        }
    }

    pub fn validate(&self) -> Result<(), SecretError> {
        let set = [
            self.env.is_some(),
            self.file.is_some(),
            self.credential.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(SecretError::Invalid(
                "a secret is exactly one of { env = \"VAR\" }, { file = \"/path\" } or \
                 { credential = \"name\" }"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn load(&self) -> Result<Secret, SecretError> {
        self.validate()?;
        let raw = if let Some(var) = &self.env {
            let value = std::env::var_os(var).ok_or_else(|| {
                SecretError::Invalid(format!("environment variable {var} is not set"))
            })?;
            Zeroizing::new(value.into_encoded_bytes())
        } else {
            let path = self
                .path()?
                .ok_or_else(|| SecretError::Invalid("no source".into()))?;
            read_private_file(&path)?
        };
        let trimmed = trim(&raw);
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(SecretError::Invalid(format!(
                "the secret from {} is empty or shorter than {MIN_SECRET_BYTES} bytes",
                self.describe()
            )));
        }
        if trimmed.iter().any(|b| b.is_ascii_control()) {
            return Err(SecretError::Invalid(format!(
                "the secret from {} contains control characters (a stray newline in the middle?)",
                self.describe()
            )));
        }
        Ok(Secret::new(trimmed.to_vec()))
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Reads a secret file, refusing one that group or others can read, as ssh refuses a loose key.
pub fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let mut file = File::open(path).map_err(|e| SecretError::Unreadable {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let meta = file.metadata().map_err(|e| SecretError::Unreadable {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    if meta.mode() & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_owned(),
            mode: meta.mode() & 0o777,
        });
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(SecretError::Invalid(format!(
            "{} is larger than {MAX_SECRET_BYTES} bytes; is it really a key?",
            path.display()
        )));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.read_to_end(&mut buf)
        .map_err(|e| SecretError::Unreadable {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    Ok(buf)
}

/// Errors never contain secret bytes: only paths, variable names and reasons.
#[derive(Debug, Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {why}")]
    Unreadable { path: PathBuf, why: String },
    #[error(
        "secret file {path} has mode {mode:04o}: group or others can read it; run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn loose_file_is_refused_and_tight_one_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-test-0123456789\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let src = SecretSource {
            env: None,
            file: Some(path.clone()),
            credential: None,
        };
        let err = src
            .load()
            .expect_err("loose file must be refused")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(src.load().expect("load").expose(), b"sk-test-0123456789");
    }

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new(b"sk-very-secret".to_vec());
        assert!(!format!("{s:?}").contains("very"));
    }
}
