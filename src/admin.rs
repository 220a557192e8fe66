//! Admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` (Prometheus text) and `/api/v1/hosts`
//! (the monitord host table as JSON).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::monitord::state::HostTable;

/// Shared state of the admin endpoint.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    hosts: Arc<HostTable>,
    ready: AtomicBool,
}

impl AdminState {
    pub fn new(registry: Registry, hosts: Arc<HostTable>) -> AdminState {
        AdminState {
            inner: Arc::new(Inner {
                registry,
                hosts,
                ready: AtomicBool::new(false),
            }),
        }
    }

    /// Ready once everything is bound and loaded; not ready again while draining.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.inner.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.inner.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn hosts(State(state): State<AdminState>) -> impl IntoResponse {
    axum::Json(state.inner.hosts.to_json())
}

/// Bind the admin endpoint and serve it in the background; returns the bound address.
pub async fn bind(addr: SocketAddr, state: AdminState) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--admin-listen {addr}: cannot bind"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/hosts", get(hosts))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    Ok(local)
}

/// `tm-sidecar healthcheck`: a minimal HTTP/1.0 GET so the image needs no curl.
pub async fn healthcheck(url: &str) -> Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.take(4096).read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), fut)
        .await
        .context("timed out")??;
    let status_line = String::from_utf8_lossy(&response);
    let ok = status_line
        .lines()
        .next()
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{url}: {}",
            status_line.lines().next().unwrap_or("no answer")
        );
        Ok(ExitCode::FAILURE)
    }
}
