//! Headers routing: a binding's arguments are compared with the message's `headers` table.
//!
//! `x-match` is `all` (the default), `any`, `all-with-x` or `any-with-x`. Binding keys that
//! start with `x-` are ignored unless a `-with-x` form is used. A binding value of type void
//! matches any value of that header, as in RabbitMQ.

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::amqp::broker::as_i128;
use crate::amqp::reply::{AmqpError, AmqpResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    All,
    Any,
}

/// Checks a binding's `x-match` argument when the binding is made.
pub fn validate(arguments: &FieldTable) -> AmqpResult<()> {
    parse_mode(arguments).map(|_| ())
}

fn parse_mode(arguments: &FieldTable) -> AmqpResult<(Mode, bool)> {
    match arguments.inner().get("x-match") {
        None => Ok((Mode::All, false)),
        Some(AMQPValue::LongString(s)) => match s.as_bytes() {
            b"all" => Ok((Mode::All, false)),
            b"any" => Ok((Mode::Any, false)),
            b"all-with-x" => Ok((Mode::All, true)),
            b"any-with-x" => Ok((Mode::Any, true)),
            other => Err(AmqpError::precondition(format!(
                "Invalid x-match field value <<\"{}\">>; expected all, any, all-with-x, or any-with-x",
                String::from_utf8_lossy(other)
            ))),
        },
        Some(AMQPValue::ShortString(s)) => {
            let mut table = FieldTable::default();
            table.insert("x-match".into(), AMQPValue::LongString(s.as_str().into()));
            parse_mode(&table)
        }
        Some(_) => Err(AmqpError::precondition(
            "Invalid x-match field type; expected longstr",
        )),
    }
}

/// Whether a message with `headers` matches a binding with `arguments`.
pub fn matches(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let Ok((mode, with_x)) = parse_mode(arguments) else {
        return false;
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    let mut considered = 0usize;
    let mut matched = 0usize;
    for (key, expected) in arguments.inner() {
        let key = key.as_str();
        if key == "x-match" || (!with_x && key.starts_with("x-")) {
            continue;
        }
        considered += 1;
        let hit = match (expected, headers.get(key)) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (expected, Some(actual)) => values_equal(expected, actual),
        };
        if hit {
            matched += 1;
        }
    }
    match mode {
        Mode::All => matched == considered,
        Mode::Any => matched > 0,
    }
}

/// Strings compare equal whatever their tag, and numbers by value whatever their width or
/// kind (RabbitMQ compares header values with Erlang's `==`, so `I` 5, `l` 5 and `d` 5.0 are
/// all equal); everything else by type and value.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (a, b) {
        (AMQPValue::LongString(x), AMQPValue::ShortString(y))
        | (AMQPValue::ShortString(y), AMQPValue::LongString(x)) => {
            x.as_bytes() == y.as_str().as_bytes()
        }
        _ => match (as_i128(a), as_i128(b)) {
            (Some(x), Some(y)) => x == y,
            _ => match (as_f64(a), as_f64(b)) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            },
        },
    }
}

fn as_f64(v: &AMQPValue) -> Option<f64> {
    match v {
        AMQPValue::Float(x) => Some(*x as f64),
        AMQPValue::Double(x) => Some(*x),
        other => as_i128(other).map(|n| n as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn all_needs_every_header() {
        let binding = table(&[("format", s("pdf")), ("type", s("report"))]);
        let both = table(&[("format", s("pdf")), ("type", s("report")), ("x", s("y"))]);
        let one = table(&[("format", s("pdf"))]);
        assert!(matches(&binding, Some(&both)));
        assert!(!matches(&binding, Some(&one)));
        assert!(!matches(&binding, None));
    }

    #[test]
    fn any_needs_one_header() {
        let binding = table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]);
        assert!(matches(&binding, Some(&table(&[("type", s("report"))]))));
        assert!(!matches(&binding, Some(&table(&[("type", s("log"))]))));
        assert!(!matches(&binding, None));
    }

    #[test]
    fn x_keys_are_ignored_unless_with_x() {
        let plain = table(&[("x-match", s("all")), ("x-case", s("c1"))]);
        assert!(matches(&plain, None), "all with no considered keys matches");
        let with_x = table(&[("x-match", s("all-with-x")), ("x-case", s("c1"))]);
        assert!(!matches(&with_x, None));
        assert!(matches(&with_x, Some(&table(&[("x-case", s("c1"))]))));
        let any_with_x = table(&[("x-match", s("any-with-x")), ("x-case", s("c1"))]);
        assert!(matches(&any_with_x, Some(&table(&[("x-case", s("c1"))]))));
    }

    #[test]
    fn typed_values_and_void() {
        let binding = table(&[("n", AMQPValue::LongInt(5)), ("present", AMQPValue::Void)]);
        let good = table(&[
            ("n", AMQPValue::LongInt(5)),
            ("present", AMQPValue::Boolean(true)),
        ]);
        let wider = table(&[
            ("n", AMQPValue::LongLongInt(5)),
            ("present", AMQPValue::Boolean(true)),
        ]);
        let double = table(&[
            ("n", AMQPValue::Double(5.0)),
            ("present", AMQPValue::Boolean(true)),
        ]);
        let string = table(&[
            ("n", AMQPValue::LongString("5".into())),
            ("present", AMQPValue::Boolean(true)),
        ]);
        let absent = table(&[("n", AMQPValue::LongInt(5))]);
        assert!(matches(&binding, Some(&good)));
        assert!(matches(&binding, Some(&wider)), "integers match by value");
        assert!(matches(&binding, Some(&double)), "5 == 5.0 as in Erlang");
        assert!(
            !matches(&binding, Some(&string)),
            "a string is not a number"
        );
        assert!(
            !matches(&binding, Some(&absent)),
            "void needs the header present"
        );
    }

    #[test]
    fn bad_x_match_is_refused() {
        assert!(validate(&table(&[("x-match", s("some"))])).is_err());
        assert!(validate(&table(&[("x-match", AMQPValue::LongInt(1))])).is_err());
        assert!(validate(&table(&[("x-match", s("any"))])).is_ok());
    }
}
