//! `${VAR}` and `${VAR:-default}` interpolation over every string in the parsed YAML tree.

use serde_json::Value;

/// Replaces `${VAR}` / `${VAR:-default}` in every string value of `tree`.
/// `lookup` is the environment (injected so tests need not touch the process env).
/// Errors name the YAML path and the variable.
pub fn interpolate(
    tree: &mut Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), super::ConfigError> {
    walk(tree, &mut String::new(), lookup)
}

fn walk(
    v: &mut Value,
    path: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), super::ConfigError> {
    match v {
        Value::String(s) if s.contains("${") => {
            *s = expand(s, lookup).map_err(|msg| super::ConfigError::at(path, msg))?;
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${`".to_string())?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(
                "invalid variable name in `${...}` (letters, digits and _ only)".to_string(),
            );
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                "environment variable {name} is not set (use ${{{name}:-default}} for a fallback)"
            ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_string())
    }

    #[test]
    fn expands_set_default_and_reports_unset() {
        let mut v = json!({"a": "x-${SET}-y", "b": ["${UNSET:-dflt}"], "c": 3});
        interpolate(&mut v, &env).unwrap();
        assert_eq!(v, json!({"a": "x-value-y", "b": ["dflt"], "c": 3}));

        let mut v = json!({"providers": {"openai": {"api_key": "${NOPE}"}}});
        let err = interpolate(&mut v, &env).unwrap_err().to_string();
        assert!(err.contains("providers.openai.api_key"), "{err}");
        assert!(err.contains("NOPE"), "{err}");
    }
}
