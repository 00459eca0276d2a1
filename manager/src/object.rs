//! Objects of routed types as the manager holds them: the few metadata
//! fields routing reads, decoded once, and the object's JSON as the API
//! server sent it, which the manager forwards to runtimes without decoding
//! the rest or encoding it again.
//!
//! A watcher over [`RawObject`]s does what one over `DynamicObject`s does,
//! without building a JSON tree of every object: that tree was the larger
//! part of the manager's time per event and of its memory per object.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{
    Resource,
    core::{ApiResource, DynamicResourceScope},
};
use serde::{Deserialize, Deserializer, de::IgnoredAny};
use serde_json::value::RawValue;

/// One object: its routing metadata and its JSON.
#[derive(Clone, Debug)]
pub(crate) struct RawObject {
    /// Name, namespace, uid, resourceVersion, generation and owner
    /// references; nothing else (no labels, annotations or managed fields).
    pub(crate) metadata: ObjectMeta,
    /// True if the JSON carries `apiVersion` and `kind` (list items do not).
    typed: bool,
    /// The object as the API server sent it.
    json: Box<str>,
}

/// The part of an object the manager decodes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    api_version: Option<IgnoredAny>,
    kind: Option<IgnoredAny>,
    #[serde(default)]
    metadata: Meta,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    owner_references: Option<Vec<OwnerReference>>,
}

// === impl RawObject ===

impl RawObject {
    /// Reads an object's routing metadata from its JSON, which it keeps.
    pub(crate) fn from_json(json: impl Into<Box<str>>) -> serde_json::Result<Self> {
        let json = json.into();
        let head: Head = serde_json::from_str(&json)?;
        let m = head.metadata;
        Ok(Self {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                generation: m.generation,
                owner_references: m.owner_references,
                ..ObjectMeta::default()
            },
            typed: head.api_version.is_some() && head.kind.is_some(),
            json,
        })
    }

    /// The object's JSON.
    pub(crate) fn json(&self) -> &str {
        &self.json
    }

    /// This object with `apiVersion` and `kind` in its JSON, which list
    /// items lack and typed clients need. Object JSON carrying them is
    /// returned as it is.
    pub(crate) fn with_types(self, api_version: &str, kind: &str) -> Self {
        if self.typed {
            return self;
        }
        let Some(rest) = self.json.trim_start().strip_prefix('{') else {
            return self;
        };
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let comma = if rest.trim_start().starts_with('}') {
            ""
        } else {
            ","
        };
        let json = format!(
            "{{\"apiVersion\":{},\"kind\":{}{comma}{rest}",
            quote(api_version),
            quote(kind)
        );
        Self {
            typed: true,
            json: json.into(),
            ..self
        }
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Self::from_json(Box::<str>::from(raw)).map_err(serde::de::Error::custom)
    }
}

impl From<&kube::api::DynamicObject> for RawObject {
    /// Encodes a decoded object (tests and benchmarks build objects so).
    fn from(obj: &kube::api::DynamicObject) -> Self {
        let json = serde_json::to_string(obj).unwrap_or_else(|_| "{}".into());
        Self::from_json(json).unwrap_or_else(|_| Self {
            metadata: obj.metadata.clone(),
            typed: obj.types.is_some(),
            json: "{}".into(),
        })
    }
}

impl Resource for RawObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt as _;

    #[test]
    fn routing_metadata_is_read_and_the_json_kept_as_sent() {
        let json = r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w","namespace":"team","uid":"u1","resourceVersion":"42","generation":3,"labels":{"a":"b"},"ownerReferences":[{"apiVersion":"example.com/v1","kind":"Parent","name":"p","uid":"u0","controller":true}],"managedFields":[{"manager":"m"}]},"spec":{"size":  1}}"#;
        let o: RawObject = serde_json::from_str(json).expect("decodes");
        assert_eq!(o.name_any(), "w");
        assert_eq!(o.namespace().as_deref(), Some("team"));
        assert_eq!(o.resource_version().as_deref(), Some("42"));
        assert_eq!(o.metadata.generation, Some(3));
        assert_eq!(o.owner_references()[0].name, "p");
        assert_eq!(o.owner_references()[0].controller, Some(true));
        // Not kept decoded: the JSON has them.
        assert!(o.metadata.labels.is_none() && o.metadata.managed_fields.is_none());
        assert_eq!(o.json(), json, "byte for byte, spacing included");
        assert_eq!(o.clone().with_types("x/v1", "X").json(), json);
    }

    #[test]
    fn list_items_get_their_type_and_stay_valid_json() {
        for (json, want) in [
            (
                r#"{"metadata":{"name":"a"},"data":{"k":"v"}}"#,
                serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}}),
            ),
            (
                r#" { } "#,
                serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap"}),
            ),
        ] {
            let o = RawObject::from_json(json)
                .expect("decodes")
                .with_types("v1", "ConfigMap");
            let got: serde_json::Value = serde_json::from_str(o.json()).expect("valid JSON");
            assert_eq!(got, want);
        }
        // A kind that needs escaping stays one string.
        let o = RawObject::from_json("{}")
            .expect("decodes")
            .with_types("a/v1", "K\"ind");
        let got: serde_json::Value = serde_json::from_str(o.json()).expect("valid JSON");
        assert_eq!(got["kind"], "K\"ind");
    }

    #[test]
    fn watch_events_and_lists_decode_through_kube() {
        let line = r#"{"type":"MODIFIED","object":{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a","namespace":"n","resourceVersion":"7"}}}"#;
        let ev: kube::api::WatchEvent<RawObject> = serde_json::from_str(line).expect("decodes");
        let kube::api::WatchEvent::Modified(o) = ev else {
            panic!("not a modification: {ev:?}");
        };
        assert_eq!(o.resource_version().as_deref(), Some("7"));
        let list = r#"{"apiVersion":"v1","kind":"ConfigMapList","metadata":{"resourceVersion":"9"},"items":[{"metadata":{"name":"a"}},{"metadata":{"name":"b"}}]}"#;
        let list: kube::core::ObjectList<RawObject> = serde_json::from_str(list).expect("decodes");
        let names: Vec<String> = list.items.iter().map(|o| o.name_any()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_malformed_object_is_an_error_not_a_panic() {
        assert!(RawObject::from_json(r#"{"metadata":{"name":5}}"#).is_err());
        assert!(RawObject::from_json("[]").is_err());
        assert!(serde_json::from_str::<RawObject>("{").is_err());
    }
}
