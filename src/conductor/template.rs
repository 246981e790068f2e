//! Step command templates. A template is parsed once, at config load, so an unknown
//! placeholder is a start-up error; rendering puts every value through [`shell_quote`], the
//! one quoting function in mqic, so a case directory named `x; rm -rf ~` stays one argument.

use std::collections::BTreeMap;

/// Every placeholder a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "case_id",
    "case_dir",
    "remote_case_dir",
    "result_dir",
    "gpu_id",
    "step",
    "attempt",
    "host",
    "room",
    "workflow",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Placeholder(&'static str),
}

/// A parsed template: literal text and placeholders. `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}} (known: {list})", list = PLACEHOLDERS.join(", "))]
    Unknown(String),
    #[error("unclosed '{{' at byte {0}")]
    Unclosed(usize),
    #[error("a lone '}}' at byte {0} (write '}}}}' for a literal brace)")]
    LoneClose(usize),
    #[error(
        "placeholder {{{0}}} is inside quotes; write it bare, it is quoted for the shell already"
    )]
    Quoted(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < text.len() {
            let c = bytes[i];
            if c == b'{' && bytes.get(i + 1) == Some(&b'{') {
                literal.push('{');
                i += 2;
            } else if c == b'}' && bytes.get(i + 1) == Some(&b'}') {
                literal.push('}');
                i += 2;
            } else if c == b'{' {
                let end = text[i..].find('}').ok_or(TemplateError::Unclosed(i))? + i;
                let name = &text[i + 1..end];
                let known = PLACEHOLDERS
                    .iter()
                    .find(|p| **p == name)
                    .ok_or_else(|| TemplateError::Unknown(name.to_string()))?;
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Placeholder(known));
                i = end + 1;
            } else if c == b'}' {
                return Err(TemplateError::LoneClose(i));
            } else {
                let ch = text[i..].chars().next().expect("in bounds");
                literal.push(ch);
                i += ch.len_utf8();
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// Parses a shell command template. Placeholders must stand outside quotes: a value
    /// quoted by [`shell_quote`] inside `"..."` would be expanded by the shell again.
    pub fn parse_command(text: &str) -> Result<Template, TemplateError> {
        let template = Template::parse(text)?;
        let (mut single, mut double) = (false, false);
        for part in &template.parts {
            match part {
                Part::Text(t) => {
                    let mut escaped = false;
                    for c in t.chars() {
                        match c {
                            _ if escaped => escaped = false,
                            '\\' if !single => escaped = true,
                            '\'' if !double => single = !single,
                            '"' if !single => double = !double,
                            _ => {}
                        }
                    }
                }
                Part::Placeholder(p) if single || double => {
                    return Err(TemplateError::Quoted(p.to_string()))
                }
                Part::Placeholder(_) => {}
            }
        }
        Ok(template)
    }

    /// Renders for a shell: every value is quoted. A placeholder with no value renders as
    /// an empty quoted string (`''`), never as nothing, so arguments do not shift.
    pub fn render_shell(&self, values: &BTreeMap<&str, String>) -> String {
        self.render(values, shell_quote)
    }

    /// Renders a path: values are inserted as they are (no shell is involved).
    pub fn render_path(&self, values: &BTreeMap<&str, String>) -> String {
        self.render(values, |v| v.to_string())
    }

    fn render(&self, values: &BTreeMap<&str, String>, quote: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Placeholder(p) => {
                    out.push_str(&quote(values.get(p).map(String::as_str).unwrap_or("")))
                }
            }
        }
        out
    }
}

/// Quotes a value for POSIX `sh`: safe characters pass through, anything else is wrapped in
/// single quotes with embedded single quotes written as `'\''`.
pub fn shell_quote(value: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !value.is_empty() && value.chars().all(safe) {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn placeholders_are_quoted_and_unknown_ones_refused() {
        let t = Template::parse("run --case {case_id} --dir {case_dir} --gpu {gpu_id}").unwrap();
        let out = t.render_shell(&values(&[
            ("case_id", "c1"),
            ("case_dir", "/data/x; rm -rf ~"),
            ("gpu_id", "0"),
        ]));
        assert_eq!(out, "run --case c1 --dir '/data/x; rm -rf ~' --gpu 0");
        assert_eq!(
            Template::parse("run {cas_id}").unwrap_err(),
            TemplateError::Unknown("cas_id".into())
        );
        assert!(matches!(
            Template::parse("run {case_id"),
            Err(TemplateError::Unclosed(4))
        ));
        assert!(matches!(
            Template::parse("awk '}'"),
            Err(TemplateError::LoneClose(_))
        ));
    }

    #[test]
    fn placeholders_inside_quotes_are_refused_in_commands() {
        for bad in [
            r#"run "{case_dir}""#,
            "run '{case_id}'",
            r#"sh -c "cd {case_dir} && go""#,
        ] {
            assert!(
                matches!(Template::parse_command(bad), Err(TemplateError::Quoted(_))),
                "{bad}"
            );
        }
        for good in [
            "run {case_dir}",
            r#"run "literal" {case_dir} 'x'"#,
            r#"echo \" {case_id}"#,
            "MQIC=${{X:-1}} run {case_id}",
        ] {
            assert!(Template::parse_command(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn literal_braces_and_missing_values() {
        let t = Template::parse("echo {{x}} {room}").unwrap();
        assert_eq!(t.render_shell(&values(&[])), "echo {x} ''");
    }

    #[test]
    fn quoting_survives_a_real_shell() {
        let nasty = "it's $(whoami) `id` \"q\" \\ * \n end";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), nasty);
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
    }
}
