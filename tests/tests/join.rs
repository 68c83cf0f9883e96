//! Growing a cluster with `raftblkd --join`: a node started with only an id, a peer
//! address and a member's API address becomes a full member that every node knows,
//! holds copies, serves NBD, and still knows every peer after a restart without
//! `--join` (as do the old members, whose `--peers` never named it). Also the
//! refusals and errors an operator may hit.

use std::process::Command;
use std::time::Duration;

use raftblk_tests::{
    binaries, free_port, http_get, http_post_json, poll, qemu_io, require_tools, run_cmd, Cluster, Daemon,
};

const LIMIT: Duration = Duration::from_secs(30);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

#[track_caller]
fn wait_peers(c: &Cluster, id: u64) {
    let want = c.expected_peers(id);
    poll(&format!("node {id} to list peers {want:?}"), LIMIT, || {
        let got = c.try_peers(id)?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

#[track_caller]
fn qemu_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    assert!(out.success() && !out.stdout.contains("verification failed"), "{out}");
}

#[test]
fn joined_node_is_a_full_member_that_everyone_remembers() {
    if !require_tools("join", &["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start(2);
    // A volume from before the join, with a copy on node 1 and node 2.
    let before_uuid = c.create_volume(1, "before", "16M", 1);
    c.wait_leader("before", &[1, 2], LIMIT);
    qemu_ok(&c.nbd_uri(1, "before"), &["write -P 0x5a 0 1M", "flush"]);

    let id = c.add_joining_node(1);
    assert_eq!(id, 3);
    // Node 1 accepted the join; node 2 heard of node 3 from node 1 (its --peers names
    // only node 1); node 3 got both from node 1's answer.
    for n in [1, 2, 3] {
        wait_peers(&c, n);
    }
    assert!(c.node(3).data_dir().join("cluster.json").exists(), "node 3 did not persist its members");

    // The new node gets a replica of the catalog (a learner, then a voter: the catalog had
    // two voters and wants up to five) and learns the volume records from it.
    poll("node 3 to vote in the catalog", LIMIT, || {
        let (code, body) =
            raftblk_tests::http_get(c.node(3).api_addr, "/v1/catalog").map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {code}: {e}"))?;
        let voters: Vec<u64> =
            v["voters"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        if voters == [1, 2, 3] && v["applied_index"] == v["commit_index"] {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    });
    poll("node 3 to list volume \"before\"", LIMIT, || c.try_status(3, "before").map(|_| ()));

    // A volume created through node 3 with three copies: placement starts at node 3,
    // so it needs node 3 to know both peers and both peers to reach node 3.
    c.create_volume(3, "joined", "16M", 2);
    let v = c.cli_json(3, &["volume", "inspect", "joined"]);
    let mut voters: Vec<u64> =
        v["voters"].as_array().expect("voters").iter().filter_map(|x| x.as_u64()).collect();
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3], "{v}");
    c.wait_leader("joined", &[1, 2, 3], LIMIT);
    qemu_ok(&c.nbd_uri(3, "joined"), &["write -P 0xa1 0 1M", "write -P 0xa2 4M 64k", "flush"]);
    qemu_ok(&c.nbd_uri(1, "joined"), &["read -P 0xa1 0 1M", "read -P 0xa2 4M 64k"]);

    // A copy of the old volume on the new node, checked on node 3's disk.
    c.cli(1, &["volume", "add-replica", "before", "3"]).ok();
    let leader = c.wait_leader("before", &[1, 2, 3], LIMIT);
    let commit = c.settled_commit("before", leader);
    c.wait_applied("before", 3, commit, CATCH_UP_LIMIT);
    let image = std::fs::read(c.node(3).image_path(&before_uuid)).expect("node 3's copy of \"before\"");
    assert!(
        image.len() >= 1 << 20 && image[..1 << 20].iter().all(|&b| b == 0x5a),
        "node 3's copy lacks the data"
    );
    qemu_ok(&c.nbd_uri(3, "before"), &["read -P 0x5a 0 1M"]);

    // Node 3 restarts without --join and still knows both peers, from cluster.json.
    c.sigterm(3, LIMIT);
    c.restart(3);
    assert_eq!(c.try_peers(3).expect("node 3 peers"), c.expected_peers(3));
    c.wait_leader("joined", &[1, 2, 3], LIMIT);
    qemu_ok(&c.nbd_uri(3, "joined"), &["read -P 0xa1 0 1M", "write -P 0xa3 8M 64k", "flush"]);

    // Node 2 restarts with its old --peers (node 1 only) and still knows node 3.
    c.sigterm(2, LIMIT);
    c.restart(2);
    assert_eq!(c.try_peers(2).expect("node 2 peers"), c.expected_peers(2));
    c.wait_leader("joined", &[1, 2, 3], LIMIT);
    qemu_ok(&c.nbd_uri(2, "joined"), &["read -P 0xa1 0 1M", "read -P 0xa3 8M 64k"]);
}

fn join(c: &Cluster, via: u64, body: &str) -> (u16, String) {
    http_post_json(c.node(via).api_addr, "/v1/cluster/join", body).expect("POST /v1/cluster/join")
}

#[test]
fn rejoins_are_idempotent_moves_update_and_collisions_are_refused() {
    let c = Cluster::start(2);
    let (n1, n2) = (c.node(1).peer_addr, c.node(2).peer_addr);

    // Node 2 joining again at its own address changes nothing.
    let (code, body) = join(&c, 1, &format!(r#"{{"node_id": 2, "peer_addr": "{n2}"}}"#));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let members: Vec<String> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| format!("{}@{}", m["id"], m["peer_addr"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(members, vec![format!("1@{n1}"), format!("2@{n2}")], "{body}");
    assert!(v["cluster_id"].as_u64().is_some(), "{body}");
    assert_eq!(c.try_peers(1).expect("peers"), c.expected_peers(1));

    // Node 2 is alive at its address: another node claiming id 2 elsewhere is refused.
    let (code, body) = join(&c, 1, r#"{"node_id": 2, "peer_addr": "127.0.0.1:9"}"#);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("live member"), "{body}");
    // The answering node's own id, and another member's address.
    let (code, body) = join(&c, 1, r#"{"node_id": 1, "peer_addr": "127.0.0.1:9"}"#);
    assert_eq!(code, 409, "{body}");
    let (code, body) = join(&c, 1, &format!(r#"{{"node_id": 7, "peer_addr": "{n2}"}}"#));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("belongs to node 2"), "{body}");
    // Bad input.
    let (code, body) = join(&c, 1, r#"{"node_id": 0, "peer_addr": "127.0.0.1:9"}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = join(&c, 1, r#"{"node_id": 5}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("peer_addr"), "{body}");
    assert_eq!(c.try_peers(1).expect("peers"), c.expected_peers(1), "a refused join changed the members");

    // A node whose old address is silent (nothing listens there) moves to its new one,
    // on the answering node and on the other member.
    let (old, new) = (free_port(), free_port());
    let (code, body) = join(&c, 1, &format!(r#"{{"node_id": 9, "peer_addr": "127.0.0.1:{old}"}}"#));
    assert_eq!(code, 200, "{body}");
    let (code, body) = join(&c, 1, &format!(r#"{{"node_id": 9, "peer_addr": "127.0.0.1:{new}"}}"#));
    assert_eq!(code, 200, "{body}");
    for id in [1, 2] {
        poll(&format!("node {id} to know node 9 at port {new}"), LIMIT, || {
            let peers = c.try_peers(id)?;
            if peers.contains(&format!("9@127.0.0.1:{new}"))
                && !peers.iter().any(|p| p.ends_with(&format!(":{old}")))
            {
                Ok(())
            } else {
                Err(format!("{peers:?}"))
            }
        });
    }
}

/// Runs raftblkd with `args` (plus a scratch data dir and free ports) and expects it to
/// exit with an error within `limit`; returns what it printed.
fn raftblkd_fails(args: &[String], limit: Duration) -> String {
    let (daemon, _) = binaries();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(daemon);
    for (k, _) in std::env::vars() {
        if k.starts_with("RAFTBLK_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg(format!("--nbd-listen=127.0.0.1:{}", free_port()))
        .arg(format!("--api-listen=127.0.0.1:{}", free_port()))
        .arg("--nbd-socket")
        .arg(dir.path().join("nbd.sock"))
        .args(["--bootstrap-volumes", "none"])
        .args(args);
    let out = run_cmd(cmd, limit);
    assert!(!out.success(), "raftblkd should have failed: {out}");
    format!("{}{}", out.stdout, out.stderr)
}

#[test]
fn join_errors_say_what_to_check() {
    let peer = || format!("--peer-listen=127.0.0.1:{}", free_port());

    // No node id: refused before anything starts.
    let e = raftblkd_fails(&["--join=127.0.0.1:10810".into(), peer()], LIMIT);
    assert!(e.contains("--node-id"), "{e}");
    // A join address without a port.
    let e = raftblkd_fails(&["--join=127.0.0.1".into(), "--node-id=4".into(), peer()], LIMIT);
    assert!(e.contains("cluster.join") && e.contains("no port"), "{e}");

    // Nothing listens there: retried for the timeout, then a message saying what to check.
    let closed = format!("--join=127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let e = raftblkd_fails(&[closed, "--node-id=4".into(), peer(), "--join-timeout-ms=1500".into()], LIMIT);
    assert!(e.contains("no answer within") && e.contains("api.listen"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(1000), "gave up without retrying: {e}");

    // A node that runs alone has no cluster to join: refused at once, with the reason.
    let alone = Daemon::start();
    let (code, body) = http_get(alone.api_addr, "/v1/node").expect("GET /v1/node");
    assert_eq!(code, 200, "{body}");
    let e = raftblkd_fails(&[format!("--join={}", alone.api_addr), "--node-id=4".into(), peer()], LIMIT);
    assert!(e.contains("refused the join") && e.contains("runs alone"), "{e}");
}
