//! [`ApiError`]: every error answer is JSON `{"error":{"code","message"}}` with a fitting
//! status, so clients can branch on `code` and show `message`.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use fanout::{BusError, ChannelError, Code};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    /// `Retry-After` (seconds), when the client should come back.
    pub retry_after: Option<u64>,
    /// More for the client to act on, in the error object (`"regions"` of an evacuation).
    pub hint: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            hint: None,
        }
    }

    pub fn invalid_channel(err: ChannelError) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidChannel,
            err.to_string(),
        )
    }

    pub fn invalid_json(err: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidJson,
            format!("the body must be one JSON value: {err}"),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            format!("the body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, Code::NotFound, "no such endpoint")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::MethodNotAllowed,
            "this endpoint does not take that method",
        )
    }
}

impl From<BusError> for ApiError {
    fn from(err: BusError) -> Self {
        tracing::warn!(%err, "publish not acknowledged");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::BusUnavailable,
            err.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("fanout_api_errors_total", "code" => self.code.as_str()).increment(1);
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some((name, hint)) = self.hint {
            body["error"][name] = hint;
        }
        match self.retry_after {
            Some(after) => (
                self.status,
                [(axum::http::header::RETRY_AFTER, after.to_string())],
                Json(body),
            )
                .into_response(),
            None => (self.status, Json(body)).into_response(),
        }
    }
}
