//! ReadWriteOnce across a real three-node cluster (what CSI ControllerPublish does, through
//! `raftblk volume publish`): a volume published read-write to node 1 is refused to node 2;
//! once node 1 is killed and declared dead (5 s here) node 2 takes it over at once with a
//! newer generation, which every node's record shows (the fence that refuses node 1's
//! late writes); an operator can force a takeover from a live holder; read-only
//! publications are shared and keep writers out.

use std::time::Duration;

use raftblk_tests::{poll, Cluster};

const LIMIT: Duration = Duration::from_secs(120);

fn publish(c: &Cluster, via: u64, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut a = vec!["--json", "volume", "publish", "rwo"];
    a.extend_from_slice(args);
    let out = c.cli(via, &a);
    if out.success() {
        Ok(out.json())
    } else {
        Err(out.stderr)
    }
}

fn fence_seen_by(c: &Cluster, id: u64) -> Result<(u64, Vec<u64>), String> {
    let v = c.try_status(id, "rwo")?;
    let nodes =
        v["publications"].as_array().into_iter().flatten().filter_map(|p| p["node"].as_u64()).collect();
    // The fence itself is in the record; the newest publication's generation equals it.
    let newest =
        v["publications"].as_array().into_iter().flatten().filter_map(|p| p["generation"].as_u64()).max();
    Ok((newest.unwrap_or(0), nodes))
}

#[test]
fn a_read_write_volume_moves_to_another_node_only_when_its_holder_is_dead_or_forced_out() {
    let mut c = Cluster::start_with(3, &["--node-dead-after-s", "5"]);
    c.create_volume(1, "rwo", "16M", 2);

    let first = publish(&c, 1, &["--node", "1"]).expect("publish to node 1");
    assert_eq!(first["generation"], 1, "{first}");
    let again = publish(&c, 2, &["--node", "1"]).expect("the same publish again, through another node");
    assert_eq!(again["generation"], 1, "a repeat is idempotent: {again}");
    let refused = publish(&c, 3, &["--node", "2"]).expect_err("node 2 while node 1 holds it");
    assert!(refused.contains("published read-write to node 1"), "{refused}");
    let refused = publish(&c, 3, &["--node", "2", "--read-only"]).expect_err("a reader while node 1 writes");
    assert!(refused.contains("node 1"), "{refused}");

    c.kill9(1);
    poll("node 1 to be declared dead and node 2 to take the volume over", LIMIT, || {
        publish(&c, 2, &["--node", "2"]).map(drop)
    });
    let (generation, holders) = fence_seen_by(&c, 3).expect("status on node 3");
    assert_eq!(
        (generation, holders),
        (2, vec![2]),
        "node 1's publication is gone and the fence moved past it"
    );

    // Node 1 comes back: its record catches up with the fence (so its old attachment's
    // writes are refused there), and it cannot take the volume back while node 2 lives.
    c.restart(1);
    poll("node 1 to learn the new fence", LIMIT, || match fence_seen_by(&c, 1) {
        Ok((2, h)) if h == vec![2] => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let refused = publish(&c, 1, &["--node", "1"]).expect_err("node 2 is alive");
    assert!(refused.contains("node 2"), "{refused}");

    // An operator's forced takeover from a live holder.
    let forced = publish(&c, 1, &["--node", "3", "--force"]).expect("forced takeover");
    assert_eq!(forced["generation"], 3, "{forced}");

    // Readers share; a writer waits for them.
    c.cli(2, &["volume", "unpublish", "rwo", "--node", "3"]).ok();
    c.cli(2, &["volume", "unpublish", "rwo", "--node", "3"]).ok();
    for node in ["1", "2"] {
        publish(&c, 3, &["--node", node, "--read-only"]).expect("reader");
    }
    let refused = publish(&c, 3, &["--node", "3"]).expect_err("a writer while readers hold it");
    assert!(refused.contains("read-only"), "{refused}");
}
