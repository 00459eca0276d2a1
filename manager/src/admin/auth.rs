//! Who is calling the admin API, and whether Kubernetes RBAC lets them.
//!
//! A caller presents the bearer token of their kubeconfig. The manager asks
//! the apiserver who that is (TokenReview, with the apiserver's own
//! audiences), then whether that user may do what the call does to the
//! `OperatorMesh` it names (SubjectAccessReview): `get` (or `list`) to read,
//! `patch` to act. So the API grants exactly what a user's RBAC on
//! `operatormeshes.opmesh.io` grants, and nothing is configured in opmesh.

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

/// How long a token's review is trusted.
const CACHE_FOR: Duration = Duration::from_secs(30);
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The most tokens remembered.
const CACHE_MAX: usize = 1024;

/// Why a call is refused: the HTTP status and a message that says what to
/// fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denied {
    /// 401: no token, or one the apiserver does not accept.
    Unauthenticated(String),
    /// 403: RBAC does not allow it.
    Forbidden(String),
    /// 503: the apiserver could not be asked.
    Unavailable(String),
}

/// What the call does to an `OperatorMesh`, for the access review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access<'a> {
    /// The Kubernetes verb: `get`, `list` or `patch`.
    pub(crate) verb: &'static str,
    /// The mesh's namespace; `None` for all namespaces.
    pub(crate) namespace: Option<&'a str>,
    /// The mesh's name, for `get` and `patch`.
    pub(crate) name: Option<&'a str>,
    /// A subresource, e.g. `drain`.
    pub(crate) subresource: Option<&'static str>,
}

/// Reviews callers' tokens (cached briefly) and their access.
pub(crate) struct Auth {
    client: Client,
    cache: Mutex<HashMap<String, (UserInfo, Instant)>>,
}

// === impl Auth ===

impl Auth {
    /// Reviews through `client`.
    pub(crate) fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
        }
    }

    /// The user whose token is in the `Authorization` header value.
    pub(crate) async fn authenticate(&self, header: Option<&str>) -> Result<UserInfo, Denied> {
        let Some(token) = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Err(Denied::Unauthenticated(
                "no bearer token: call with the token of your kubeconfig (kubectl opmesh does), \
                 as 'Authorization: Bearer <token>'"
                    .into(),
            ));
        };
        let now = Instant::now();
        if let Some((user, until)) = lock(&self.cache).get(token)
            && *until > now
        {
            return Ok(user.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| Denied::Unavailable("the TokenReview timed out".into()))?
        .map_err(|e| {
            Denied::Unavailable(format!(
                "cannot review the token ({e}); the manager needs create on \
                 tokenreviews.authentication.k8s.io"
            ))
        })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Denied::Unauthenticated(format!(
                "the apiserver does not accept the token: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let mut cache = lock(&self.cache);
        cache.retain(|_, (_, until)| *until > now);
        if cache.len() < CACHE_MAX {
            cache.insert(token.to_string(), (user.clone(), now + CACHE_FOR));
        }
        Ok(user)
    }

    /// Fails unless RBAC lets `user` do `access` to `operatormeshes`.
    pub(crate) async fn authorize(
        &self,
        user: &UserInfo,
        access: Access<'_>,
    ) -> Result<(), Denied> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("opmesh.io".into()),
                    resource: Some("operatormeshes".into()),
                    verb: Some(access.verb.into()),
                    namespace: access.namespace.map(Into::into),
                    name: access.name.map(Into::into),
                    subresource: access.subresource.map(Into::into),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            Api::<SubjectAccessReview>::all(self.client.clone())
                .create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| Denied::Unavailable("the SubjectAccessReview timed out".into()))?
        .map_err(|e| {
            Denied::Unavailable(format!(
                "cannot review access ({e}); the manager needs create on \
                 subjectaccessreviews.authorization.k8s.io"
            ))
        })?;
        if reviewed.status.as_ref().is_some_and(|s| s.allowed) {
            return Ok(());
        }
        let resource = match access.subresource {
            Some(sub) => format!("operatormeshes/{sub}"),
            None => "operatormeshes".into(),
        };
        let scope = match (access.namespace, access.name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            (Some(ns), None) => format!("in namespace {ns}"),
            _ => "in all namespaces".into(),
        };
        Err(Denied::Forbidden(format!(
            "{} may not {} {resource}.opmesh.io {scope}",
            user.username.as_deref().unwrap_or("the caller"),
            access.verb,
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
