//! Login and discovery (RFC 7143 §6.3, §11.13, §12.1.3, Appendix C).

use bytes::Bytes;
use iscsi_proto::pdu::Header;
use iscsi_proto::types::Ttt;
use target_core::config::{Acl, AddressRule, ChapConfig};

use crate::support::*;

/// RFC 7143 §6.3: "The Login Phase ... is complete when the target ... sends a Login Response
/// with the T bit set to 1 and NSG set to FullFeaturePhase"; §11.13.3: "For a new session, the
/// target MUST generate a non-zero TSIH and ONLY return it in the Login Final-Response".
#[tokio::test]
async fn login_without_authentication() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let i = t.login().await;
    let r = i.login_response.clone().unwrap();
    assert_eq!((r.status_class, r.status_detail), (0, 0));
    assert!(r.transit);
    assert_ne!(r.tsih.0, 0, "new session gets a non-zero TSIH");
    assert_eq!(i.param("TargetPortalGroupTag"), Some("1"));
}

fn chap_target() -> target_core::config::TargetConfig {
    let mut tc = target(TARGET, &[0]);
    tc.chap = ChapConfig {
        incoming: vec![chap_account("alice", b"0123456789abcdef")],
        outgoing: None,
    };
    tc
}

/// RFC 7143 §12.1.3: with CHAP the target answers CHAP_A with CHAP_A/CHAP_I/CHAP_C and
/// verifies CHAP_N/CHAP_R; "If the initiator authentication fails, the target MUST answer with
/// a Login reject with "Authentication Failure" status."
#[tokio::test]
async fn chap_required_good_secret_logs_in() {
    let t = Target::start(state([chap_target()])).await;
    let mut i = t.connect().await;
    i.login(&Login::normal(TARGET).chap("alice", b"0123456789abcdef"))
        .await
        .expect("CHAP login");
    assert_eq!(i.exec(0, &inquiry(36), 36).await.status, GOOD);
}

/// RFC 7143 §11.13.5: status 0x0201 "Authentication failure" for a wrong CHAP response.
#[tokio::test]
async fn chap_bad_secret_is_0201() {
    let t = Target::start(state([chap_target()])).await;
    let mut i = t.connect().await;
    let r = i
        .login(&Login::normal(TARGET).chap("alice", b"not-the-right-secret"))
        .await;
    assert_eq!(r, Err(LoginRefused(2, 1)));
    i.expect_closed().await;
}

/// RFC 7143 §11.13.5: a target that requires CHAP refuses AuthMethod=None with 0x0201.
#[tokio::test]
async fn chap_required_but_none_offered_is_0201() {
    let t = Target::start(state([chap_target()])).await;
    let mut i = t.connect().await;
    assert_eq!(
        i.login(&Login::normal(TARGET)).await,
        Err(LoginRefused(2, 1))
    );
}

/// RFC 7143 §11.13.5: 0x0203 "Not found": "The requested iSCSI Target Name ... does not
/// exist at this address."
#[tokio::test]
async fn unknown_target_is_0203() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.connect().await;
    let r = i.login(&Login::normal("iqn.2024-01.test:nope")).await;
    assert_eq!(r, Err(LoginRefused(2, 3)));
    i.expect_closed().await;
}

/// RFC 7143 §11.13.5: 0x0202 "Authorization failure": "The initiator is not allowed access to
/// the given target."
#[tokio::test]
async fn acl_refusal_is_0202() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.connect().await;
    let r = i
        .login(&Login::normal(TARGET).initiator("iqn.2024-01.test:stranger"))
        .await;
    assert_eq!(r, Err(LoginRefused(2, 2)));
    i.expect_closed().await;
}

/// Sends SendTargets=All on a discovery session and returns the whole (reassembled) answer.
async fn send_targets(i: &mut Initiator) -> (Vec<(String, String)>, usize, usize) {
    let itt = i.itt();
    let req = i.text_request(itt, Ttt::RESERVED, Bytes::from_static(b"SendTargets=All\0"));
    i.send(&req).await;
    let mut all = Vec::new();
    let mut pdus = 0;
    let mut longest = 0;
    loop {
        let p = i.recv().await;
        let Header::TextResponse(h) = &p.header else {
            panic!("expected a Text Response, got {p:?}");
        };
        pdus += 1;
        longest = longest.max(p.data.len());
        assert_eq!(h.itt, itt);
        all.extend_from_slice(&p.data);
        if h.final_ {
            assert!(!h.continue_);
            assert_eq!(
                h.ttt,
                Ttt::RESERVED,
                "final response carries TTT 0xffffffff"
            );
            break;
        }
        // RFC 7143 §11.11.1: "A Text Response with the C bit set to 1 MUST have the F bit set
        // to 0"; the continuation is asked for with an empty Text Request carrying the TTT.
        assert!(h.continue_);
        assert_ne!(h.ttt, Ttt::RESERVED);
        let more = i.text_request(itt, h.ttt, Bytes::new());
        i.send(&more).await;
    }
    (pairs(&all), pdus, longest)
}

/// RFC 7143 Appendix C: SendTargets=All reports "all of the targets ... to which the initiator
/// has access", each TargetAddress as "domainname[:port][,portal-group-tag]".
#[tokio::test]
async fn discovery_lists_only_admitted_targets_with_arrival_portal() {
    let mut hidden = target("iqn.2024-01.test:hidden", &[0]);
    hidden.acl = Acl::single(
        vec!["iqn.2024-01.test:someone-else".into()],
        vec![AddressRule::All],
    );
    let t = Target::start(state([
        target(TARGET, &[0]),
        target("iqn.2024-01.test:second", &[0]),
        hidden,
    ]))
    .await;
    let mut i = t.login_with(&Login::discovery()).await;
    // RFC 7143 §11.13.3: a new session, discovery too, gets a non-zero TSIH.
    assert_ne!(i.login_response.as_ref().unwrap().tsih.0, 0);
    let (pairs, _, _) = send_targets(&mut i).await;
    let addr = format!("127.0.0.1:{},1", t.addr.port());
    assert_eq!(
        pairs,
        vec![
            ("TargetName".to_owned(), TARGET.to_owned()),
            ("TargetAddress".to_owned(), addr.clone()),
            (
                "TargetName".to_owned(),
                "iqn.2024-01.test:second".to_owned()
            ),
            ("TargetAddress".to_owned(), addr),
        ]
    );
}

/// RFC 7143 §11.10.2/§11.11: a long text response is split with the C bit; the target hands
/// out a Target Transfer Tag and the initiator asks for each continuation with it.
#[tokio::test]
async fn long_send_targets_is_split_with_continuation() {
    let targets: Vec<_> = (0..100)
        .map(|n| {
            target(
                &format!("iqn.2024-01.test:a-rather-long-target-name-{n:04}"),
                &[0],
            )
        })
        .collect();
    let t = Target::start(state(targets)).await;
    let mut i = t
        .login_with(&Login::discovery().key("MaxRecvDataSegmentLength", "512"))
        .await;
    let (pairs, pdus, longest) = send_targets(&mut i).await;
    assert!(pdus > 1, "answer of 100 targets fits 512 bytes?");
    // RFC 7143 §13.12: no data segment beyond the initiator's MaxRecvDataSegmentLength.
    assert!(longest <= 512, "segment of {longest} bytes");
    let names: Vec<_> = pairs.iter().filter(|(k, _)| k == "TargetName").collect();
    assert_eq!(names.len(), 100);
    assert!(pairs
        .iter()
        .filter(|(k, _)| k == "TargetAddress")
        .all(|(_, v)| v == &format!("127.0.0.1:{},1", t.addr.port())));
    // The session goes on after the exchange.
    let (itt, nop) = i.nop_out(Bytes::from_static(b"ok"));
    i.send(&nop).await;
    assert_eq!(i.recv().await.header.itt(), itt);
}

/// RFC 7143 §12 / §13.3: with discovery CHAP configured, a discovery session authenticates
/// like a normal one: the right secret discovers, a wrong one or none is 0201; normal
/// sessions of a target without CHAP are not affected.
#[tokio::test]
async fn discovery_chap_is_required_when_configured() {
    let mut desired = state([target(TARGET, &[0])]);
    desired.discovery_chap = Some(ChapConfig {
        incoming: vec![chap_account("finder", b"discovery-secret-1")],
        outgoing: None,
    });
    let t = Target::start(desired).await;
    let mut i = t.connect().await;
    i.login(&Login::discovery().chap("finder", b"discovery-secret-1"))
        .await
        .expect("discovery with the right secret");
    let (pairs, _, _) = send_targets(&mut i).await;
    assert_eq!(value(&pairs, "TargetName"), Some(TARGET));
    for l in [
        Login::discovery().chap("finder", b"the-wrong-secret!!"),
        Login::discovery().chap("someone", b"discovery-secret-1"),
        Login::discovery(),
    ] {
        let mut i = t.connect().await;
        assert_eq!(i.login(&l).await, Err(LoginRefused(2, 1)));
    }
    let mut i = t.connect().await;
    i.login(&Login::normal(TARGET))
        .await
        .expect("normal login without CHAP");
}

/// A discovery secret that is configured but yields no account (for example a Secret that
/// could not be read) fails closed: nobody discovers.
#[tokio::test]
async fn discovery_chap_without_accounts_refuses_everyone() {
    let mut desired = state([target(TARGET, &[0])]);
    desired.discovery_chap = Some(ChapConfig::default());
    let t = Target::start(desired).await;
    for l in [
        Login::discovery(),
        Login::discovery().chap("x", b"0123456789abcdef"),
    ] {
        let mut i = t.connect().await;
        assert_eq!(i.login(&l).await, Err(LoginRefused(2, 1)));
    }
}
