//! The HTTP client of the CLI commands: base URL and bearer token resolution, JSON
//! requests, and API errors decoded into [`ClientError::Api`] (code, message, status).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{ErrorBody, ErrorDetail};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{} (HTTP {}): {}", .0.code, .0.status, .0.message)]
    Api(ErrorDetail),
    /// The daemon could not be reached.
    #[error("cannot reach the symbiont daemon at {url}: {message} (is `symbiont up` running? set --url or SYMBIONT_URL)")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// Anything else (an unexpected answer).
    #[error("{0}")]
    Other(String),
}

/// The default file `token create --save` writes and the client reads.
pub fn default_token_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("symbiont").join("token"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".config")
            .join("symbiont")
            .join("token")
    })
}

/// Reads a token file (first non-empty line).
pub fn read_token_file(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the token file {}", path.display())),
    }
}

/// The daemon's URL for a listen address (`0.0.0.0` and `[::]` mean loopback here).
pub fn url_for_listen(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            format!("http://127.0.0.1:{}", addr.port())
        }
        Ok(addr) => format!("http://{addr}"),
        Err(_) => format!("http://{listen}"),
    }
}

/// A client of one daemon.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the daemon at `base` (`http://127.0.0.1:7420`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut builder = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        builder
    }

    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response = builder.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => Err(ClientError::Api(body.error)),
            Err(_) => Err(ClientError::Other(format!(
                "the daemon answered HTTP {status}: {}",
                text.trim()
            ))),
        }
    }

    async fn json<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, ClientError> {
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Other(format!("reading the answer: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Other(format!("unexpected answer from the daemon: {e}")))
    }

    /// `GET path` → JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        Self::json(response).await
    }

    /// `GET path` → text.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        response
            .text()
            .await
            .map_err(|e| ClientError::Other(format!("reading the answer: {e}")))
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let response = self
            .send(self.request(reqwest::Method::POST, path).json(body))
            .await?;
        Self::json(response).await
    }

    /// `POST path` without a body → JSON.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(self.request(reqwest::Method::POST, path)).await?;
        Self::json(response).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::DELETE, path))
            .await?;
        Ok(())
    }
}

/// An error with its causes (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
