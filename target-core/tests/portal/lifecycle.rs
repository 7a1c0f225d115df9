//! Session lifecycle: logout, reinstatement, live reconfiguration, shutdown (RFC 7143 §6.3.5,
//! §11.9, §11.14, §11.15).

use std::time::Duration;

use iscsi_proto::pdu::{AsyncMessage, Header};

use crate::support::*;

fn async_messages(pdus: &[iscsi_proto::Pdu]) -> Vec<AsyncMessage> {
    pdus.iter()
        .filter_map(|p| match &p.header {
            Header::AsyncMessage(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// RFC 7143 §11.14.1 reason 0 "close the session"; §11.15.1 response 0 "connection or session
/// closed successfully"; the target then closes the connection.
#[tokio::test]
async fn logout_closes_session() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let (itt, logout) = i.logout(0);
    i.send(&logout).await;
    let p = i.recv().await;
    let Header::LogoutResponse(h) = &p.header else {
        panic!("expected a Logout Response, got {p:?}");
    };
    assert_eq!((h.itt, h.response), (itt, 0));
    assert!(i.expect_closed().await.is_empty());
    wait_for(|| t.table.session_count() == 0).await;
}

/// RFC 7143 §6.3.5: a login with the same InitiatorName and ISID and TSIH 0 reinstates the
/// session: the target "MUST ... terminate the old session" (closing its connection).
#[tokio::test]
async fn second_login_with_same_isid_reinstates() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut old = t.login().await;
    let mut new = t.login().await;
    old.expect_closed().await;
    new.clear_ua(0).await;
    assert_eq!(new.exec(0, &tur(), 0).await.status, GOOD);
    wait_for(|| t.table.session_count() == 1).await;
}

/// SPC-4 §6.37 (REPORT LUNS) and SAM-5: when the LUN inventory changes the device server
/// establishes REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh) on every I_T nexus; REPORT LUNS then
/// lists the new LUN.
#[tokio::test]
async fn live_apply_adding_lun_raises_ua() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let report = t.table.apply(&state([target(TARGET, &[0, 2])])).await;
    assert!(report.errors.is_empty());
    let r = i.exec(0, &tur(), 0).await;
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_triplet(), (0x6, 0x3f, 0x0e));
    let luns = i.exec(0, &report_luns(256), 256).await;
    assert_eq!(parse_report_luns(&luns.data), vec![0, 2]);
    assert_eq!(i.exec(0, &tur(), 0).await.status, GOOD);
}

/// RFC 7143 §11.9.1 AsyncEvent 3: "target will drop all the connections of this session" —
/// sent when the ACL no longer admits a logged-in initiator; then the connection closes.
#[tokio::test]
async fn acl_revocation_sends_async_event_3_then_closes() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let mut tc = target(TARGET, &[0]);
    tc.acl.grants[0].initiators = vec!["iqn.2024-01.test:someone-else".into()];
    let report = t.table.apply(&state([tc])).await;
    assert_eq!(report.sessions_ended, 1);
    let got = i.expect_closed().await;
    let am = async_messages(&got);
    assert_eq!(am.len(), 1, "{got:?}");
    assert_eq!(am[0].async_event, 3);
    wait_for(|| t.table.session_count() == 0).await;
}

/// A removed target's sessions end (AsyncEvent 3, RFC 7143 §11.9.1, then close).
#[tokio::test]
async fn removing_target_ends_its_sessions() {
    let t = Target::start(state([
        target(TARGET, &[0]),
        target("iqn.2024-01.test:other", &[0]),
    ]))
    .await;
    let mut i = t.login().await;
    let mut keep = t.login_with(&Login::normal("iqn.2024-01.test:other")).await;
    let report = t
        .table
        .apply(&state([target("iqn.2024-01.test:other", &[0])]))
        .await;
    assert_eq!(report.removed_targets, vec![TARGET.to_owned()]);
    let got = i.expect_closed().await;
    assert_eq!(async_messages(&got).first().map(|a| a.async_event), Some(3));
    keep.clear_ua(0).await;
    assert_eq!(keep.exec(0, &tur(), 0).await.status, GOOD);
}

/// Shutdown (the cancel token): sessions are told (AsyncEvent 3, RFC 7143 §11.9.1), closed,
/// and `serve` returns.
#[tokio::test]
async fn shutdown_ends_sessions_gracefully() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    t.cancel.cancel();
    let got = i.expect_closed().await;
    assert_eq!(async_messages(&got).first().map(|a| a.async_event), Some(3));
    tokio::time::timeout(Duration::from_secs(5), t.serve)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(t.addr).await.is_err());
}

/// Polls `f` for up to five seconds (session teardown is asynchronous).
pub async fn wait_for(f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached");
}

/// A LUN whose size grows in the configuration grows in place (SBC-3 §4.6): the session and
/// its data stay, every I_T nexus gets CAPACITY DATA HAS CHANGED (2Ah/09h), READ CAPACITY
/// reports the new size and the new blocks take writes. A smaller size is refused and
/// reported; the LUN keeps serving at the size it has.
#[tokio::test]
async fn a_grown_lun_is_served_in_place_and_shrinking_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun0.img");
    let with_size = |bytes: u64| {
        let mut t = target(TARGET, &[]);
        t.luns.insert(
            0,
            target_core::config::LunConfig {
                backing: target_core::config::Backing::Path(file.clone()),
                create_size: Some(bytes),
                ..mem_lun(0)
            },
        );
        state([t])
    };
    let t = Target::start(with_size(1 << 20)).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let data = vec![0x5au8; 4096];
    assert_eq!(i.write(0, 0, &data).await.status, GOOD);

    let report = t.table.apply(&with_size(2 << 20)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.resized_luns, vec![(TARGET.to_owned(), 0, 2 << 20)]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 << 20);
    let r = i.exec(0, &tur(), 0).await;
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_triplet(), (0x6, 0x2a, 0x09));
    assert_eq!(i.exec(0, &tur(), 0).await.status, GOOD, "reported once");
    let cap = i.exec(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8).await;
    assert_eq!(cap.status, GOOD);
    assert_eq!(
        u32::from_be_bytes(cap.data[..4].try_into().unwrap()),
        (2 << 20) / 512 - 1
    );
    let back = i.exec(0, &read10(0, 8), 4096).await;
    assert_eq!(back.data, data, "data written before the growth");
    assert_eq!(i.write(0, 3000, &data).await.status, GOOD, "a new block");

    let report = t.table.apply(&with_size(1 << 20)).await;
    let errors = &report.errors[TARGET];
    assert!(
        errors[0].error.to_string().contains("shrinking"),
        "{errors:?}"
    );
    let cap = i.exec(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8).await;
    assert_eq!(
        u32::from_be_bytes(cap.data[..4].try_into().unwrap()),
        (2 << 20) / 512 - 1,
        "still served at the grown size"
    );
}
