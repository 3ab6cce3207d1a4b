//! Other tools' YAML (a LiteLLM config, a compose file) read as a JSON tree, keys as
//! written. cascade's own config goes through the `config` crate instead.

use serde_json::{json, Map, Value};

/// The first document of `text` (`null` when empty), with anchors resolved and merge
/// keys (`<<: *anchor`) applied as compose and PyYAML apply them: the merged entries
/// under the ones written beside them.
pub fn parse(text: &str) -> Result<Value, String> {
    let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    Ok(docs.first().map(to_json).unwrap_or(Value::Null))
}

fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(r) => r.parse::<f64>().map_or(Value::Null, |f| json!(f)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            let mut merged = Vec::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Real(r) => r.clone(),
                    Yaml::Boolean(b) => b.to_string(),
                    _ => continue,
                };
                if key == "<<" {
                    merged.push(to_json(v));
                } else {
                    m.insert(key, to_json(v));
                }
            }
            for base in merged {
                let bases = match base {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                for b in bases {
                    if let Value::Object(b) = b {
                        for (k, v) in b {
                            m.entry(k).or_insert(v);
                        }
                    }
                }
            }
            Value::Object(m)
        }
        _ => Value::Null,
    }
}
