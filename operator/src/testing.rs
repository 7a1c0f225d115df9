//! A scripted API server for reconciler tests (STYLE §8): the code under test talks to a
//! `kube::Client` over a `tower_test` mock; the test takes each request in order, asserts on
//! it and answers.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::Value;

/// The test's end of the mock API server.
pub struct ApiServer {
    handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
}

/// A request as the API server saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Seen {
    /// Answers with `status` and JSON `body`.
    pub fn reply(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("JSON")))
            .expect("response");
        self.respond.send_response(response);
    }

    /// Answers 200 with `body`.
    pub fn ok(self, body: &Value) {
        self.reply(StatusCode::OK, body);
    }

    /// Answers with a `Status` failure of `code` and `reason`.
    pub fn fail(self, code: u16, reason: &str) {
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": reason, "reason": reason, "code": code,
        });
        self.reply(StatusCode::from_u16(code).expect("status code"), &body);
    }

    /// Answers with the request body itself (create and replace echo the object).
    pub fn echo(self) {
        let body = self.body.clone();
        self.ok(&body);
    }
}

/// A client wired to a scripted API server.
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

impl ApiServer {
    /// The next request; panics when none comes within a (generous) second.
    pub async fn next(&mut self) -> Seen {
        let (request, respond) =
            tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
                .await
                .expect("timed out waiting for an API request")
                .expect("the client went away without a request");
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON request body")
        };
        Seen {
            method,
            uri,
            body,
            respond,
        }
    }

    /// The next request, which must be `method` on a path starting with `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Seen {
        let seen = self.next().await;
        assert_eq!(
            seen.method, method,
            "unexpected request {} {}",
            seen.method, seen.uri
        );
        assert!(
            seen.uri.starts_with(path),
            "expected {method} {path}..., got {} {}",
            seen.method,
            seen.uri
        );
        seen
    }

    /// Asserts that no request is pending or comes within a short while.
    pub async fn expect_silence(&mut self) {
        let next =
            tokio::time::timeout(Duration::from_millis(100), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}
