//! AMQP reply codes and the one error type every broker operation returns.
//!
//! RabbitMQ decides whether an error closes the channel (soft) or the whole connection (hard)
//! from the reply code, with a few exceptions (an auth failure is a 403 that closes the
//! connection). [`AmqpError`] therefore carries its scope explicitly, defaulting from the code.

use std::fmt;

/// The reply codes of AMQP 0-9-1 as RabbitMQ uses them (`amqp-rabbitmq-0.9.1.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReplyCode {
    Success = 200,
    ContentTooLarge = 311,
    NoRoute = 312,
    NoConsumers = 313,
    ConnectionForced = 320,
    InvalidPath = 402,
    AccessRefused = 403,
    NotFound = 404,
    ResourceLocked = 405,
    PreconditionFailed = 406,
    FrameError = 501,
    SyntaxError = 502,
    CommandInvalid = 503,
    ChannelError = 504,
    UnexpectedFrame = 505,
    ResourceError = 506,
    NotAllowed = 530,
    NotImplemented = 540,
    InternalError = 541,
}

impl ReplyCode {
    /// The numeric code sent on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The spec's name for the code, used in reply texts (`NOT_FOUND - no queue 'x'`).
    pub fn name(self) -> &'static str {
        match self {
            ReplyCode::Success => "OK",
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Hard errors close the connection; soft ones close only the channel.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            ReplyCode::ConnectionForced
                | ReplyCode::InvalidPath
                | ReplyCode::FrameError
                | ReplyCode::SyntaxError
                | ReplyCode::CommandInvalid
                | ReplyCode::ChannelError
                | ReplyCode::UnexpectedFrame
                | ReplyCode::ResourceError
                | ReplyCode::NotAllowed
                | ReplyCode::NotImplemented
                | ReplyCode::InternalError
        )
    }
}

/// Whether an error closes one channel or the whole connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Channel,
    Connection,
}

/// A failed AMQP operation: what the peer is told in `channel.close` / `connection.close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: ReplyCode,
    /// Human text, already prefixed with the code name as RabbitMQ does.
    pub text: String,
    /// The method that failed (class id, method id), or (0, 0) when none applies.
    pub method: (u16, u16),
    pub scope: Scope,
}

impl AmqpError {
    /// An error whose scope follows from its code.
    pub fn new(code: ReplyCode, text: impl fmt::Display) -> Self {
        let scope = if code.is_hard() {
            Scope::Connection
        } else {
            Scope::Channel
        };
        AmqpError {
            code,
            text: format!("{} - {}", code.name(), text),
            method: (0, 0),
            scope,
        }
    }

    /// An error that closes the connection whatever its code (e.g. a 403 auth failure).
    pub fn connection(code: ReplyCode, text: impl fmt::Display) -> Self {
        AmqpError {
            scope: Scope::Connection,
            ..AmqpError::new(code, text)
        }
    }

    /// Records which method failed, for the close frame.
    pub fn on_method(mut self, class_id: u16, method_id: u16) -> Self {
        if self.method == (0, 0) {
            self.method = (class_id, method_id);
        }
        self
    }

    pub fn not_found(text: impl fmt::Display) -> Self {
        AmqpError::new(ReplyCode::NotFound, text)
    }

    pub fn precondition(text: impl fmt::Display) -> Self {
        AmqpError::new(ReplyCode::PreconditionFailed, text)
    }

    pub fn access_refused(text: impl fmt::Display) -> Self {
        AmqpError::new(ReplyCode::AccessRefused, text)
    }

    pub fn not_allowed(text: impl fmt::Display) -> Self {
        AmqpError::new(ReplyCode::NotAllowed, text)
    }

    pub fn not_implemented(text: impl fmt::Display) -> Self {
        AmqpError::new(ReplyCode::NotImplemented, text)
    }

    pub fn is_connection_error(&self) -> bool {
        self.scope == Scope::Connection
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.text)
    }
}

impl std::error::Error for AmqpError {}

/// Shorthand for broker operations.
pub type AmqpResult<T> = Result<T, AmqpError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_follows_code_unless_forced() {
        assert_eq!(AmqpError::not_found("x").scope, Scope::Channel);
        assert_eq!(
            AmqpError::new(ReplyCode::FrameError, "x").scope,
            Scope::Connection
        );
        assert_eq!(
            AmqpError::connection(ReplyCode::AccessRefused, "x").scope,
            Scope::Connection
        );
        assert_eq!(
            AmqpError::not_found("no queue 'q'").text,
            "NOT_FOUND - no queue 'q'"
        );
    }
}
