//! Who a runtime is: its hello carries a projected ServiceAccount token
//! (audience [`AUDIENCE`]) bound to its Pod. The manager reviews it with the
//! apiserver (TokenReview), caches the answer while the token is valid, and
//! admits the runtime only as the Pod the token is bound to:
//!
//! - no token, or one the apiserver does not accept for this audience:
//!   `UNAUTHENTICATED`, before anything is read for the hello;
//! - a token of another namespace, bound to another pod, or to an earlier
//!   pod of the same name (its UID is checked against the live Pod), or a
//!   pod outside the mesh's namespace and its `spec.runtimeNamespaces`:
//!   `PERMISSION_DENIED`;
//! - a ServiceAccount that may not list and watch, cluster-wide, every type
//!   the runtime would receive (a SubjectAccessReview per type and verb):
//!   `PERMISSION_DENIED`, naming the missing grant. The manager never hands
//!   a runtime objects its own identity could not read.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use opmesh_proto::v1::{GroupVersionKind, Hello};

use crate::error::Refusal;

/// The audience a runtime's token must be issued for.
const AUDIENCE: &str = opmesh_proto::env::TOKEN_AUDIENCE;
/// The longest a review is trusted without asking again.
const CACHE_FOR: Duration = Duration::from_secs(300);
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The most keys a hello may report as held.
const MAX_HELD: usize = opmesh_proto::MAX_HELD_KEYS;
/// The most owned types a hello may declare.
const MAX_OWNS: usize = 64;
/// The longest key a hello may report (`namespace/name`).
const MAX_KEY: usize = 63 + 1 + 253;

/// Checks the shape of every string in `hello` before any of it is used,
/// in an API path or anywhere else: names are Kubernetes names, and lists
/// are bounded.
pub(crate) fn check_hello(hello: &Hello) -> Result<(), Refusal> {
    let bad = |field: &str, what: &str, value: &str| {
        let shown: String = value.chars().take(80).collect();
        Refusal::Malformed(format!("{field} {shown:?} is not {what}"))
    };
    for (field, value) in [
        ("hello.mesh_namespace", &hello.mesh_namespace),
        ("hello.pod_namespace", &hello.pod_namespace),
    ] {
        if value.is_empty() {
            return Err(Refusal::Malformed(format!("{field} is empty")));
        }
        if !dns_label(value) {
            return Err(bad(field, "a namespace name (RFC 1123 label)", value));
        }
    }
    for (field, value) in [
        ("hello.mesh_name", &hello.mesh_name),
        ("hello.pod_name", &hello.pod_name),
    ] {
        if value.is_empty() {
            return Err(Refusal::Malformed(format!("{field} is empty")));
        }
        if !dns_subdomain(value) {
            return Err(bad(field, "an object name (RFC 1123 subdomain)", value));
        }
    }
    if hello.owns.len() > MAX_OWNS {
        return Err(Refusal::Malformed(format!(
            "hello.owns declares {} types, more than {MAX_OWNS}",
            hello.owns.len()
        )));
    }
    if hello.held.len() > MAX_HELD {
        return Err(Refusal::Malformed(format!(
            "hello.held reports {} keys, more than {MAX_HELD}",
            hello.held.len()
        )));
    }
    if let Some(k) = hello.held.iter().find(|k| k.key.len() > MAX_KEY) {
        return Err(bad("a hello.held key", "a namespace/name key", &k.key));
    }
    Ok(())
}

/// An RFC 1123 label, as namespace names are.
fn dns_label(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain, as most object names are.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|part| !part.is_empty() && dns_label(part))
}

/// What a reviewed token says about its holder.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Identity {
    /// The ServiceAccount's namespace.
    pub(crate) namespace: String,
    /// The Pod the token is bound to.
    pub(crate) pod_name: String,
    /// That Pod's UID.
    pub(crate) pod_uid: String,
    /// The user the apiserver authenticated, for access reviews.
    pub(crate) user: UserInfo,
}

/// A grant that was checked: (username, API group, resource, verb).
type Grant = (String, String, String, &'static str);

/// A review's answer: the identity, or why the token was rejected.
type Reviewed = Result<Identity, String>;

/// Reviews runtime tokens, with a cache.
pub(crate) struct Admission {
    client: Client,
    required: bool,
    /// By token: the answer, and until when it is trusted.
    cache: Mutex<HashMap<String, (Reviewed, Instant)>>,
    /// Grants seen allowed, by (username, group, resource, verb), and until
    /// when that is trusted. Denials are asked again each time, so a grant
    /// an admin adds takes effect at the runtime's next attempt.
    allowed: Mutex<HashMap<Grant, Instant>>,
}

// === impl Admission ===

impl Admission {
    /// Checks tokens through `client`; with `required` false (a development
    /// flag), runtimes without a token are let in as whoever they claim.
    pub(crate) fn new(client: Client, required: bool) -> Self {
        Self {
            client,
            required,
            cache: Mutex::default(),
            allowed: Mutex::default(),
        }
    }

    /// Checks that `hello` comes from the Pod it names. Returns who it is,
    /// if a token was checked; the live Pod must have its `pod_uid`.
    pub(crate) async fn authenticate(&self, hello: &Hello) -> Result<Option<Identity>, Refusal> {
        if hello.auth_token.is_empty() {
            if !self.required {
                return Ok(None);
            }
            return Err(Refusal::Unauthenticated(format!(
                "the hello carries no token: mount a projected ServiceAccount token with audience \
                 {AUDIENCE:?} in the runtime and point OPMESH_TOKEN_FILE at it"
            )));
        }
        let id = self
            .review(&hello.auth_token)
            .await?
            .map_err(Refusal::Unauthenticated)?;
        let claimed = format!("{}/{}", hello.pod_namespace, hello.pod_name);
        if id.namespace != hello.pod_namespace || id.pod_name != hello.pod_name {
            return Err(Refusal::PermissionDenied(format!(
                "the token is bound to pod {}/{}, not {claimed}",
                id.namespace, id.pod_name
            )));
        }
        Ok(Some(id))
    }

    /// Checks that `id` may itself list and watch every type in `types`,
    /// in all namespaces, as the runtime will receive them.
    pub(crate) async fn authorize(
        &self,
        id: &Identity,
        types: &[&GroupVersionKind],
    ) -> Result<(), Refusal> {
        let username = id.user.username.clone().unwrap_or_default();
        let mut missing = Vec::new();
        for t in types {
            let mut denied = Vec::new();
            for verb in ["list", "watch"] {
                let cached = (username.clone(), t.group.clone(), t.plural.clone(), verb);
                let now = Instant::now();
                if lock(&self.allowed).get(&cached).is_some_and(|u| *u > now) {
                    continue;
                }
                if self.review_access(&id.user, t, verb).await? {
                    let mut allowed = lock(&self.allowed);
                    allowed.retain(|_, u| *u > now);
                    allowed.insert(cached, now + CACHE_FOR);
                } else {
                    denied.push(verb);
                }
            }
            if !denied.is_empty() {
                let resource = match t.group.as_str() {
                    "" => t.plural.clone(),
                    g => format!("{}.{g}", t.plural),
                };
                missing.push(format!("{} {resource}", denied.join("/")));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(Refusal::PermissionDenied(format!(
            "{username} may not {} in all namespaces, so the mesh will not send it those \
             objects: grant them to the operator's ServiceAccount (a ClusterRole and binding)",
            missing.join(", ")
        )))
    }

    /// Whether the apiserver says `user` may `verb` the type `t` in all
    /// namespaces.
    async fn review_access(
        &self,
        user: &UserInfo,
        t: &GroupVersionKind,
        verb: &str,
    ) -> Result<bool, Refusal> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(t.group.clone()),
                    resource: Some(t.plural.clone()),
                    verb: Some(verb.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviews: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            reviews.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| Refusal::Lookup("the SubjectAccessReview timed out".into()))?
        .map_err(|e| {
            Refusal::Lookup(format!(
                "cannot review the runtime's access ({e}); the manager needs create on \
                 subjectaccessreviews.authorization.k8s.io"
            ))
        })?;
        Ok(reviewed.status.is_some_and(|s| s.allowed))
    }

    /// The identity in `token`, or why the apiserver rejects it.
    async fn review(&self, token: &str) -> Result<Reviewed, Refusal> {
        let now = Instant::now();
        if let Some((answer, until)) = lock(&self.cache).get(token)
            && *until > now
        {
            return Ok(answer.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            reviews.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| Refusal::Lookup("the TokenReview timed out".into()))?
        .map_err(|e| {
            Refusal::Lookup(format!(
                "cannot review the runtime's token ({e}); the manager needs create on \
                 tokenreviews.authentication.k8s.io"
            ))
        })?;
        let answer = identity(reviewed.status.unwrap_or_default());
        let until = now + expires_in(token).unwrap_or(CACHE_FOR).min(CACHE_FOR);
        let mut cache = lock(&self.cache);
        cache.retain(|_, (_, u)| *u > now);
        cache.insert(token.to_string(), (answer.clone(), until));
        Ok(answer)
    }
}

/// The identity a TokenReview's status vouches for.
fn identity(status: k8s_openapi::api::authentication::v1::TokenReviewStatus) -> Reviewed {
    if status.authenticated != Some(true) {
        return Err(format!(
            "the apiserver does not accept the token for audience {AUDIENCE:?}: {}",
            status.error.unwrap_or_else(|| "not authenticated".into())
        ));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(namespace) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split(':').next())
    else {
        return Err(format!(
            "the token belongs to {username:?}, not to a ServiceAccount"
        ));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
        return Err(
            "the token is not bound to a Pod: use a projected ServiceAccount token (or a \
             TokenRequest bound to the pod)"
                .into(),
        );
    };
    Ok(Identity {
        namespace: namespace.to_string(),
        pod_name,
        pod_uid,
        user: UserInfo {
            username: Some(username),
            extra: Some(extra),
            ..user
        },
    })
}

/// How long until the JWT `token` expires, from its `exp` claim (already
/// verified by the apiserver when this is used).
fn expires_in(token: &str) -> Option<Duration> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    fn reviewed(username: &str, pod: Option<(&str, &str)>) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(POD_NAME.to_string(), vec![name.to_string()]);
            extra.insert(POD_UID.to_string(), vec![uid.to_string()]);
        }
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(extra),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_review_names_the_bound_pod_or_says_what_is_wrong() {
        let id = identity(reviewed(
            "system:serviceaccount:ops:op",
            Some(("op-0", "u1")),
        ))
        .unwrap();
        assert_eq!(
            (
                id.namespace.as_str(),
                id.pod_name.as_str(),
                id.pod_uid.as_str()
            ),
            ("ops", "op-0", "u1")
        );
        assert_eq!(
            id.user.username.as_deref(),
            Some("system:serviceaccount:ops:op")
        );
        assert!(
            identity(reviewed("system:serviceaccount:ops:op", None))
                .unwrap_err()
                .contains("not bound to a Pod")
        );
        assert!(
            identity(reviewed("alice", Some(("op-0", "u1"))))
                .unwrap_err()
                .contains("not to a ServiceAccount")
        );
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..Default::default()
        };
        assert!(identity(rejected).unwrap_err().contains("expired"));
    }

    #[test]
    fn hello_names_must_be_kubernetes_names() {
        let ok = Hello {
            mesh_namespace: "ops".into(),
            mesh_name: "mesh.v1".into(),
            pod_namespace: "ops".into(),
            pod_name: "op-0".into(),
            ..Default::default()
        };
        assert!(check_hello(&ok).is_ok());
        for bad in [
            Hello {
                pod_name: "../../secrets".into(),
                ..ok.clone()
            },
            Hello {
                pod_namespace: "Ops".into(),
                ..ok.clone()
            },
            Hello {
                mesh_namespace: "a".repeat(64),
                ..ok.clone()
            },
            Hello {
                pod_name: "-x".into(),
                ..ok.clone()
            },
            Hello {
                mesh_name: String::new(),
                ..ok.clone()
            },
        ] {
            let err = check_hello(&bad).unwrap_err().to_string();
            assert!(err.contains("hello."), "{err}");
        }
    }

    #[test]
    fn the_expiry_comes_from_the_token() {
        use base64::Engine as _;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({"exp": now + 120});
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
        let left = expires_in(&format!("h.{payload}.s")).unwrap();
        assert!(left <= Duration::from_secs(120) && left >= Duration::from_secs(100));
        assert!(expires_in("not-a-jwt").is_none());
    }
}
