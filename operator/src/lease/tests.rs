use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::*;
use crate::testing::{mock_client, ApiServer};

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ktgt-system/leases/ktgt-operator";

fn lock(client: kube::Client, identity: &str) -> LeaseLock {
    LeaseLock::new(
        Api::namespaced(client, "ktgt-system"),
        "ktgt-operator",
        identity,
        LeaseConfig::default(),
    )
}

fn lease(holder: Option<&str>, renew: &str, transitions: i32, rv: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "ktgt-operator", "namespace": "ktgt-system", "resourceVersion": rv},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2024-01-01T00:00:00.000000Z",
            "renewTime": renew,
            "leaseTransitions": transitions,
        }
    })
}

async fn expect_get(server: &mut ApiServer, answer: Value) {
    server.expect(Method::GET, PATH).await.ok(&answer);
}

#[tokio::test]
async fn creates_a_missing_lease_and_leads() {
    let (client, mut server) = mock_client();
    let mut lock = lock(client, "pod-a");
    let round = tokio::spawn(async move { (lock.try_acquire_or_renew().await, lock) });
    server.expect(Method::GET, PATH).await.fail(404, "NotFound");
    let create = server
        .expect(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/ktgt-system/leases?",
        )
        .await;
    assert_eq!(create.body["metadata"]["name"], "ktgt-operator");
    assert_eq!(create.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(create.body["spec"]["leaseTransitions"], 0);
    create.reply(
        StatusCode::CREATED,
        &lease(Some("pod-a"), "2024-01-01T00:00:00Z", 0, "1"),
    );
    let (state, _) = round.await.unwrap();
    assert_eq!(state.unwrap(), LeaseState::Leading);
}

#[tokio::test]
async fn losing_the_create_race_follows() {
    let (client, mut server) = mock_client();
    let mut lock = lock(client, "pod-a");
    let round = tokio::spawn(async move { lock.try_acquire_or_renew().await });
    server.expect(Method::GET, PATH).await.fail(404, "NotFound");
    server
        .expect(Method::POST, "/apis/coordination.k8s.io")
        .await
        .fail(409, "AlreadyExists");
    assert_eq!(round.await.unwrap().unwrap(), LeaseState::Following(None));
}

#[tokio::test]
async fn renews_its_own_lease_with_the_resource_version_it_read() {
    let (client, mut server) = mock_client();
    let mut lock = lock(client, "pod-a");
    let round = tokio::spawn(async move { lock.try_acquire_or_renew().await });
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:05Z", 3, "42"),
    )
    .await;
    let put = server.expect(Method::PUT, PATH).await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "42");
    assert_eq!(put.body["spec"]["holderIdentity"], "pod-a");
    // Renewal keeps acquireTime and the transition count, and moves renewTime.
    assert_eq!(put.body["spec"]["leaseTransitions"], 3);
    assert_eq!(
        put.body["spec"]["acquireTime"],
        "2024-01-01T00:00:00.000000Z"
    );
    assert_ne!(put.body["spec"]["renewTime"], "2024-01-01T00:00:05Z");
    put.echo();
    assert_eq!(round.await.unwrap().unwrap(), LeaseState::Leading);
}

#[tokio::test(start_paused = true)]
async fn follows_a_live_holder_and_takes_over_only_after_it_stops_renewing() {
    let (client, mut server) = mock_client();
    let lock = lock(client, "pod-b");
    let (rounds_tx, mut rounds_rx) = tokio::sync::mpsc::channel(1);
    let (go_tx, mut go_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let mut lock = lock;
        while go_rx.recv().await.is_some() {
            rounds_tx
                .send(lock.try_acquire_or_renew().await)
                .await
                .unwrap();
        }
    });

    // Round 1: pod-a holds it; first sighting of this record.
    go_tx.send(()).await.unwrap();
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:01Z", 0, "5"),
    )
    .await;
    assert_eq!(
        rounds_rx.recv().await.unwrap().unwrap(),
        LeaseState::Following(Some("pod-a".into()))
    );

    // 10 s later pod-a has renewed: a new record, observed afresh. No write.
    tokio::time::advance(Duration::from_secs(10)).await;
    go_tx.send(()).await.unwrap();
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:11Z", 0, "6"),
    )
    .await;
    assert_eq!(
        rounds_rx.recv().await.unwrap().unwrap(),
        LeaseState::Following(Some("pod-a".into()))
    );

    // 10 s more without renewal: 10 s < 15 s since that record appeared, still follow.
    tokio::time::advance(Duration::from_secs(10)).await;
    go_tx.send(()).await.unwrap();
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:11Z", 0, "6"),
    )
    .await;
    assert_eq!(
        rounds_rx.recv().await.unwrap().unwrap(),
        LeaseState::Following(Some("pod-a".into()))
    );
    server.expect_silence().await;

    // 6 s more: expired. Take over with a resourceVersion-checked replace.
    tokio::time::advance(Duration::from_secs(6)).await;
    go_tx.send(()).await.unwrap();
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:11Z", 0, "6"),
    )
    .await;
    let put = server.expect(Method::PUT, PATH).await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "6");
    assert_eq!(put.body["spec"]["holderIdentity"], "pod-b");
    assert_eq!(put.body["spec"]["leaseTransitions"], 1);
    put.echo();
    assert_eq!(
        rounds_rx.recv().await.unwrap().unwrap(),
        LeaseState::Leading
    );
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_a_conflict_means_following() {
    let (client, mut server) = mock_client();
    let mut lock = lock(client, "pod-b");
    let round = tokio::spawn(async move { lock.try_acquire_or_renew().await });
    // Released: no holder. Another replica wins the write.
    expect_get(&mut server, lease(None, "2024-01-01T00:00:11Z", 1, "7")).await;
    let put = server.expect(Method::PUT, PATH).await;
    assert_eq!(put.body["spec"]["holderIdentity"], "pod-b");
    assert_eq!(put.body["spec"]["leaseTransitions"], 2);
    put.fail(409, "Conflict");
    assert_eq!(round.await.unwrap().unwrap(), LeaseState::Following(None));
}

#[tokio::test]
async fn release_clears_the_holder_only_when_it_is_us() {
    let (client, mut server) = mock_client();
    let mut mine = lock(client.clone(), "pod-a");
    let task = tokio::spawn(async move { mine.release().await });
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:11Z", 1, "8"),
    )
    .await;
    let put = server.expect(Method::PUT, PATH).await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "8");
    assert!(put.body["spec"].get("holderIdentity").is_none());
    assert_eq!(put.body["spec"]["leaseDurationSeconds"], 1);
    put.echo();
    task.await.unwrap().unwrap();

    let mut other = lock(client, "pod-b");
    let task = tokio::spawn(async move { other.release().await });
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:11Z", 1, "8"),
    )
    .await;
    task.await.unwrap().unwrap();
    server.expect_silence().await;
}

#[tokio::test]
async fn api_errors_are_reported_with_a_label() {
    let (client, mut server) = mock_client();
    let mut lock = lock(client, "pod-a");
    let round = tokio::spawn(async move { lock.try_acquire_or_renew().await });
    server
        .expect(Method::GET, PATH)
        .await
        .fail(403, "Forbidden");
    let err = round.await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "LeaseGet");
}

#[tokio::test(start_paused = true)]
async fn run_leader_cancels_work_when_renewal_fails_past_the_deadline() {
    let (client, mut server) = mock_client();
    let lock = lock(client, "pod-a");
    let shutdown = CancellationToken::new();
    let leader = tokio::spawn(run_leader(lock, shutdown.clone(), |_| {}));
    server.expect(Method::GET, PATH).await.fail(404, "NotFound");
    server
        .expect(Method::POST, "/apis/coordination.k8s.io")
        .await
        .echo();
    let (lost, renewer) = leader.await.unwrap().expect("leads");
    assert!(!lost.is_cancelled());

    // Every renewal fails with a server error; after the 10 s deadline the work stops.
    for _ in 0..4 {
        server
            .expect(Method::GET, PATH)
            .await
            .fail(500, "InternalError");
    }
    renewer.await.unwrap();
    assert!(lost.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn run_leader_releases_on_shutdown() {
    let (client, mut server) = mock_client();
    let lock = lock(client, "pod-a");
    let shutdown = CancellationToken::new();
    let leader = tokio::spawn(run_leader(lock, shutdown.clone(), |_| {}));
    server.expect(Method::GET, PATH).await.fail(404, "NotFound");
    server
        .expect(Method::POST, "/apis/coordination.k8s.io")
        .await
        .echo();
    let (lost, renewer) = leader.await.unwrap().expect("leads");
    shutdown.cancel();
    expect_get(
        &mut server,
        lease(Some("pod-a"), "2024-01-01T00:00:11Z", 0, "9"),
    )
    .await;
    let put = server.expect(Method::PUT, PATH).await;
    assert!(put.body["spec"].get("holderIdentity").is_none());
    put.echo();
    renewer.await.unwrap();
    assert!(!lost.is_cancelled());
}
