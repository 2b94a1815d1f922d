//! The host's HTTP server: how producers and operators reach the embedded
//! broker while the host holds it open.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/publish/{subject}?id=&delay_ms=` | body = payload; `content-type` kept; `wharf-header-<k>: v` become headers. 202 + `{"id"}` once stored durably |
//! | `GET /v1/queues` | depth of every subject and dead-letter queue |
//! | `GET /v1/dlq/{queue}` | dead letters with their headers |
//! | `POST /v1/dlq/{queue}/replay?id=` | move dead letters (all, or one) back to their subject |
//! | `GET /v1/handlers` | every handler: tenant, component file, digest of the component running |
//! | `POST /v1/handlers/{name}/reload` | load the handler's component file again ([`crate::reload`]); 200 with what happened, 422 with the reason it was refused |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once consuming, 503 before and during shutdown |
//! | `GET /metrics` | Prometheus text |
//!
//! It has no authentication: bind it to loopback (the default) or put it
//! behind something that does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::broker::OutboundMessage;
use crate::subject::SubjectPattern;

/// Request headers with this prefix become message headers.
pub const HEADER_PREFIX: &str = "wharf-header-";

#[derive(Clone)]
struct Ctx {
    app: Arc<App>,
    metrics: Option<PrometheusHandle>,
}

/// Serve until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>, stop: CancellationToken) {
    let ctx = Ctx {
        app,
        metrics: crate::telemetry::prometheus(),
    };
    let router = Router::new()
        .route("/v1/publish/{subject}", post(publish))
        .route("/v1/queues", get(queues))
        .route("/v1/dlq/{queue}", get(dlq_list))
        .route("/v1/dlq/{queue}/replay", post(dlq_replay))
        .route("/v1/handlers", get(handlers))
        .route("/v1/handlers/{name}/reload", post(reload))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

#[derive(Deserialize)]
struct PublishQuery {
    id: Option<String>,
    delay_ms: Option<u64>,
}

async fn publish(
    State(ctx): State<Ctx>,
    Path(subject): Path<String>,
    Query(q): Query<PublishQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = SubjectPattern::check_literal(&subject) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    if q.id.as_deref().is_some_and(|id| id.is_empty() || id.len() > 512) {
        return error(StatusCode::BAD_REQUEST, "id must be 1 to 512 bytes");
    }
    let mut message_headers = Vec::new();
    for (name, value) in &headers {
        if let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) {
            match value.to_str() {
                Ok(v) => message_headers.push((key.to_string(), v.to_string())),
                Err(_) => return error(StatusCode::BAD_REQUEST, format!("header {name} is not visible ASCII")),
            }
        }
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let message = OutboundMessage {
        id: q.id,
        subject: subject.clone(),
        payload: body,
        headers: message_headers,
        content_type,
        reply_to: None,
        delay: Duration::from_millis(q.delay_ms.unwrap_or(0)),
    };
    match ctx.app.broker.publish(vec![message]).await {
        Ok(ids) => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": ids.first(), "subject": subject })),
        )
            .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

async fn queues(State(ctx): State<Ctx>) -> Response {
    match ctx.app.broker.stats() {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

async fn dlq_list(State(ctx): State<Ctx>, Path(queue): Path<String>) -> Response {
    match ctx.app.broker.dead_letters(&queue) {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

#[derive(Deserialize)]
struct ReplayQuery {
    id: Option<String>,
}

async fn dlq_replay(State(ctx): State<Ctx>, Path(queue): Path<String>, Query(q): Query<ReplayQuery>) -> Response {
    match ctx.app.broker.replay(&queue, q.id).await {
        Ok(n) => Json(json!({ "replayed": n })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

async fn handlers(State(ctx): State<Ctx>) -> Response {
    let app = &ctx.app;
    let list: Vec<_> = app
        .manifest
        .handlers
        .iter()
        .filter_map(|(name, h)| {
            let binding = app.registry.get(name)?;
            Some(json!({
                "name": name,
                "tenant": h.tenant,
                "component": h.component.display().to_string(),
                "digest": binding.component.load().digest,
            }))
        })
        .collect();
    Json(list).into_response()
}

async fn reload(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    if ctx.app.registry.get(&name).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no handler {name:?}"));
    }
    match crate::reload::reload_logged(&ctx.app, &name).await {
        Ok(crate::reload::Reloaded::Replaced { from, to }) => {
            Json(json!({ "handler": name, "outcome": "replaced", "from": from, "to": to })).into_response()
        }
        Ok(crate::reload::Reloaded::Unchanged { digest }) => {
            Json(json!({ "handler": name, "outcome": "unchanged", "digest": digest })).into_response()
        }
        Err(e) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("handler {name:?} keeps its component: {e:#}"),
        ),
    }
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    if ctx.app.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    match &ctx.metrics {
        Some(handle) => handle.render().into_response(),
        None => error(StatusCode::NOT_FOUND, "metrics are not enabled"),
    }
}
