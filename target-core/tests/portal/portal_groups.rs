//! Several portal groups: SendTargets lists every portal with its tag, a login reports the tag
//! of the portal it came through, the session identifier includes the tag, and each session
//! sees its own SCSI target port (two paths to one LU).

use bytes::Bytes;
use iscsi_proto::pdu::Header;
use iscsi_proto::types::Ttt;
use target_core::portal::NetworkPortal;

use crate::support::*;

/// Portal group 1 on 127.0.0.1 and portal group 2 on 127.0.0.2 (both loopback).
async fn two_groups() -> Target {
    let portals = [
        "127.0.0.1:0".parse::<NetworkPortal>().unwrap(),
        "127.0.0.2:0,2".parse::<NetworkPortal>().unwrap(),
    ];
    Target::start_portals(state([target(TARGET, &[0])]), options(), None, &portals).await
}

async fn send_targets(i: &mut Initiator) -> Vec<(String, String)> {
    let itt = i.itt();
    let req = i.text_request(itt, Ttt::RESERVED, Bytes::from_static(b"SendTargets=All\0"));
    i.send(&req).await;
    let p = i.recv().await;
    let Header::TextResponse(h) = &p.header else {
        panic!("expected a Text Response, got {p:?}");
    };
    assert!(h.final_);
    pairs(&p.data)
}

/// RFC 7143 §13.8 / Appendix C: "TargetAddress=domainname[:port][,portal-group-tag]" for
/// each portal through which the target is reached; the portal asked comes first.
#[tokio::test]
async fn send_targets_lists_every_portal_with_its_tag() {
    let t = two_groups().await;
    let (p1, p2) = (t.portals[0].addr, t.portals[1].addr);
    for (via, first, second) in [
        (p1, format!("{p1},1"), format!("{p2},2")),
        (p2, format!("{p2},2"), format!("{p1},1")),
    ] {
        let mut i = Initiator::connect(via).await;
        i.login(&Login::discovery()).await.expect("discovery login");
        assert_eq!(
            send_targets(&mut i).await,
            [
                ("TargetName".to_owned(), TARGET.to_owned()),
                ("TargetAddress".to_owned(), first),
                ("TargetAddress".to_owned(), second),
            ]
        );
    }
}

/// RFC 7143 §13.9: the target returns TargetPortalGroupTag "in the first Login Response"
/// of a normal session: the tag of the portal the connection came through.
#[tokio::test]
async fn login_reports_the_tag_of_its_portal() {
    let t = two_groups().await;
    for (portal, tag) in [(t.portals[0], "1"), (t.portals[1], "2")] {
        let mut i = Initiator::connect(portal.addr).await;
        i.login(&Login::normal(TARGET)).await.expect("login");
        assert_eq!(i.param("TargetPortalGroupTag"), Some(tag));
    }
}

/// RFC 7143 §4.4.3: the session identifier is the ISID with the TPGT, so the same ISID
/// through another portal group is a second session (multipath), while through the same
/// group it reinstates the first (§6.3.5).
#[tokio::test]
async fn the_same_isid_through_two_groups_is_two_sessions() {
    let t = two_groups().await;
    let mut a = Initiator::connect(t.portals[0].addr).await;
    a.login(&Login::normal(TARGET)).await.unwrap();
    let mut b = Initiator::connect(t.portals[1].addr).await;
    b.login(&Login::normal(TARGET)).await.unwrap();
    let sessions = t.table.target(TARGET).unwrap().sessions();
    let mut tags: Vec<u16> = sessions.iter().map(|s| s.tpgt).collect();
    tags.sort_unstable();
    assert_eq!(tags, [1, 2]);
    // Both paths serve commands.
    a.clear_ua(0).await;
    b.clear_ua(0).await;
    assert_eq!(a.exec(0, &tur(), 0).await.status, 0);
    assert_eq!(b.exec(0, &tur(), 0).await.status, 0);
    // A re-login through group 2 with the same ISID replaces the group 2 session only.
    let mut c = Initiator::connect(t.portals[1].addr).await;
    c.login(&Login::normal(TARGET)).await.unwrap();
    b.expect_closed().await;
    let sessions = t.table.target(TARGET).unwrap().sessions();
    assert_eq!(sessions.len(), 2);
    assert_eq!(a.exec(0, &tur(), 0).await.status, 0);
}

/// Each path's VPD page 83h names its own relative target port and target port group (the
/// TPGT), and REPORT TARGET PORT GROUPS lists both groups active/optimized.
#[tokio::test]
async fn each_path_is_its_own_target_port() {
    let t = two_groups().await;
    for (portal, tag) in [(t.portals[0], 1u8), (t.portals[1], 2)] {
        let mut i = Initiator::connect(portal.addr).await;
        i.login(&Login::normal(TARGET)).await.unwrap();
        i.clear_ua(0).await;
        let o = i.exec(0, &[0x12, 1, 0x83, 0x01, 0, 0], 256).await;
        assert_eq!(o.status, 0);
        let page = &o.data;
        let mut d = &page[4..];
        let mut found = Vec::new();
        while d.len() >= 4 {
            let len = usize::from(d[3]);
            if (d[1] >> 4) & 3 == 1 && matches!(d[1] & 0x0F, 4 | 5) {
                found.push((d[1] & 0x0F, d[4..4 + len].to_vec()));
            }
            d = &d[4 + len..];
        }
        assert_eq!(found, [(4, vec![0, 0, 0, tag]), (5, vec![0, 0, 0, tag])]);
        let o = i
            .exec(0, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256)
            .await;
        assert_eq!(o.status, 0);
        let groups: Vec<(u8, u8, u8)> = o.data[4..]
            .chunks(12)
            .map(|g| (g[0] & 0x0F, g[3], g[11]))
            .collect();
        assert_eq!(groups, [(0, 1, 1), (0, 2, 2)]);
    }
}

#[test]
fn portal_text_is_address_then_tag() {
    let p: NetworkPortal = "127.0.0.1:3260".parse().unwrap();
    assert_eq!(p.tpgt, 1);
    let p: NetworkPortal = "[::1]:3261,7".parse().unwrap();
    assert_eq!((p.addr.port(), p.tpgt), (3261, 7));
    assert_eq!(p.to_string(), "[::1]:3261,7");
    for bad in [
        "127.0.0.1",
        "127.0.0.1:3260,",
        "127.0.0.1:3260,x",
        "127.0.0.1:3260,70000",
    ] {
        assert!(bad.parse::<NetworkPortal>().is_err(), "{bad}");
    }
    let e = "127.0.0.1:3260,0".parse::<NetworkPortal>().unwrap_err();
    assert!(e.to_string().contains("SPC-4"), "{e}");
    let twice = [
        "127.0.0.1:3260,1".parse().unwrap(),
        "127.0.0.1:3260,2".parse().unwrap(),
    ];
    let e = target_core::portal::check_portals(&twice).unwrap_err();
    assert_eq!(
        e.to_string(),
        "127.0.0.1:3260 is given twice (as 127.0.0.1:3260,1 and 127.0.0.1:3260,2)"
    );
}
