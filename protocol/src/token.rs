//! The capability token: claims, their byte layout, signing and verification.
//!
//! `till_` + base64url (no padding) of `payload || signature`, where the signature is ed25519 over
//! `b"till-token-v1\0" || payload`. The layout is written down in `docs/TOKEN.md`; keep the two in step.
//! A token carries no secret: anyone holding the daemon's public key can check it offline.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::scope::{Method, Pattern, Rule};

pub const TOKEN_PREFIX: &str = "till_";
/// Tokens must stay small enough to paste into a prompt or an SDK's key field.
pub const MAX_TOKEN_CHARS: usize = 400;
const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"till-token-v1\0";
const SIG_LEN: usize = 64;
const FLAG_EXPIRES: u8 = 1;
const FLAG_PARENT: u8 = 2;
const FLAG_HOLDER: u8 = 4;
const FLAG_BUDGET: u8 = 8;
const MAX_RULES: usize = 32;

/// A token's identity: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(pub [u8; 16]);

/// A signing key's identity: the first 8 bytes of SHA-256 over its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

fn hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl TokenId {
    pub fn parse(s: &str) -> Option<TokenId> {
        parse_hex(s).map(TokenId)
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}
impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}
impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}
impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(&self.0, f)
    }
}
impl KeyId {
    pub fn parse(s: &str) -> Option<KeyId> {
        parse_hex(s).map(KeyId)
    }
}

/// What a token says. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub id: TokenId,
    pub key_id: KeyId,
    pub service: String,
    pub rules: Vec<Rule>,
    /// Activations: how many upstream requests the token may make.
    pub uses: u32,
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    /// The token this one was narrowed from.
    pub parent: Option<TokenId>,
    /// Only a peer with this uid may spend the token.
    pub holder_uid: Option<u32>,
    /// The most LLM tokens (input and output, as the provider's answers count them in their
    /// `usage`) the token's requests may use together.
    pub budget: Option<u64>,
}

impl Claims {
    fn payload(&self) -> Result<Vec<u8>, TokenError> {
        let mut out = Vec::with_capacity(128);
        out.push(VERSION);
        out.extend_from_slice(&self.key_id.0);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.uses.to_be_bytes());
        let mut flags = 0u8;
        if self.expires_at.is_some() {
            flags |= FLAG_EXPIRES;
        }
        if self.parent.is_some() {
            flags |= FLAG_PARENT;
        }
        if self.holder_uid.is_some() {
            flags |= FLAG_HOLDER;
        }
        if self.budget.is_some() {
            flags |= FLAG_BUDGET;
        }
        out.push(flags);
        if let Some(exp) = self.expires_at {
            out.extend_from_slice(&exp.to_be_bytes());
        }
        if let Some(parent) = self.parent {
            out.extend_from_slice(&parent.0);
        }
        if let Some(uid) = self.holder_uid {
            out.extend_from_slice(&uid.to_be_bytes());
        }
        if let Some(budget) = self.budget {
            out.extend_from_slice(&budget.to_be_bytes());
        }
        push_str(&mut out, &self.service, "service name")?;
        if self.rules.is_empty() || self.rules.len() > MAX_RULES {
            return Err(TokenError::TooLarge(format!(
                "a token carries 1 to {MAX_RULES} rules, not {}",
                self.rules.len()
            )));
        }
        out.push(self.rules.len() as u8);
        for rule in &self.rules {
            out.push(rule.method.code());
            push_str(&mut out, &rule.pattern.to_string(), "rule")?;
        }
        Ok(out)
    }

    /// Signs the claims and encodes the token string.
    pub fn sign(&self, key: &SigningKey) -> Result<String, TokenError> {
        let payload = self.payload()?;
        let sig = key.sign(&signed_message(&payload));
        let mut raw = payload;
        raw.extend_from_slice(&sig.to_bytes());
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw));
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::TooLarge(format!(
                "the token would be {} characters, over the limit of {MAX_TOKEN_CHARS}; \
                 use fewer or shorter rules",
                token.len()
            )));
        }
        Ok(token)
    }
}

fn push_str(out: &mut Vec<u8>, s: &str, what: &str) -> Result<(), TokenError> {
    let len = u8::try_from(s.len())
        .map_err(|_| TokenError::TooLarge(format!("a {what} is longer than 255 bytes")))?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DOMAIN.len() + payload.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(payload);
    msg
}

/// A decoded token whose signature has not been checked yet: call [`Token::verify`].
#[derive(Debug, Clone)]
pub struct Token {
    claims: Claims,
    payload: Vec<u8>,
    signature: Signature,
}

impl Token {
    /// Decodes the string and parses the claims. Checks shape only, not the signature.
    pub fn decode(s: &str) -> Result<Token, TokenError> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed("longer than any Till token"));
        }
        let body = s
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed("a Till token starts with 'till_'"))?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed("not valid base64url after 'till_'"))?;
        if raw.len() <= SIG_LEN {
            return Err(TokenError::Malformed("too short"));
        }
        let (payload, sig) = raw.split_at(raw.len() - SIG_LEN);
        let signature =
            Signature::try_from(sig).map_err(|_| TokenError::Malformed("bad signature bytes"))?;
        let claims = parse_payload(payload)?;
        Ok(Token {
            claims,
            payload: payload.to_vec(),
            signature,
        })
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    pub fn into_claims(self) -> Claims {
        self.claims
    }

    /// Checks the signature with `verify_strict` (which also refuses weak public keys).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), TokenError> {
        if KeyId::of(key) != self.claims.key_id {
            return Err(TokenError::UnknownKey(self.claims.key_id));
        }
        key.verify_strict(&signed_message(&self.payload), &self.signature)
            .map_err(|_| TokenError::BadSignature)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.buf.len() < n {
            return Err(TokenError::Malformed("truncated claims"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }
    fn str(&mut self) -> Result<&'a str, TokenError> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| TokenError::Malformed("text is not UTF-8"))
    }
}

fn parse_payload(payload: &[u8]) -> Result<Claims, TokenError> {
    let mut r = Reader { buf: payload };
    if r.u8()? != VERSION {
        return Err(TokenError::Malformed(
            "unknown token version; this daemon or CLI may be older than the token",
        ));
    }
    let key_id = KeyId(r.array()?);
    let id = TokenId(r.array()?);
    let issued_at = u64::from_be_bytes(r.array()?);
    let uses = u32::from_be_bytes(r.array()?);
    let flags = r.u8()?;
    if flags & !(FLAG_EXPIRES | FLAG_PARENT | FLAG_HOLDER | FLAG_BUDGET) != 0 {
        return Err(TokenError::Malformed("unknown claim flags"));
    }
    let expires_at = if flags & FLAG_EXPIRES != 0 {
        Some(u64::from_be_bytes(r.array()?))
    } else {
        None
    };
    let parent = if flags & FLAG_PARENT != 0 {
        Some(TokenId(r.array()?))
    } else {
        None
    };
    let holder_uid = if flags & FLAG_HOLDER != 0 {
        Some(u32::from_be_bytes(r.array()?))
    } else {
        None
    };
    let budget = if flags & FLAG_BUDGET != 0 {
        Some(u64::from_be_bytes(r.array()?))
    } else {
        None
    };
    let service = r.str()?.to_owned();
    let count = usize::from(r.u8()?);
    if count == 0 || count > MAX_RULES {
        return Err(TokenError::Malformed("bad rule count"));
    }
    let mut rules = Vec::with_capacity(count);
    for _ in 0..count {
        let method = Method::from_code(r.u8()?).ok_or(TokenError::Malformed("bad method code"))?;
        let pattern =
            Pattern::parse(r.str()?).map_err(|_| TokenError::Malformed("bad rule pattern"))?;
        rules.push(Rule { method, pattern });
    }
    if !r.buf.is_empty() {
        return Err(TokenError::Malformed("trailing bytes after the claims"));
    }
    Ok(Claims {
        id,
        key_id,
        service,
        rules,
        uses,
        issued_at,
        expires_at,
        parent,
        holder_uid,
        budget,
    })
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("the token's signature does not verify: it was altered or not issued by this daemon")]
    BadSignature,
    #[error("the token was signed by key {0}, which this daemon does not hold")]
    UnknownKey(KeyId),
    #[error(
        "the token was signed by key {0}, which has been retired (rotated out, and its tokens expired); mint a new one"
    )]
    Retired(KeyId),
    #[error("{0}")]
    TooLarge(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims(k: &SigningKey) -> Claims {
        Claims {
            id: TokenId([7; 16]),
            key_id: KeyId::of(&k.verifying_key()),
            service: "openai".into(),
            rules: vec![
                Rule::parse("POST /v1/chat/completions").expect("rule"),
                Rule::parse("GET /v1/models/**").expect("rule"),
            ],
            uses: 3,
            issued_at: 1_700_000_000,
            expires_at: Some(1_700_000_900),
            parent: None,
            holder_uid: Some(1000),
            budget: None,
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let k = key(1);
        let c = claims(&k);
        let s = c.sign(&k).expect("sign");
        assert!(s.starts_with("till_") && s.len() < MAX_TOKEN_CHARS, "{s}");
        let t = Token::decode(&s).expect("decode");
        assert_eq!(t.claims(), &c);
        t.verify(&k.verifying_key()).expect("verify");
        let budgeted = Claims {
            budget: Some(50_000),
            ..c
        };
        let t = Token::decode(&budgeted.sign(&k).expect("sign")).expect("decode");
        assert_eq!(t.claims(), &budgeted);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let k = key(1);
        let s = claims(&k).sign(&k).expect("sign");
        let raw = URL_SAFE_NO_PAD.decode(&s[5..]).expect("b64");
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let t = format!("till_{}", URL_SAFE_NO_PAD.encode(&bad));
            let ok = Token::decode(&t).and_then(|t| t.verify(&k.verifying_key()));
            assert!(ok.is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn other_key_is_refused() {
        let k = key(1);
        let other = key(2);
        let mut c = claims(&other);
        c.key_id = KeyId::of(&k.verifying_key()); // claims to be ours, signed by another key
        let s = c.sign(&other).expect("sign");
        let t = Token::decode(&s).expect("decode");
        assert_eq!(t.verify(&k.verifying_key()), Err(TokenError::BadSignature));
    }

    /// Thousands of damaged tokens: bytes overwritten, cut off, appended, and strings of
    /// base64url of any length. None panics, and none verifies but the token itself.
    #[test]
    fn damaged_tokens_never_verify_and_never_panic() {
        let k = key(1);
        let good = claims(&k).sign(&k).expect("sign");
        let raw = URL_SAFE_NO_PAD.decode(&good[5..]).expect("b64");
        let mut rng = crate::TestRng(0x2545_f491_4f6c_dd1d);
        let mut decoded = 0;
        for round in 0..3_000 {
            let mut bad = raw.clone();
            match round % 3 {
                0 => {
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(bad.len());
                        bad[i] = rng.next() as u8;
                    }
                }
                1 => bad.truncate(rng.below(bad.len())),
                _ => bad.extend((0..=rng.below(64)).map(|_| rng.next() as u8)),
            }
            let t = format!("till_{}", URL_SAFE_NO_PAD.encode(&bad));
            if let Ok(tok) = Token::decode(&t) {
                decoded += 1;
                assert!(
                    bad == raw || tok.verify(&k.verifying_key()).is_err(),
                    "a damaged token verified: {t}"
                );
            }
        }
        // Most damage is seen by the signature, not by the decoder: the check above ran.
        assert!(decoded > 300, "{decoded} decoded");
        for len in (0..600).step_by(3) {
            let s: String = (0..len)
                .map(|_| {
                    let alphabet =
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                    char::from(alphabet[rng.below(alphabet.len())])
                })
                .collect();
            if let Ok(tok) = Token::decode(&format!("till_{s}")) {
                assert!(tok.verify(&k.verifying_key()).is_err());
            }
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for s in [
            "",
            "till_",
            "till_!!!",
            "sk-abc",
            "till_AAAA",
            &"till_".repeat(100),
        ] {
            assert!(Token::decode(s).is_err(), "{s}");
        }
    }

    #[test]
    fn ids_round_trip() {
        let id = TokenId([0xab; 16]);
        assert_eq!(TokenId::parse(&id.to_string()), Some(id));
        assert_eq!(TokenId::parse("zz"), None);
    }
}
