//! The daemon's ed25519 signing keys: the current one, created on first start in
//! `state_dir/signing.key` (0600) and reused after, and the public halves of keys rotated out, kept in
//! `previous-keys.json` until the last token each signed has expired. `SigningKey` zeroizes itself on drop (ed25519-dalek's `zeroize` feature).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use till_protocol::{Claims, KeyId, PublicKeyInfo, Token, TokenError};
use zeroize::Zeroizing;

use crate::secret::read_private_file;

/// How many verified token strings are remembered.
const VERIFIED_CACHE: usize = 4096;
const PREVIOUS_KEYS: &str = "previous-keys.json";

/// A key that signed tokens before a rotation: only its public half is kept, until every token it
/// signed has expired (`retire_at`); then it is retired and its tokens are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PreviousKey {
    key_id: String,
    public_key: String,
    retire_at: u64,
}

struct Keys {
    current: Arc<SigningKey>,
    current_id: KeyId,
    previous: Vec<(KeyId, VerifyingKey, u64)>,
}

pub struct Keyring {
    state_dir: PathBuf,
    keys: RwLock<Keys>,
    verified: Mutex<HashMap<String, Claims>>,
}

fn new_key() -> Result<(SigningKey, Zeroizing<String>)> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice())
        .map_err(|e| anyhow::anyhow!("no randomness for a signing key: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    if key.verifying_key().is_weak() {
        bail!("generated a weak key; try again");
    }
    Ok((key, Zeroizing::new(URL_SAFE_NO_PAD.encode(seed.as_slice()))))
}

/// Writes `bytes` to `path` 0600 through a temporary file and a rename, so a crash leaves the old
/// file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// Loads the ed25519 key in `path` (base64url seed, 0600), or creates it there on first start.
pub fn load_or_create_key(path: &Path, what: &str) -> Result<SigningKey> {
    let key = if path.exists() {
        let text = read_private_file(path)?;
        // What to do about a damaged key file, and what removing it costs.
        let damaged = |why: &str| {
            let cost = if what == "signing" {
                "every token signed with it will then be refused"
            } else {
                "the trail's checkpoints signed with it can then no longer be checked"
            };
            anyhow::anyhow!(
                "{} is not a Till {what} key ({why}). Restore it from a backup, or remove it to \
                 make a new one: {cost}",
                path.display()
            )
        };
        let raw = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(text.trim_ascii())
                // Not base64's own error: it can quote a character of the key.
                .map_err(|_| damaged("not base64url"))?,
        );
        let seed: &[u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| damaged("wrong length"))?;
        SigningKey::from_bytes(seed)
    } else {
        let (key, encoded) = new_key()?;
        // create_new: two daemons racing on one state dir must not overwrite each other's key.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(encoded.as_bytes())?;
        f.sync_all()?;
        tracing::info!(path = %path.display(), "created a new {what} key");
        key
    };
    if key.verifying_key().is_weak() {
        bail!(
            "the {what} key is weak; remove {} to make a new one",
            path.display()
        );
    }
    Ok(key)
}

impl Keyring {
    pub fn load_or_create(state_dir: &Path) -> Result<Keyring> {
        let key = load_or_create_key(&state_dir.join("signing.key"), "signing")?;
        let mut previous = Vec::new();
        let prev_path = state_dir.join(PREVIOUS_KEYS);
        if prev_path.exists() {
            let text = std::fs::read_to_string(&prev_path)
                .with_context(|| format!("cannot read {}", prev_path.display()))?;
            let list: Vec<PreviousKey> = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a list of previous keys", prev_path.display())
            })?;
            for p in list {
                let raw = URL_SAFE_NO_PAD.decode(&p.public_key).unwrap_or_default();
                let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
                    anyhow::anyhow!("{}: a key is not 32 bytes", prev_path.display())
                })?;
                let vk = VerifyingKey::from_bytes(&bytes)
                    .map_err(|_| anyhow::anyhow!("{}: a key is not valid", prev_path.display()))?;
                previous.push((KeyId::of(&vk), vk, p.retire_at));
            }
        }
        let current_id = KeyId::of(&key.verifying_key());
        Ok(Keyring {
            state_dir: state_dir.to_owned(),
            keys: RwLock::new(Keys {
                current: Arc::new(key),
                current_id,
                previous,
            }),
            verified: Mutex::new(HashMap::new()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current(&self) -> Arc<SigningKey> {
        self.read().current.clone()
    }

    pub fn current_id(&self) -> KeyId {
        self.read().current_id
    }

    /// The key for `id`, if it is current or not yet retired; `Err` says why not.
    fn verifying_key(&self, id: KeyId, now: u64) -> Result<VerifyingKey, TokenError> {
        let keys = self.read();
        if id == keys.current_id {
            return Ok(keys.current.verifying_key());
        }
        match keys.previous.iter().find(|(k, _, _)| *k == id) {
            Some((_, vk, retire_at)) if *retire_at > now => Ok(*vk),
            Some(_) => Err(TokenError::Retired(id)),
            None => Err(TokenError::UnknownKey(id)),
        }
    }

    /// Decodes and verifies a token string against the keys this daemon holds, and returns its
    /// claims. A many-activation token is presented again and again, and an ed25519 verification
    /// is most of a request's CPU, so strings that verified are remembered (exact bytes as the
    /// key, so a cache hit is the same proof as a fresh check); whether the signing key is still
    /// live is checked every time. Only successes are cached.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        let now = crate::broker::now_secs();
        let cached = self.lock_verified().get(token).cloned();
        if let Some(c) = cached {
            self.verifying_key(c.key_id, now)?;
            return Ok(c);
        }
        let t = Token::decode(token)?;
        let key = self.verifying_key(t.claims().key_id, now)?;
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

    fn save_previous(&self, previous: &[(KeyId, VerifyingKey, u64)]) -> Result<()> {
        let list: Vec<PreviousKey> = previous
            .iter()
            .map(|(id, vk, retire_at)| PreviousKey {
                key_id: id.to_string(),
                public_key: URL_SAFE_NO_PAD.encode(vk.as_bytes()),
                retire_at: *retire_at,
            })
            .collect();
        write_atomic(
            &self.state_dir.join(PREVIOUS_KEYS),
            serde_json::to_string_pretty(&list)?.as_bytes(),
        )
    }

    /// Makes a new key current. The old key's public half is kept until `retire_at` (when the last
    /// token it signed expires); its private half is gone from disk at once and from memory when
    /// the last signature in flight is done. Returns (old id, new id).
    pub fn rotate(&self, retire_at: u64) -> Result<(KeyId, KeyId)> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let (key, encoded) = new_key()?;
        let mut previous = keys.previous.clone();
        previous.push((keys.current_id, keys.current.verifying_key(), retire_at));
        // The old public key is on disk before the new private key replaces the old one: a crash in
        // between leaves the old key current and its public half listed, both harmless.
        self.save_previous(&previous)?;
        write_atomic(&self.state_dir.join("signing.key"), encoded.as_bytes())?;
        let old = keys.current_id;
        let new = KeyId::of(&key.verifying_key());
        keys.current = Arc::new(key);
        keys.current_id = new;
        keys.previous = previous;
        Ok((old, new))
    }

    /// Forgets keys retired at or before `cutoff` (Unix seconds). Returns how many.
    pub fn prune(&self, cutoff: u64) -> Result<usize> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let before = keys.previous.len();
        let kept: Vec<_> = keys
            .previous
            .iter()
            .filter(|(_, _, r)| *r > cutoff)
            .cloned()
            .collect();
        if kept.len() != before {
            self.save_previous(&kept)?;
            keys.previous = kept;
        }
        Ok(before - keys.previous.len())
    }

    pub fn public_keys(&self) -> Vec<PublicKeyInfo> {
        let keys = self.read();
        let now = crate::broker::now_secs();
        let mut out = vec![PublicKeyInfo {
            key_id: keys.current_id.to_string(),
            public_key: URL_SAFE_NO_PAD.encode(keys.current.verifying_key().as_bytes()),
            current: true,
            retire_at: None,
        }];
        for (id, vk, retire_at) in keys.previous.iter().filter(|(_, _, r)| *r > now) {
            out.push(PublicKeyInfo {
                key_id: id.to_string(),
                public_key: URL_SAFE_NO_PAD.encode(vk.as_bytes()),
                current: false,
                retire_at: Some(*retire_at),
            });
        }
        out
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
            budget: None,
        };
        let good = claims.sign(&k.current()).expect("sign");
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
