//! The daemon's ed25519 signing key: created on first start in `state_dir/signing.key` (0600) and
//! reused after. `SigningKey` zeroizes itself on drop (ed25519-dalek's `zeroize` feature).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::collections::HashMap;
use std::sync::Mutex;

use till_protocol::{Claims, KeyId, PublicKeyInfo, Token, TokenError};
use zeroize::Zeroizing;

use crate::secret::read_private_file;

/// How many verified token strings are remembered.
const VERIFIED_CACHE: usize = 4096;

pub struct Keyring {
    current: SigningKey,
    current_id: KeyId,
    verified: Mutex<HashMap<String, Claims>>,
}

impl Keyring {
    pub fn load_or_create(state_dir: &Path) -> Result<Keyring> {
        let path = state_dir.join("signing.key");
        let key = if path.exists() {
            let text = read_private_file(&path)?;
            let raw = Zeroizing::new(
                URL_SAFE_NO_PAD
                    .decode(text.trim_ascii())
                    .with_context(|| format!("{} is not a Till signing key", path.display()))?,
            );
            let seed: &[u8; 32] = raw.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{} is not a Till signing key (wrong length)",
                    path.display()
                )
            })?;
            SigningKey::from_bytes(seed)
        } else {
            let mut seed = Zeroizing::new([0u8; 32]);
            getrandom::fill(seed.as_mut_slice())
                .map_err(|e| anyhow::anyhow!("no randomness for a signing key: {e}"))?;
            let key = SigningKey::from_bytes(&seed);
            let encoded = Zeroizing::new(URL_SAFE_NO_PAD.encode(seed.as_slice()));
            // create_new: two daemons racing on one state dir must not overwrite each other's key.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            f.write_all(encoded.as_bytes())?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "created a new signing key");
            key
        };
        if key.verifying_key().is_weak() {
            bail!(
                "the signing key is weak; remove {} to make a new one",
                path.display()
            );
        }
        let current_id = KeyId::of(&key.verifying_key());
        Ok(Keyring {
            current: key,
            current_id,
            verified: Mutex::new(HashMap::new()),
        })
    }

    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    pub fn current_id(&self) -> KeyId {
        self.current_id
    }

    fn verifying_key(&self, id: KeyId) -> Option<VerifyingKey> {
        (id == self.current_id).then(|| self.current.verifying_key())
    }

    /// Decodes and verifies a token string against the keys this daemon holds, and returns its
    /// claims. A many-activation token is presented again and again, and an ed25519 verification
    /// is most of a request's CPU, so strings that verified are remembered (exact bytes as the
    /// key, so a cache hit is the same proof as a fresh check). Only successes are cached.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        if let Some(c) = self.lock_verified().get(token) {
            return Ok(c.clone());
        }
        let t = Token::decode(token)?;
        let key = self
            .verifying_key(t.claims().key_id)
            .ok_or(TokenError::UnknownKey(t.claims().key_id))?;
        t.verify(&key)?;
        let claims = t.into_claims();
        let mut cache = self.lock_verified();
        if cache.len() >= VERIFIED_CACHE {
            // Crude but bounded: a full cache starts over; hot tokens come straight back.
            cache.clear();
        }
        cache.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claims>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn public_keys(&self) -> Vec<PublicKeyInfo> {
        vec![PublicKeyInfo {
            key_id: self.current_id.to_string(),
            public_key: URL_SAFE_NO_PAD.encode(self.current.verifying_key().as_bytes()),
            current: true,
        }]
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn signing_key_is_zeroize_on_drop() {
        fn assert_zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        assert_zeroize_on_drop::<SigningKey>();
    }

    #[test]
    fn a_cached_good_token_does_not_vouch_for_a_tampered_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = Keyring::load_or_create(dir.path()).expect("create");
        let claims = Claims {
            id: till_protocol::TokenId([1; 16]),
            key_id: k.current_id(),
            service: "echo".into(),
            rules: vec![till_protocol::Rule::parse("GET /a").expect("rule")],
            uses: 1,
            issued_at: 1,
            expires_at: None,
            parent: None,
            holder_uid: None,
        };
        let good = claims.sign(k.current()).expect("sign");
        assert_eq!(k.verify(&good).expect("good"), claims);
        assert_eq!(k.verify(&good).expect("cached"), claims);
        let mut bytes = good.into_bytes();
        let at = bytes.len() - 3;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bytes).expect("utf8");
        assert!(k.verify(&bad).is_err());
    }

    #[test]
    fn created_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Keyring::load_or_create(dir.path()).expect("create");
        let mode = std::fs::metadata(dir.path().join("signing.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Keyring::load_or_create(dir.path()).expect("reuse");
        assert_eq!(a.current_id(), b.current_id());
    }
}
