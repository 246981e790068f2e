//! Broker URLs: parsing `amqp://user:pass@host:port/vhost` the way RabbitMQ reads its URIs,
//! and masking the password wherever a URL is shown.

use super::{BusError, BusResult};

/// amqprs's own default, named here because the agent contract relies on it (seed `002`).
const DEFAULT_HEARTBEAT_SECS: u16 = 60;

/// Where to connect, from an `amqp://` URL. Holds the password, so it has no `Debug`.
pub(crate) struct BrokerUrl {
    /// A name or address; an IPv6 address keeps its brackets (amqprs joins host and port).
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) vhost: String,
    /// Seconds between heartbeats the client proposes (`?heartbeat=N`, 60 by default).
    pub(crate) heartbeat: u16,
}

impl BrokerUrl {
    /// Parses `amqp://[user[:password]@]host[:port][/vhost][?heartbeat=N]`, RabbitMQ's URI
    /// form: user, password and vhost are percent-decoded (`%2F` is `/`), the port defaults
    /// to 5672, user and password to guest, and an absent or empty vhost means `/`. An IPv6
    /// host is written in brackets. `amqps` is refused: this build's amqprs has no TLS.
    pub(crate) fn parse(url: &str) -> BusResult<BrokerUrl> {
        let bad =
            |why: &str| BusError::Refused(format!("invalid broker URL {}: {why}", redact(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected amqp://"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "amqp" => {}
            "amqps" => {
                return Err(BusError::Refused(format!(
                    "{}: amqps is not supported by this build (its AMQP client has no TLS); \
                     use amqp:// or a TLS-terminating proxy",
                    redact(url)
                )))
            }
            other => return Err(bad(&format!("unsupported scheme '{other}'"))),
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => match u.split_once(':') {
                Some((name, pass)) => (
                    percent_decode(name).map_err(|w| bad(&w))?,
                    percent_decode(pass).map_err(|w| bad(&w))?,
                ),
                None => (percent_decode(u).map_err(|w| bad(&w))?, String::new()),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (format!("[{addr}]"), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        let port = match port {
            None | Some("") => 5672,
            Some(p) => p.parse().map_err(|_| bad(&format!("bad port '{p}'")))?,
        };
        let vhost = match path.map(percent_decode).transpose().map_err(|w| bad(&w))? {
            None => "/".to_string(),
            Some(v) if v.is_empty() => "/".to_string(),
            Some(v) => v,
        };
        let mut heartbeat = DEFAULT_HEARTBEAT_SECS;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some(("heartbeat", v)) => {
                    heartbeat = v
                        .parse()
                        .map_err(|_| bad(&format!("bad heartbeat '{v}'")))?
                }
                _ => tracing::warn!("broker URL option '{pair}' is not used by mqic"),
            }
        }
        Ok(BrokerUrl {
            host,
            port,
            user,
            password,
            vhost,
            heartbeat,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad percent-escape".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-escapes are not UTF-8".to_string())
}

/// The URL with its password, if any, replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
        return url.to_string();
    };
    match url[start..at].find(':').map(|i| start + i) {
        Some(colon) => format!("{}***{}", &url[..colon + 1], &url[at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_like_rabbitmq_uris() {
        let u = BrokerUrl::parse("amqp://us%40r:p%3Ass@mq.lab:5673/%2F").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.user.as_str(),
                u.password.as_str()
            ),
            ("mq.lab", 5673, "us@r", "p:ss")
        );
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("/", 60));

        let u = BrokerUrl::parse("amqp://mq.lab").unwrap();
        assert_eq!(
            (u.port, u.user.as_str(), u.vhost.as_str()),
            (5672, "guest", "/")
        );

        let u = BrokerUrl::parse("AMQP://a:b@[::1]:5000/lab%2Fqa?heartbeat=30").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 5000));
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("lab/qa", 30));

        for bad in [
            "http://h",
            "h:5672",
            "amqp://h:port",
            "amqp://h/%zz",
            "amqp://[::1",
            "amqp://h?heartbeat=x",
        ] {
            assert!(
                matches!(BrokerUrl::parse(bad), Err(BusError::Refused(_))),
                "{bad}"
            );
        }
        let Err(BusError::Refused(why)) = BrokerUrl::parse("amqps://u:secret@h/") else {
            panic!("amqps must be refused");
        };
        assert!(why.contains("amqps") && !why.contains("secret"), "{why}");
    }

    #[test]
    fn redaction_replaces_only_the_password() {
        assert_eq!(redact("amqp://u:secret@h:1/%2F"), "amqp://u:***@h:1/%2F");
        assert_eq!(redact("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(redact("amqp://h/v@x"), "amqp://h/v@x");
        assert_eq!(redact("amqp://u:p@ss@h"), "amqp://u:***@h");
    }
}
