//! JSON shapes shared by the API: AMQP field tables to and from JSON, message properties,
//! and the list conventions RabbitMQ clients rely on (`columns`, `sort`, `sort_reverse`,
//! `name`/`use_regex`, and `page`/`page_size` which wrap the list in a page object).

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::ApiError;

/// An AMQP field value as JSON (RabbitMQ's management encoding: numbers, strings, booleans,
/// nested tables and arrays; byte arrays as strings).
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), amqp_to_json(v)))
            .collect(),
    )
}

/// JSON to an AMQP value: integers become `l` (signed 64-bit), as RabbitMQ does.
pub fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for x in a {
                arr.push(json_to_amqp(x));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(_) => AMQPValue::FieldTable(json_to_table(v).unwrap_or_default()),
    }
}

/// A JSON object (or null) as a field table; anything else is a 400.
pub fn json_to_table(v: &Value) -> Result<FieldTable, ApiError> {
    let mut t = FieldTable::default();
    match v {
        Value::Null => {}
        Value::Object(map) => {
            for (k, x) in map {
                if k.len() > 255 {
                    return Err(ApiError::bad_request(
                        "argument names are at most 255 bytes",
                    ));
                }
                t.insert(ShortString::from(k.clone()), json_to_amqp(x));
            }
        }
        _ => return Err(ApiError::bad_request("arguments must be a JSON object")),
    }
    Ok(t)
}

/// Message properties as the management API shows them.
pub fn properties_to_json(p: &AMQPProperties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put(
        "content_type",
        p.content_type().as_ref().map(|s| json!(s.as_str())),
    );
    put(
        "content_encoding",
        p.content_encoding().as_ref().map(|s| json!(s.as_str())),
    );
    put("headers", p.headers().as_ref().map(table_to_json));
    put("delivery_mode", p.delivery_mode().map(|d| json!(d)));
    put("priority", p.priority().map(|d| json!(d)));
    put(
        "correlation_id",
        p.correlation_id().as_ref().map(|s| json!(s.as_str())),
    );
    put("reply_to", p.reply_to().as_ref().map(|s| json!(s.as_str())));
    put(
        "expiration",
        p.expiration().as_ref().map(|s| json!(s.as_str())),
    );
    put(
        "message_id",
        p.message_id().as_ref().map(|s| json!(s.as_str())),
    );
    put("timestamp", p.timestamp().map(|t| json!(t)));
    put("type", p.kind().as_ref().map(|s| json!(s.as_str())));
    put("user_id", p.user_id().as_ref().map(|s| json!(s.as_str())));
    put("app_id", p.app_id().as_ref().map(|s| json!(s.as_str())));
    put(
        "cluster_id",
        p.cluster_id().as_ref().map(|s| json!(s.as_str())),
    );
    Value::Object(m)
}

/// Message properties from the management API's JSON; unknown keys and bad types are a 400.
pub fn json_to_properties(v: &Value) -> Result<AMQPProperties, ApiError> {
    let mut p = AMQPProperties::default();
    let Some(map) = (match v {
        Value::Null => None,
        Value::Object(m) => Some(m),
        _ => return Err(ApiError::bad_request("properties must be a JSON object")),
    }) else {
        return Ok(p);
    };
    let text = |k: &str, x: &Value| -> Result<ShortString, ApiError> {
        match x {
            Value::String(s) if s.len() <= 255 => Ok(ShortString::from(s.clone())),
            _ => Err(ApiError::bad_request(format!(
                "property {k} must be a string of at most 255 bytes"
            ))),
        }
    };
    let octet = |k: &str, x: &Value| -> Result<u8, ApiError> {
        x.as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(|| ApiError::bad_request(format!("property {k} must be 0 to 255")))
    };
    for (k, x) in map {
        p = match k.as_str() {
            "content_type" => p.with_content_type(text(k, x)?),
            "content_encoding" => p.with_content_encoding(text(k, x)?),
            "headers" => p.with_headers(json_to_table(x)?),
            "delivery_mode" => p.with_delivery_mode(octet(k, x)?),
            "priority" => p.with_priority(octet(k, x)?),
            "correlation_id" => p.with_correlation_id(text(k, x)?),
            "reply_to" => p.with_reply_to(text(k, x)?),
            "expiration" => {
                let s = text(k, x)?;
                if s.as_str().parse::<u64>().is_err() {
                    return Err(ApiError::bad_request(format!(
                        "invalid expiration '{}': a number of milliseconds",
                        s.as_str()
                    )));
                }
                p.with_expiration(s)
            }
            "message_id" => p.with_message_id(text(k, x)?),
            "timestamp" => p.with_timestamp(x.as_u64().ok_or_else(|| {
                ApiError::bad_request("property timestamp must be a non-negative integer")
            })?),
            "type" => p.with_type(text(k, x)?),
            "user_id" => p.with_user_id(text(k, x)?),
            "app_id" => p.with_app_id(text(k, x)?),
            "cluster_id" => p.with_cluster_id(text(k, x)?),
            other => {
                return Err(ApiError::bad_request(format!("unknown property '{other}'")));
            }
        };
    }
    Ok(p)
}

/// A payload as the API returns it: text when it is UTF-8 (and `encoding` is `auto`),
/// base64 otherwise. Returns (payload, payload_encoding).
pub fn encode_payload(body: &[u8], auto: bool) -> (String, &'static str) {
    match std::str::from_utf8(body) {
        Ok(s) if auto => (s.to_string(), "string"),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(body),
            "base64",
        ),
    }
}

/// The query options list endpoints take.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub columns: Option<String>,
    pub sort: Option<String>,
    pub sort_reverse: Option<bool>,
    pub name: Option<String>,
    pub use_regex: Option<bool>,
    pub page: Option<usize>,
    pub page_size: Option<usize>,
}

/// Looks up a dotted path (`queue_totals.messages`) in a JSON object.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, part| v.get(part))
}

/// Keeps only the named (possibly dotted) columns of an object.
pub fn pick_columns(v: &Value, columns: &[&str]) -> Value {
    let mut out = Map::new();
    for col in columns {
        let Some(found) = lookup(v, col) else {
            continue;
        };
        insert_path(&mut out, &col.split('.').collect::<Vec<_>>(), found.clone());
    }
    Value::Object(out)
}

fn insert_path(map: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            map.insert(last.to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = map
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (x, y) => x.map(Value::to_string).cmp(&y.map(Value::to_string)),
    }
}

/// Applies the list conventions to `items` (each a JSON object).
pub fn list(mut items: Vec<Value>, q: &ListQuery) -> Result<Value, ApiError> {
    let total = items.len();
    if let Some(name) = q.name.as_deref().filter(|n| !n.is_empty()) {
        if q.use_regex == Some(true) {
            let re = regex::Regex::new(name)
                .map_err(|e| ApiError::bad_request(format!("name: bad regular expression: {e}")))?;
            items.retain(|v| v["name"].as_str().is_some_and(|n| re.is_match(n)));
        } else {
            items.retain(|v| v["name"].as_str().is_some_and(|n| n.contains(name)));
        }
    }
    if let Some(sort) = q.sort.as_deref().filter(|s| !s.is_empty()) {
        items.sort_by(|a, b| compare(lookup(a, sort), lookup(b, sort)));
    }
    if q.sort_reverse == Some(true) {
        items.reverse();
    }
    if let Some(cols) = q.columns.as_deref().filter(|c| !c.is_empty()) {
        let cols: Vec<&str> = cols.split(',').map(str::trim).collect();
        items = items.iter().map(|v| pick_columns(v, &cols)).collect();
    }
    let Some(page) = q.page else {
        return Ok(Value::Array(items));
    };
    let page_size = q.page_size.unwrap_or(100);
    if page == 0 || page_size == 0 || page_size > 500 {
        return Err(ApiError::bad_request(
            "page must be at least 1 and page_size 1 to 500",
        ));
    }
    let filtered = items.len();
    let page_count = filtered.div_ceil(page_size).max(1);
    let start = (page - 1).saturating_mul(page_size);
    let page_items: Vec<Value> = items.into_iter().skip(start).take(page_size).collect();
    Ok(json!({
        "items": page_items,
        "page": page,
        "page_size": page_size,
        "page_count": page_count,
        "filtered_count": filtered,
        "item_count": page_items_len(start, page_size, filtered),
        "total_count": total,
    }))
}

fn page_items_len(start: usize, size: usize, filtered: usize) -> usize {
    filtered.saturating_sub(start).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_through_json() {
        let v = json!({"x-max-length": 10, "x-dead-letter-exchange": "dlx", "flag": true,
                       "nested": {"a": [1, "b"]}, "ratio": 0.5});
        let t = json_to_table(&v).unwrap();
        assert_eq!(table_to_json(&t), v);
        assert!(json_to_table(&json!([1])).is_err());
    }

    #[test]
    fn properties_are_checked() {
        let p = json_to_properties(&json!({"delivery_mode": 2, "headers": {"a": 1},
                                            "content_type": "application/json"}))
        .unwrap();
        assert_eq!(p.delivery_mode(), &Some(2));
        let back = properties_to_json(&p);
        assert_eq!(back["content_type"], "application/json");
        assert_eq!(back["headers"]["a"], 1);
        assert!(json_to_properties(&json!({"delivery_mode": 300})).is_err());
        assert!(json_to_properties(&json!({"expiration": "soon"})).is_err());
        assert!(json_to_properties(&json!({"colour": "red"})).is_err());
    }

    #[test]
    fn list_conventions() {
        let items: Vec<Value> = (0..5)
            .map(|i| json!({"name": format!("q{i}"), "messages": 10 - i, "x": {"y": i}}))
            .collect();
        let q = ListQuery {
            columns: Some("name,x.y".into()),
            sort: Some("messages".into()),
            ..Default::default()
        };
        let out = list(items.clone(), &q).unwrap();
        assert_eq!(out[0], json!({"name": "q4", "x": {"y": 4}}));
        let q = ListQuery {
            page: Some(2),
            page_size: Some(2),
            ..Default::default()
        };
        let out = list(items.clone(), &q).unwrap();
        assert_eq!(out["items"][0]["name"], "q2");
        assert_eq!(out["page_count"], 3);
        assert_eq!(out["item_count"], 2);
        assert_eq!(out["total_count"], 5);
        let q = ListQuery {
            name: Some("^q[34]$".into()),
            use_regex: Some(true),
            ..Default::default()
        };
        assert_eq!(list(items, &q).unwrap().as_array().unwrap().len(), 2);
    }

    #[test]
    fn payloads_are_text_or_base64() {
        assert_eq!(encode_payload(b"hi", true), ("hi".into(), "string"));
        assert_eq!(encode_payload(&[0xff], true).1, "base64");
        assert_eq!(encode_payload(b"hi", false), ("aGk=".into(), "base64"));
    }
}
