//! `[management]` and `[prometheus]`: the RabbitMQ-compatible HTTP API and the metrics
//! endpoint (served by [`crate::mgmt`]).

use std::net::SocketAddr;

use serde::Deserialize;

/// `[management]`: the RabbitMQ-compatible management HTTP API (basic auth with the broker's
/// users).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementConfig {
    pub enabled: bool,
    /// Port 0 picks a free port (the ready line shows it).
    pub listen: SocketAddr,
}

impl Default for ManagementConfig {
    fn default() -> Self {
        ManagementConfig {
            enabled: true,
            listen: "127.0.0.1:15672".parse().expect("valid address"),
        }
    }
}

/// `[prometheus]`: `/metrics` in the Prometheus text format (no auth, as RabbitMQ's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            enabled: true,
            listen: "127.0.0.1:15692".parse().expect("valid address"),
        }
    }
}

/// Cross-field checks: two enabled listeners may not share a fixed port.
pub fn validate(
    amqp: SocketAddr,
    management: &ManagementConfig,
    prometheus: &PrometheusConfig,
) -> Result<(), String> {
    let mut taken = vec![("amqp.listen", amqp)];
    if management.enabled {
        taken.push(("management.listen", management.listen));
    }
    if prometheus.enabled {
        taken.push(("prometheus.listen", prometheus.listen));
    }
    for (i, (a, x)) in taken.iter().enumerate() {
        for (b, y) in &taken[i + 1..] {
            if x.port() != 0
                && x.port() == y.port()
                && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
            {
                return Err(format!("{b}: {y} is also {a}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_may_not_share_a_port() {
        let m = ManagementConfig::default();
        let p = PrometheusConfig::default();
        let amqp = "127.0.0.1:5672".parse().unwrap();
        assert!(validate(amqp, &m, &p).is_ok());
        let clash = PrometheusConfig {
            listen: "0.0.0.0:15672".parse().unwrap(),
            ..p.clone()
        };
        let err = validate(amqp, &m, &clash).unwrap_err();
        assert!(err.contains("prometheus.listen"), "{err}");
        let off = ManagementConfig {
            enabled: false,
            ..m.clone()
        };
        assert!(validate(amqp, &off, &clash).is_ok());
        let zero = ManagementConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..m
        };
        let zero_too = PrometheusConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..p
        };
        assert!(validate(amqp, &zero, &zero_too).is_ok());
    }
}
