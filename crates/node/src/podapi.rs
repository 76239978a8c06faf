//! The kubelet API's pod endpoints besides logs and port-forward: `/pods` (this node's pods, as
//! the kubelet's `/pods` lists them) and the answers to `/exec`, `/attach` and `/run`, which a
//! WebAssembly pod cannot serve (no shell, processes or TTY).
//!
//! The refusals are `metav1.Status` bodies: the API server hands a non-101 answer to a
//! streaming upgrade back to the client as it is, and client-go's SPDY and WebSocket executors
//! both decode a Status body and show its `message` (`error: ...` or
//! `Error from server (BadRequest): ...`), so `kubectl exec` fails at once with the reason
//! instead of hanging or showing a 404 page.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A `metav1.Status` failure.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn find(pods: &crate::pods::Context, ns: &str, name: &str) -> Option<Arc<Pod>> {
    pods.store.get().and_then(|s| {
        s.state().into_iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
        })
    })
}

/// `GET /pods`: a v1 PodList of the pods bound to this node, from the node's pod store (no API
/// call), sorted by namespace and name.
pub fn list(pods: &crate::pods::Context) -> Response<Body> {
    let mut items: Vec<Arc<Pod>> = pods.store.get().map(|s| s.state()).unwrap_or_default();
    items.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let items: Vec<serde_json::Value> = items
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p.as_ref()).unwrap_or_default();
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Pod");
            v
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}),
    )
}

/// Which streaming endpoint was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    Exec,
    Attach,
    Run,
}

/// `/exec/...`, `/attach/...` or `/run/...` for `ns/name`: refused at once with the reason.
pub fn refuse(
    pods: &crate::pods::Context,
    node: &str,
    what: Streaming,
    ns: &str,
    name: &str,
) -> Response<Body> {
    if find(pods, ns, name).is_none() {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pod {ns}/{name} does not exist on node {node}"),
        );
    }
    let message = match what {
        Streaming::Exec | Streaming::Run => format!(
            "pod {ns}/{name} is a WebAssembly pod (node {node} runs it with wasinode): it has no \
             shell, no processes and no TTY, so a command cannot be executed in it; use \
             \"kubectl logs\" for its output and \"kubectl port-forward\" to reach its ports"
        ),
        Streaming::Attach => format!(
            "pod {ns}/{name} is a WebAssembly pod (node {node} runs it with wasinode): it has no \
             TTY and no stdin to attach to; use \"kubectl logs -f\" to follow its output"
        ),
    };
    status(StatusCode::BAD_REQUEST, "BadRequest", &message)
}
