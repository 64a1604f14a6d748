//! `hsmca profiles import-cfssl`: turns a cfssl `ca-config.json` into hsmca profiles.
//!
//! cfssl profiles say only usages and expiry; everything hsmca's policy needs beyond that
//! (which subjects, which names) has no cfssl equivalent. Those rules are written as `TODO`
//! values, and a profile holding a `TODO` refuses to load, so an imported profile cannot sign
//! anything until the operator has filled in every strict rule. Pure: JSON in, JSON out.

use serde_json::{Value, json};

/// One converted profile.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Imported {
    /// Profile name (the cfssl profile name, or `default`).
    pub name: String,
    /// The hsmca profile JSON.
    pub profile: Value,
    /// Keys the operator must fill in (each holds a `TODO` value).
    pub todo: Vec<String>,
    /// What was dropped or changed, and why.
    pub notes: Vec<String>,
}

/// Marker for a rule that must be written by hand.
pub const TODO: &str = "TODO";

/// Converts `signing.default` and every `signing.profiles.*` entry.
pub fn import(config: &Value) -> Result<Vec<Imported>, String> {
    let signing = config
        .get("signing")
        .ok_or("no \"signing\" object: not a cfssl ca-config.json")?;
    let mut out = Vec::new();
    if let Some(p) = signing.get("profiles").and_then(Value::as_object) {
        for (name, body) in p {
            out.push(convert(name, body, signing.get("default"))?);
        }
    }
    if out.is_empty() {
        let default = signing
            .get("default")
            .ok_or("no signing.default and no signing.profiles")?;
        out.push(convert("default", default, None)?);
    }
    Ok(out)
}

fn convert(name: &str, body: &Value, default: Option<&Value>) -> Result<Imported, String> {
    let field = |k: &str| body.get(k).or_else(|| default.and_then(|d| d.get(k)));
    let mut notes = Vec::new();
    let (mut ku, mut eku) = (Vec::new(), Vec::new());
    let mut ca = false;
    for usage in field("usages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        match usage {
            "signing" | "digital signature" => ku.push("digital_signature"),
            "key encipherment" => ku.push("key_encipherment"),
            "key agreement" => ku.push("key_agreement"),
            "content commitment" => ku.push("content_commitment"),
            "cert sign" => {
                ku.push("key_cert_sign");
                ca = true;
            }
            "crl sign" => ku.push("crl_sign"),
            "server auth" => eku.push("server_auth"),
            "client auth" => eku.push("client_auth"),
            other => notes.push(format!(
                "usage {other:?} dropped: hsmca profiles do not issue it"
            )),
        }
    }
    ku.sort_unstable();
    ku.dedup();
    eku.sort_unstable();
    eku.dedup();
    if !ku.contains(&"digital_signature") {
        ku.insert(0, "digital_signature");
        notes.push("digital_signature added: every certificate hsmca makes can sign".into());
    }
    let expiry = field("expiry").and_then(Value::as_str).unwrap_or("8760h");
    let validity = go_duration(expiry)
        .ok_or_else(|| format!("profile {name:?}: expiry {expiry:?} is not a Go duration"))?;
    if field("copy_extensions").and_then(Value::as_bool) == Some(true) {
        notes.push("copy_extensions ignored: hsmca never copies requested extensions".into());
    }
    let mut todo = vec!["subject.CN.values".to_owned()];
    let mut profile = json!({
        "name": name,
        "description": format!("imported from cfssl profile {name:?}; fill in every TODO before use"),
        "issuer": "root",
        "key_types": ["rsa-2048", "rsa-3072", "rsa-4096", "ecdsa-p256", "ecdsa-p384"],
        "subject": { "CN": { "required": true, "values": [format!("{TODO}: the exact CNs this profile may sign")] } },
        "key_usage": ku,
        "extended_key_usage": eku,
        "validity": { "default": validity, "max": validity },
    });
    if ca {
        let path_len = body
            .pointer("/ca_constraint/max_path_len")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        profile["ca"] = json!({ "path_len": path_len });
        profile["key_usage"] = json!(["digital_signature", "key_cert_sign", "crl_sign"]);
        notes.push("CA profile: use it with `hsmca ca create`".into());
    } else {
        profile["san"] = json!({ "dns": [format!("{TODO}: allowed DNS names or *.suffix")], "ip": [], "max": 16 });
        todo.push("san.dns".into());
        if eku.is_empty() {
            profile["extended_key_usage"] =
                json!([format!("{TODO}: server_auth and/or client_auth")]);
            todo.push("extended_key_usage".into());
        }
    }
    Ok(Imported {
        name: name.to_owned(),
        profile,
        todo,
        notes,
    })
}

/// `8760h`, `43800h`, `720h30m` → whole days as `365d` (rounded up), or hours if under a day.
fn go_duration(s: &str) -> Option<String> {
    let mut secs = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        secs += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    if !num.is_empty() || secs == 0 {
        return None;
    }
    Some(if secs >= 86_400 {
        format!("{}d", secs.div_ceil(86_400))
    } else {
        format!("{}h", secs.div_ceil(3600))
    })
}

/// Key paths of every string value that still holds a `TODO`.
pub fn todos(value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::String(s) if s.starts_with(TODO) => out.push(at.to_owned()),
        Value::Array(items) => items.iter().for_each(|v| todos(v, at, out)),
        Value::Object(map) => {
            for (k, v) in map {
                todos(
                    v,
                    &if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    },
                    out,
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_style_config_converts_with_todos() {
        let cfg = json!({"signing": {"default": {"expiry": "8760h"}, "profiles": {"kubernetes": {
            "usages": ["signing", "key encipherment", "server auth", "client auth"], "expiry": "8760h"}}}});
        let out = import(&cfg).unwrap();
        assert_eq!(out.len(), 1);
        let p = &out[0].profile;
        assert_eq!(p["validity"]["max"], "365d");
        assert_eq!(
            p["key_usage"],
            json!(["digital_signature", "key_encipherment"])
        );
        assert_eq!(
            p["extended_key_usage"],
            json!(["client_auth", "server_auth"])
        );
        let mut t = Vec::new();
        todos(p, "", &mut t);
        assert_eq!(t, vec!["san.dns", "subject.CN.values"]);
    }

    #[test]
    fn durations() {
        assert_eq!(go_duration("87600h").as_deref(), Some("3650d"));
        assert_eq!(go_duration("12h").as_deref(), Some("12h"));
        assert_eq!(go_duration("1y"), None);
    }
}
