//! Reading the `--json` output of the binaries: fields by name, with errors that show the object.

use anyhow::Context;
use serde_json::Value;

/// String field `key` of `v`.
pub fn str_field<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("no string field {key:?} in {v}"))
}

/// Unsigned integer field `key` of `v`.
pub fn u64_field(v: &Value, key: &str) -> anyhow::Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .with_context(|| format!("no unsigned integer field {key:?} in {v}"))
}

/// The snapshot a job report (`backup --json`) is about.
pub fn snapshot_id(report: &Value) -> anyhow::Result<String> {
    let id = str_field(report, "snapshot_id")?;
    anyhow::ensure!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "snapshot id {id:?} is not 16 hex digits"
    );
    Ok(id.to_owned())
}

/// The snapshot with `id` in a `snapshots --json` list.
pub fn find_snapshot<'a>(list: &'a [Value], id: &str) -> anyhow::Result<&'a Value> {
    list.iter()
        .find(|s| s["id"] == id)
        .with_context(|| format!("snapshot {id} not listed in {list:?}"))
}
