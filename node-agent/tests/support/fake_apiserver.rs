//! A scripted, in-process Kubernetes API server: enough of the REST protocol for kube-rs
//! clients (reflectors, finalizers, status patches, Events, Leases) over plain HTTP.
//!
//! Generic over resources: any `/api/v1/...` or `/apis/<group>/<version>/...` path is a
//! collection of JSON objects, cluster-scoped or namespaced by the path's shape. Supported:
//! list, watch (`?watch=true`, JSON lines streamed from `resourceVersion`), get, create (POST),
//! replace (PUT), patch (JSON patch, merge patch, strategic merge and apply treated as merge
//! patch) on the object and its `/status`, delete (finalizers respected: a deletion with
//! finalizers only sets `deletionTimestamp`; removing the last one deletes).
//!
//! Every resource is treated as having a status subresource: writes to the object keep its
//! `status`, writes to `/status` change only `status`. `metadata.generation` is bumped when
//! `spec` changes. Not implemented: selectors, pagination, dry run, optimistic concurrency.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

/// A collection: `(apiVersion, plural)`, e.g. `("tgtd.unstable.cloud/v1alpha1", "targets")`.
pub type Collection = (String, String);

#[derive(Debug, Clone)]
struct Logged {
    rv: u64,
    collection: Collection,
    namespace: String,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    /// (collection, namespace or "", name) -> object.
    objects: BTreeMap<(Collection, String, String), Value>,
    log: Vec<Logged>,
    /// Every request, as "METHOD path" (for assertions).
    requests: Vec<String>,
}

/// The running server. Dropping it stops accepting connections.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An API error: status code, reason and message, answered as a `v1.Status`.
#[derive(Debug)]
pub struct ApiError(pub u16, pub &'static str, pub String);

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (changed, _) = watch::channel(0u64);
        let server = Server {
            state: state.clone(),
            changed: changed.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            addr,
            state,
            changed,
            task,
        }
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake\n",
            self.addr
        )
    }

    fn server(&self) -> Server {
        Server {
            state: self.state.clone(),
            changed: self.changed.clone(),
        }
    }

    /// Creates an object as a client would.
    pub fn create(&self, api_version: &str, plural: &str, namespace: &str, object: Value) -> Value {
        self.server()
            .create(&(api_version.into(), plural.into()), namespace, object)
            .unwrap_or_else(|e| panic!("create {plural}: {e:?}"))
    }

    /// Deletes an object as a client would (finalizers respected).
    pub fn delete(&self, api_version: &str, plural: &str, namespace: &str, name: &str) {
        self.server()
            .delete(&(api_version.into(), plural.into()), namespace, name)
            .unwrap_or_else(|e| panic!("delete {plural}/{name}: {e:?}"));
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&(
                (api_version.into(), plural.into()),
                namespace.to_owned(),
                name.to_owned(),
            ))
            .cloned()
    }

    /// Every stored object of a collection in `namespace` ("" for cluster-scoped ones).
    pub fn list(&self, api_version: &str, plural: &str, namespace: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        let collection: Collection = (api_version.into(), plural.into());
        state
            .objects
            .iter()
            .filter(|((c, ns, _), _)| *c == collection && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The requests served so far, as "METHOD path".
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

/// A parsed request path.
struct Target {
    collection: Collection,
    namespace: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (plural, None, None),
        [plural, name] => (plural, Some(name.to_string()), None),
        [plural, name, sub] => (plural, Some(name.to_string()), Some(*sub)),
        _ => return None,
    };
    Some(Target {
        collection: (api_version, plural.to_string()),
        namespace,
        name,
        status: sub == Some("status"),
    })
}

fn kind_of(plural: &str) -> String {
    match plural {
        "targets" => "Target".into(),
        "initiatorgroups" => "InitiatorGroup".into(),
        "initiatorgroupbindings" => "InitiatorGroupBinding".into(),
        "secrets" => "Secret".into(),
        "events" => "Event".into(),
        "leases" => "Lease".into(),
        "nodes" => "Node".into(),
        other => {
            let singular = other.trim_end_matches('s');
            let mut c = singular.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
}

fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(value).unwrap_or_default())).boxed(),
    );
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status_response(e: &ApiError) -> Response<Body> {
    json_response(
        e.0,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": e.2, "reason": e.1, "code": e.0}),
    )
}

impl Server {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let content_type = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.state
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {path}"));
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let Some(t) = parse_path(&path) else {
            return status_response(&ApiError(404, "NotFound", format!("no route {path}")));
        };
        let parse = || -> Result<Value, ApiError> {
            serde_json::from_slice(&body)
                .or_else(|_| serde_yaml_from(&body))
                .map_err(|e| ApiError(400, "BadRequest", e))
        };
        let result = match (&method, &t.name) {
            (&Method::GET, None)
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
            {
                let from = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return self.watch(t.collection, t.namespace, from);
            }
            (&Method::GET, None) => Ok((200, self.list(&t.collection, &t.namespace))),
            (&Method::GET, Some(name)) => self
                .get(&t.collection, &t.namespace, name)
                .map(|v| (200, v)),
            (&Method::POST, None) => parse()
                .and_then(|obj| self.create(&t.collection, &t.namespace, obj))
                .map(|v| (201, v)),
            (&Method::PUT, Some(name)) => parse()
                .and_then(|obj| self.update(&t, name, |_| Ok(obj)))
                .map(|v| (200, v)),
            (&Method::PATCH, Some(name)) => {
                let patch = parse();
                patch
                    .and_then(|patch| {
                        self.update(&t, name, |current| {
                            apply_patch(current, &patch, &content_type)
                        })
                    })
                    .map(|v| (200, v))
            }
            (&Method::DELETE, Some(name)) => self
                .delete(&t.collection, &t.namespace, name)
                .map(|v| (200, v)),
            _ => Err(ApiError(
                405,
                "MethodNotAllowed",
                format!("{method} {path}"),
            )),
        };
        match result {
            Ok((code, v)) => json_response(code, &v),
            Err(e) => status_response(&e),
        }
    }

    fn list(&self, collection: &Collection, namespace: &str) -> Value {
        let state = self.state.lock().unwrap();
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((c, ns, _), _)| c == collection && (namespace.is_empty() || ns == namespace))
            .map(|(_, v)| v.clone())
            .collect();
        json!({
            "apiVersion": collection.0,
            "kind": format!("{}List", kind_of(&collection.1)),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        })
    }

    fn get(&self, collection: &Collection, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&(collection.clone(), namespace.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| {
                ApiError(
                    404,
                    "NotFound",
                    format!("{} {name:?} not found", collection.1),
                )
            })
    }

    fn record(
        &self,
        state: &mut State,
        collection: &Collection,
        namespace: &str,
        type_: &'static str,
        object: Value,
    ) {
        state.log.push(Logged {
            rv: state.rv,
            collection: collection.clone(),
            namespace: namespace.to_owned(),
            type_,
            object,
        });
        let _ = self.changed.send(state.rv);
    }

    fn create(
        &self,
        collection: &Collection,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let mut state = self.state.lock().unwrap();
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError(400, "BadRequest", "no metadata".into()))?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) => n.to_owned(),
            None => {
                let prefix = meta
                    .get("generateName")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError(400, "BadRequest", "no name".into()))?;
                format!("{prefix}{}", state.uid + 1)
            }
        };
        let key = (collection.clone(), namespace.to_owned(), name.clone());
        if state.objects.contains_key(&key) {
            return Err(ApiError(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", collection.1),
            ));
        }
        state.rv += 1;
        state.uid += 1;
        meta.insert("name".into(), json!(name));
        if !namespace.is_empty() {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("uid".into(), json!(format!("uid-{}", state.uid)));
        meta.insert("resourceVersion".into(), json!(state.rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        let obj_map = obj.as_object_mut().expect("checked above");
        obj_map.insert("apiVersion".into(), json!(collection.0));
        obj_map.insert("kind".into(), json!(kind_of(&collection.1)));
        state.objects.insert(key, obj.clone());
        self.record(&mut state, collection, namespace, "ADDED", obj.clone());
        Ok(obj)
    }

    /// Read-modify-write of one object (or its status), then deletion if it was deleting and
    /// lost its last finalizer.
    fn update(
        &self,
        t: &Target,
        name: &str,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut state = self.state.lock().unwrap();
        let key = (t.collection.clone(), t.namespace.clone(), name.to_owned());
        let current = state.objects.get(&key).cloned().ok_or_else(|| {
            ApiError(
                404,
                "NotFound",
                format!("{} {name:?} not found", t.collection.1),
            )
        })?;
        let changed = change(&current)?;
        let mut next = current.clone();
        if t.status {
            match changed.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(m) = next.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else {
            next = changed;
            // Immutable or server-owned fields; the status subresource owns status.
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "name",
                "namespace",
            ] {
                match current["metadata"].get(f) {
                    Some(v) => next["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            match current.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(m) = next.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            if next.get("spec") != current.get("spec") {
                let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                next["metadata"]["generation"] = json!(g + 1);
            }
        }
        if next == current {
            return Ok(current);
        }
        state.rv += 1;
        next["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let deleting = next["metadata"].get("deletionTimestamp").is_some();
        let finalizers = next["metadata"]["finalizers"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        if deleting && finalizers == 0 {
            state.objects.remove(&key);
            self.record(
                &mut state,
                &t.collection,
                &t.namespace,
                "DELETED",
                next.clone(),
            );
        } else {
            state.objects.insert(key, next.clone());
            self.record(
                &mut state,
                &t.collection,
                &t.namespace,
                "MODIFIED",
                next.clone(),
            );
        }
        Ok(next)
    }

    fn delete(
        &self,
        collection: &Collection,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut state = self.state.lock().unwrap();
        let key = (collection.clone(), namespace.to_owned(), name.to_owned());
        let mut obj = state.objects.get(&key).cloned().ok_or_else(|| {
            ApiError(
                404,
                "NotFound",
                format!("{} {name:?} not found", collection.1),
            )
        })?;
        state.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if has_finalizers {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                obj["metadata"]["generation"] = json!(g + 1);
            }
            state.objects.insert(key, obj.clone());
            self.record(&mut state, collection, namespace, "MODIFIED", obj.clone());
        } else {
            state.objects.remove(&key);
            self.record(&mut state, collection, namespace, "DELETED", obj.clone());
        }
        Ok(obj)
    }

    /// Streams the events after `from`, then new ones as they happen.
    fn watch(&self, collection: Collection, namespace: String, from: u64) -> Response<Body> {
        let state = self.state.clone();
        let rx = self.changed.subscribe();
        let stream = futures::stream::unfold((rx, from), move |(mut rx, mut seen)| {
            let state = state.clone();
            let collection = collection.clone();
            let namespace = namespace.clone();
            async move {
                loop {
                    let lines: Vec<u8> = {
                        let st = state.lock().unwrap();
                        let mut out = Vec::new();
                        for e in st.log.iter().filter(|e| e.rv > seen) {
                            if e.collection == collection
                                && (namespace.is_empty() || e.namespace == namespace)
                            {
                                out.extend(
                                    serde_json::to_vec(
                                        &json!({"type": e.type_, "object": e.object}),
                                    )
                                    .unwrap_or_default(),
                                );
                                out.push(b'\n');
                            }
                        }
                        seen = st.rv;
                        out
                    };
                    if !lines.is_empty() {
                        return Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(lines))),
                            (rx, seen),
                        ));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

fn serde_yaml_from(body: &[u8]) -> Result<Value, String> {
    // kube-rs sends server-side apply bodies as JSON; YAML is not needed beyond that.
    Err(format!(
        "body is not JSON: {}",
        String::from_utf8_lossy(&body[..body.len().min(80)])
    ))
}

fn apply_patch(current: &Value, patch: &Value, content_type: &str) -> Result<Value, ApiError> {
    let mut doc = current.clone();
    if content_type.starts_with("application/json-patch+json") {
        let mut p: json_patch::Patch = serde_json::from_value(patch.clone())
            .map_err(|e| ApiError(400, "BadRequest", e.to_string()))?;
        // As the API server (evanphx/json-patch): testing a missing member against null passes.
        p.0.retain(|op| match op {
            json_patch::PatchOperation::Test(t) if t.value.is_null() => {
                !current.pointer(t.path.as_str()).is_none_or(Value::is_null)
            }
            _ => true,
        });
        json_patch::patch(&mut doc, &p).map_err(|e| ApiError(422, "Invalid", e.to_string()))?;
    } else {
        // merge-patch+json, strategic-merge-patch+json, apply-patch+yaml: merge semantics.
        json_patch::merge(&mut doc, patch);
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/apis/tgtd.unstable.cloud/v1alpha1/targets/t1/status").unwrap();
        assert_eq!(t.collection.1, "targets");
        assert_eq!(t.name.as_deref(), Some("t1"));
        assert!(t.status);
        let s = parse_path("/api/v1/namespaces/default/secrets").unwrap();
        assert_eq!(
            (s.collection.0.as_str(), s.namespace.as_str()),
            ("v1", "default")
        );
        assert!(s.name.is_none());
        assert!(now().ends_with('Z'));
    }
}
