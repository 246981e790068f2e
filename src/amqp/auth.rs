//! Users, password hashes and the SASL mechanisms AMQP clients use (PLAIN and AMQPLAIN).
//!
//! Password hashes use RabbitMQ's `rabbit_password_hashing_sha256` format, so a hash made by
//! `rabbitmqctl hash_password` works here and `mqic config hash-password` output works there:
//! `base64(salt[4] ++ sha256(salt ++ password))`.

use std::collections::HashMap;
use std::net::IpAddr;

use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::AMQPValue;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::reply::{AmqpError, ReplyCode};

/// The mechanisms offered in `connection.start`.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// A user who may connect.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// base64(salt ++ sha256(salt ++ password)); never logged.
    password_hash: String,
    /// Tags shown by the management API (`administrator`, `monitoring`, ...).
    pub tags: Vec<String>,
    /// Virtual hosts this user may open.
    pub vhosts: Vec<String>,
    /// Accepted from loopback addresses only (RabbitMQ's `loopback_users`).
    pub loopback_only: bool,
}

impl User {
    pub fn new(
        name: String,
        password_hash: String,
        tags: Vec<String>,
        vhosts: Vec<String>,
        loopback_only: bool,
    ) -> User {
        User {
            name,
            password_hash,
            tags,
            vhosts,
            loopback_only,
        }
    }

    pub fn may_open(&self, vhost: &str) -> bool {
        self.vhosts.iter().any(|v| v == vhost || v == "*")
    }

    /// The stored hash (for a definitions export, as RabbitMQ's); never logged.
    pub fn password_hash(&self) -> &str {
        &self.password_hash
    }
}

/// The users known to the broker.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
}

/// Why a login failed; the client only learns "refused", the log learns which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginFailure {
    UnknownUser(String),
    BadPassword(String),
    LoopbackOnly(String),
}

impl std::fmt::Display for LoginFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginFailure::UnknownUser(u) => write!(f, "user '{u}' does not exist"),
            LoginFailure::BadPassword(u) => write!(f, "invalid credentials for user '{u}'"),
            LoginFailure::LoopbackOnly(u) => write!(f, "user '{u}' can only connect via localhost"),
        }
    }
}

impl Users {
    pub fn new(users: impl IntoIterator<Item = User>) -> Users {
        Users {
            by_name: users.into_iter().map(|u| (u.name.clone(), u)).collect(),
        }
    }

    /// Every user, by name (management API).
    pub fn all(&self) -> Vec<&User> {
        let mut all: Vec<&User> = self.by_name.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn get(&self, name: &str) -> Option<&User> {
        self.by_name.get(name)
    }

    /// Checks a username and password from a peer address.
    pub fn login(&self, name: &str, password: &[u8], peer: IpAddr) -> Result<&User, LoginFailure> {
        let user = self
            .by_name
            .get(name)
            .ok_or_else(|| LoginFailure::UnknownUser(name.to_string()))?;
        if !verify_password(&user.password_hash, password) {
            return Err(LoginFailure::BadPassword(name.to_string()));
        }
        if user.loopback_only && !peer.is_loopback() {
            return Err(LoginFailure::LoopbackOnly(name.to_string()));
        }
        Ok(user)
    }
}

/// Extracts (username, password) from a SASL response.
pub fn parse_response(mechanism: &str, response: &[u8]) -> Result<(String, Vec<u8>), AmqpError> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let (Some(_authzid), Some(user), Some(pass), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(AmqpError::new(
                    ReplyCode::SyntaxError,
                    "PLAIN response must be \\0user\\0password",
                ));
            };
            let user = String::from_utf8(user.to_vec()).map_err(|_| {
                AmqpError::new(ReplyCode::SyntaxError, "PLAIN username is not UTF-8")
            })?;
            Ok((user, pass.to_vec()))
        }
        "AMQPLAIN" => {
            // A field table without its length prefix.
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let bad = || AmqpError::new(ReplyCode::SyntaxError, "malformed AMQPLAIN response");
            let (_, table) = parse_field_table(framed.as_slice()).map_err(|_| bad())?;
            let text = |key: &str| match table.inner().get(key) {
                Some(AMQPValue::LongString(s)) => Some(s.as_bytes().to_vec()),
                Some(AMQPValue::ShortString(s)) => Some(s.as_str().as_bytes().to_vec()),
                _ => None,
            };
            let user = text("LOGIN").ok_or_else(bad)?;
            let pass = text("PASSWORD").ok_or_else(bad)?;
            Ok((String::from_utf8(user).map_err(|_| bad())?, pass))
        }
        other => Err(AmqpError::new(
            ReplyCode::CommandInvalid,
            format!("unknown authentication mechanism '{other}'"),
        )),
    }
}

/// Hashes a password with a fresh random salt.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; 4] = rand::random();
    encode_hash(&salt, password.as_bytes())
}

fn encode_hash(salt: &[u8; 4], password: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password);
    let mut all = salt.to_vec();
    all.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(all)
}

/// Whether `hash` is a well-formed password hash (checked when config is loaded).
pub fn is_valid_hash(hash: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(hash)
        .is_ok_and(|b| b.len() == 36)
}

/// Constant-time comparison of a password against a stored hash.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    let Ok(stored) = base64::engine::general_purpose::STANDARD.decode(hash) else {
        return false;
    };
    if stored.len() != 36 {
        return false;
    }
    let salt: [u8; 4] = stored[..4].try_into().expect("length checked");
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password);
    let digest = h.finalize();
    digest
        .iter()
        .zip(&stored[4..])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_hash_format_verifies() {
        // `rabbitmqctl hash_password guest` style: salt 0x908DC60A.
        let hash = encode_hash(&[0x90, 0x8D, 0xC6, 0x0A], b"guest");
        assert!(verify_password(&hash, b"guest"));
        assert!(!verify_password(&hash, b"Guest"));
        let fresh = hash_password("s3cret");
        assert!(is_valid_hash(&fresh));
        assert!(verify_password(&fresh, b"s3cret"));
        assert_ne!(fresh, hash_password("s3cret"), "salts differ");
    }

    #[test]
    fn plain_and_amqplain_responses() {
        assert_eq!(
            parse_response("PLAIN", b"\0guest\0pw").unwrap(),
            ("guest".to_string(), b"pw".to_vec())
        );
        assert_eq!(
            parse_response("PLAIN", b"guest").unwrap_err().code,
            ReplyCode::SyntaxError
        );
        // AMQPLAIN: LOGIN:S"guest" PASSWORD:S"pw" without the table length.
        let mut t = Vec::new();
        for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "pw")] {
            t.push(k.len() as u8);
            t.extend_from_slice(k.as_bytes());
            t.push(b'S');
            t.extend_from_slice(&(v.len() as u32).to_be_bytes());
            t.extend_from_slice(v.as_bytes());
        }
        assert_eq!(
            parse_response("AMQPLAIN", &t).unwrap(),
            ("guest".to_string(), b"pw".to_vec())
        );
        assert_eq!(
            parse_response("EXTERNAL", b"").unwrap_err().code,
            ReplyCode::CommandInvalid
        );
    }

    #[test]
    fn loopback_only_users_are_refused_from_elsewhere() {
        let users = Users::new([User::new(
            "guest".into(),
            hash_password("guest"),
            vec![],
            vec!["/".into()],
            true,
        )]);
        assert!(users
            .login("guest", b"guest", "127.0.0.1".parse().unwrap())
            .is_ok());
        assert_eq!(
            users
                .login("guest", b"guest", "10.1.2.3".parse().unwrap())
                .unwrap_err(),
            LoginFailure::LoopbackOnly("guest".into())
        );
        assert!(matches!(
            users.login("guest", b"nope", "127.0.0.1".parse().unwrap()),
            Err(LoginFailure::BadPassword(_))
        ));
        assert!(matches!(
            users.login("bob", b"x", "127.0.0.1".parse().unwrap()),
            Err(LoginFailure::UnknownUser(_))
        ));
    }
}
