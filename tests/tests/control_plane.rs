//! The cluster control plane (issue 3/3) on five real `raftblkd` processes: placement and
//! its refusals, a dead node's copies replaced on the others (and its stale copies dropped
//! when it returns), a node drained while fio writes. Nodes are declared dead after 5 s
//! here (`--node-dead-after-s 5`; the default is 60 s). Also: leaders spread over the
//! copy holders, and a create whose node (or the catalog leader) is killed mid-way leaves
//! the volume once or not at all (the client's retry through another node gets it back or
//! makes it). The catalog's own votes follow the nodes: a dead node loses its vote and gets
//! it back when it returns.

use std::time::{Duration, Instant};

use raftblk_tests::pattern::{assert_patterns_read, pat, sha_of_file, write_patterns, Pat};
use raftblk_tests::{poll, require_tools, run, Cluster, MIB};

const FIVE: [u64; 5] = [1, 2, 3, 4, 5];
const LIMIT: Duration = Duration::from_secs(120);
const DEAD_AFTER: [&str; 2] = ["--node-dead-after-s", "5"];

fn voters(c: &Cluster, via: u64, name: &str) -> Result<Vec<u64>, String> {
    let v = c.try_status(via, name)?;
    Ok(v["voters"].as_array().ok_or("no voters")?.iter().filter_map(|x| x.as_u64()).collect())
}

fn health(c: &Cluster, via: u64, name: &str) -> Result<String, String> {
    Ok(c.try_status(via, name)?["health"].as_str().unwrap_or("").to_string())
}

/// Waits until every node answers `/v1/nodes` with all five alive.
fn wait_all_alive(c: &Cluster, among: &[u64]) {
    poll("every node to see every other alive", LIMIT, || {
        for &id in among {
            let v = c.cli_json(id, &["node", "list"]);
            let alive = v.as_array().map_or(0, |a| a.iter().filter(|n| n["liveness"] == "alive").count());
            if alive < among.len() {
                return Err(format!("node {id} sees {alive} alive: {v}"));
            }
        }
        Ok(())
    });
}

#[test]
fn a_placement_spreads_and_impossible_requests_say_why() {
    let c = Cluster::start_with(5, &["--node-dead-after-s", "5", "--label", "rack=r1"]);
    wait_all_alive(&c, &FIVE);
    let list = c.cli_json(2, &["node", "list"]);
    let racks: Vec<&str> = list
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["report"]["labels"]["rack"].as_str())
        .collect();
    assert_eq!(racks, ["r1"; 5], "labels did not travel with the heartbeats: {list}");
    // Five copies fit five nodes; more copies than that are out of range anyway.
    c.create_volume(1, "wide", "16M", 4);
    assert_eq!(voters(&c, 1, "wide").unwrap().len(), 5);
    let out = c.cli(1, &["volume", "create", "toowide", "--size", "16M", "--replicas", "5"]);
    assert!(!out.success() && out.stderr.contains("use 0 to 4"), "replicas=5 was not refused clearly: {out}");
    // Cordoned nodes take no new copies, and the refusal names them.
    c.cli(2, &["node", "cordon", "4"]).ok();
    c.cli(2, &["node", "cordon", "5"]).ok();
    poll("the cordons to reach node 1", LIMIT, || {
        let v = c.cli_json(1, &["node", "list"]);
        let cordoned = v.as_array().map_or(0, |a| a.iter().filter(|n| n["admin"] == "cordoned").count());
        if cordoned == 2 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let out = c.cli(1, &["volume", "create", "four", "--size", "16M", "--replicas", "3"]);
    assert!(!out.success(), "4 copies on 3 uncordoned nodes was accepted: {out}");
    assert!(
        out.stderr.contains("4 distinct nodes") && out.stderr.contains("cordoned"),
        "the refusal does not say why: {out}"
    );
    c.create_volume(1, "three", "16M", 2);
    let placed = voters(&c, 1, "three").unwrap();
    assert!(placed.iter().all(|n| [1, 2, 3].contains(n)), "a copy went to a cordoned node: {placed:?}");
    c.cli(1, &["node", "uncordon", "4"]).ok();
    c.cli(1, &["node", "uncordon", "5"]).ok();
    let shown = c.cli(3, &["status"]);
    assert!(shown.ok().contains("healthy") && shown.ok().contains("NODE"), "status: {shown}");
    println!("MEASURED placement: {placed:?} for replicas=2 with nodes 4 and 5 cordoned\n{}", shown.stdout);
}

#[test]
fn h_cluster_settings_and_node_registrations_live_in_the_catalog() {
    let mut c = Cluster::start_with(3, &["--node-dead-after-s", "60", "--zone", "z9"]);
    wait_all_alive(&c, &[1, 2, 3]);
    // A setting made through one node is in force on every node.
    let out = c.cli(2, &["cluster", "set", "node_dead_after_s", "7"]);
    assert!(out.success(), "{out}");
    poll("node 3 to use the new dead timeout", LIMIT, || {
        let v = c.cli_json(3, &["cluster", "settings"]);
        let dead = v.as_array().and_then(|a| a.iter().find(|s| s["key"] == "node_dead_after_s")).cloned();
        match dead {
            Some(d) if d["value"] == 7 && d["source"] == "cluster" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    for (args, says) in [
        (vec!["cluster", "set", "node_dead_after_s", "2"], "5 to 86400"),
        (vec!["cluster", "set", "dead_after", "9"], "node_dead_after_s"),
        (vec!["cluster", "set", "leader_follows_client", "maybe"], "true or false"),
    ] {
        let out = c.cli(1, &args);
        assert!(!out.success() && out.stderr.contains(says), "{args:?} was not refused clearly: {out}");
    }
    // Registrations: node 1, restarted while node 3 is down, has never heard from node 3,
    // yet knows its zone from the catalog.
    c.kill9(3);
    c.sigterm(1, LIMIT);
    c.restart(1);
    poll("node 1 to show node 3's registered zone", LIMIT, || {
        let list = c.cli_json(1, &["node", "list"]);
        let three =
            list.as_array().and_then(|a| a.iter().find(|n| n["id"] == 3)).cloned().ok_or("no node 3")?;
        if three["report"]["zone"] == "z9" && three["last_heard_ms"].is_null() {
            Ok(())
        } else {
            Err(format!("{three}"))
        }
    });
}

#[test]
fn b_a_dead_nodes_copies_are_replaced_and_its_stale_copies_dropped_on_return() {
    if !require_tools("self-healing", &["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_with(5, &DEAD_AFTER);
    wait_all_alive(&c, &FIVE);
    let names = ["h1", "h2", "h3"];
    let mut pats: Vec<(String, Vec<Pat>)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        c.create_volume(1 + i as u64, name, "32M", 2);
        let p = vec![pat(0x30 + i as u8, 0, MIB), pat(0x40 + i as u8, 20 * MIB, 64 * 1024)];
        let leader = c.wait_leader(name, &voters(&c, 1, name).unwrap(), LIMIT);
        write_patterns(&c.nbd_uri(leader, name), &p);
        pats.push((name.to_string(), p));
    }
    // The node holding the most copies goes.
    let holders: Vec<Vec<u64>> = names.iter().map(|n| voters(&c, 1, n).unwrap()).collect();
    let victim =
        *FIVE.iter().max_by_key(|id| holders.iter().filter(|h| h.contains(id)).count()).expect("a node");
    let affected = holders.iter().filter(|h| h.contains(&victim)).count();
    assert!(affected >= 2, "no node holds copies of several volumes: {holders:?}");
    let survivor = *FIVE.iter().find(|&&id| id != victim).expect("survivor");
    let t = Instant::now();
    c.kill9(victim);
    poll("a degraded volume to be reported", LIMIT, || {
        let states: Vec<String> = names.iter().map(|n| health(&c, survivor, n).unwrap_or_default()).collect();
        if states.iter().any(|s| s == "degraded") {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    });
    let degraded_after = t.elapsed();
    poll("every volume back to three copies without the dead node", LIMIT, || {
        for name in names {
            let v = voters(&c, survivor, name)?;
            let h = health(&c, survivor, name)?;
            if v.contains(&victim) || v.len() != 3 || h != "healthy" {
                return Err(format!("{name}: copies on {v:?}, {h}"));
            }
        }
        Ok(())
    });
    let healed_after = t.elapsed();
    // The catalog drops the dead node's vote too (four voters of the four live nodes).
    poll("the catalog to drop the dead node's vote", LIMIT, || {
        let v = catalog_view(&c, survivor)?;
        let voters: Vec<u64> =
            v["voters"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        if voters.contains(&victim) || voters.len() != 4 {
            return Err(format!("catalog: {v}"));
        }
        Ok(())
    });
    for (name, p) in &pats {
        let v = voters(&c, survivor, name).unwrap();
        let leader = c.wait_leader(name, &v, LIMIT);
        assert_patterns_read(&c.nbd_uri(leader, name), p);
        let commit = c.settled_commit(name, leader);
        let uuid = c.try_status(survivor, name).unwrap()["uuid"].as_str().unwrap().to_string();
        for &id in &v {
            c.wait_applied(name, id, commit, LIMIT);
        }
        // Applied is checkpointed to the file every 5 s; read the copies through NBD instead.
        let digests: Vec<String> = v
            .iter()
            .map(|&id| {
                let image = c.node(id).image_path(&uuid);
                assert!(image.exists(), "node {id} has no copy of {name}");
                sha_of_file(&image)
            })
            .collect();
        println!("{name}: copies on {v:?}, sha256 {digests:?}");
    }
    println!(
        "MEASURED self-healing: node {victim} (copies of {affected} volumes) killed; degraded shown after {degraded_after:?}, \
         every volume back to 3 copies after {healed_after:?} (dead timeout 5 s)"
    );
    // The dead node returns: its copies were replaced, so it must drop them and serve the
    // current data (through the leaders), never its stale copies.
    let stale: Vec<String> = names
        .iter()
        .filter(|n| holders[names.iter().position(|x| x == *n).unwrap_or(0)].contains(&victim))
        .map(|n| c.try_status(survivor, n).unwrap()["uuid"].as_str().unwrap().to_string())
        .collect();
    c.restart(victim);
    for (name, p) in &pats {
        assert_patterns_read(&c.nbd_uri(victim, name), p);
    }
    poll("the returned node to drop its replaced copies", LIMIT, || {
        let left: Vec<&String> = stale.iter().filter(|u| c.node(victim).image_path(u).exists()).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still there: {left:?}"))
        }
    });
    // And it gets a catalog vote back, its replica having caught up.
    poll("the returned node to vote in the catalog again", LIMIT, || {
        let v = catalog_view(&c, victim)?;
        let voters: Vec<u64> =
            v["voters"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        if voters.len() == 5 && v["applied_index"] == v["commit_index"] {
            Ok(())
        } else {
            Err(format!("catalog: {v}"))
        }
    });
}

/// `GET /v1/catalog` on node `via`.
fn catalog_view(c: &Cluster, via: u64) -> Result<serde_json::Value, String> {
    let (code, body) =
        raftblk_tests::http_get(c.node(via).api_addr, "/v1/catalog").map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("HTTP {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| e.to_string())
}

#[test]
fn c_a_drained_node_gives_up_its_copies_while_fio_writes() {
    if !require_tools("drain under fio", &["fio"]) {
        return;
    }
    let c = Cluster::start_with(5, &DEAD_AFTER);
    wait_all_alive(&c, &FIVE);
    let name = "dr";
    c.create_volume(1, name, "64M", 2);
    let holders = voters(&c, 1, name).unwrap();
    let drained = holders[0];
    let via = *FIVE.iter().find(|id| !holders.contains(id)).expect("a node without a copy");
    let json = c.scratch().join("fio-drain.json");
    let uri = c.nbd_uri(via, name);
    let fio = std::thread::spawn(move || {
        run(
            "fio",
            &[
                "--name=drain",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--size=64M",
                "--time_based",
                "--runtime=25",
                "--verify=crc32c",
                "--verify_backlog=64",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
                &format!("--output={}", json.display()),
            ],
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    c.cli(via, &["node", "drain", &drained.to_string(), "--no-wait"]).ok();
    let after = poll(&format!("node {drained} to give up its copy"), LIMIT, || {
        let v = voters(&c, via, name)?;
        if v.contains(&drained) {
            Err(format!("copies on {v:?}"))
        } else {
            Ok(v)
        }
    });
    let took = t.elapsed();
    // The waiting form of the command returns at once now that nothing is left.
    let out = c.cli(via, &["node", "drain", &drained.to_string()]);
    assert!(out.success() && out.stdout.contains("none left"), "drain: {out}");
    assert!(!after.contains(&drained) && after.len() == 3, "copies after the drain: {after:?}");
    let fio = fio.join().expect("fio thread");
    let said = format!("{}{}", fio.stdout, fio.stderr).to_lowercase();
    assert!(fio.success(), "fio failed during the drain: {fio}");
    for needle in ["verify failed", "bad magic", "io_u error"] {
        assert!(!said.contains(needle), "fio complained ({needle}): {fio}");
    }
    let list = c.cli_json(via, &["node", "list"]);
    let copies = list
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == drained))
        .and_then(|n| n["copies"].as_u64());
    assert_eq!(copies, Some(0), "node {drained} still holds copies: {list}");
    println!("MEASURED drain of node {drained} under fio through node {via}: copies {holders:?} -> {after:?} in {took:?}, fio clean");
}

#[test]
fn d_leaders_spread_over_the_nodes_holding_copies() {
    let c = Cluster::start_with(5, &DEAD_AFTER);
    wait_all_alive(&c, &FIVE);
    let names = ["l1", "l2", "l3", "l4", "l5"];
    for name in names {
        c.create_volume(1, name, "16M", 2);
        let v = voters(&c, 1, name).unwrap();
        c.wait_leader(name, &v, LIMIT);
        // Pile every leadership onto node 1 (it holds a copy of each: placement prefers
        // the creating node).
        assert!(v.contains(&1), "{name}: copies on {v:?}");
        c.cli(1, &["volume", "transfer-leader", name, "1"]).ok();
    }
    let t = Instant::now();
    let counts = poll("the leaders to spread", LIMIT, || {
        let mut counts = std::collections::BTreeMap::<u64, usize>::new();
        for name in names {
            let v = voters(&c, 1, name)?;
            let leader = c.try_repl(v[0], name)?.leader;
            if leader == 0 {
                return Err(format!("{name}: no leader"));
            }
            *counts.entry(leader).or_default() += 1;
        }
        if counts.values().max().copied().unwrap_or(0) <= 2 && counts.len() >= 3 {
            Ok(counts)
        } else {
            Err(format!("{counts:?}"))
        }
    });
    println!(
        "MEASURED leader spreading: 5 leaderships piled on node 1 spread to {counts:?} in {:?}",
        t.elapsed()
    );
}

#[test]
fn e_a_create_whose_node_is_killed_midway_leaves_the_volume_once_or_not_at_all() {
    let mut c = Cluster::start_with(3, &DEAD_AFTER);
    wait_all_alive(&c, &[1, 2, 3]);
    for (i, delay_ms) in [0u64, 15, 40, 120].into_iter().enumerate() {
        let name = format!("k{i}");
        let api = c.node(1).api_addr;
        let body = format!("{{\"name\": \"{name}\", \"size\": \"16M\", \"replicas\": 1}}");
        let first = std::thread::spawn(move || raftblk_tests::http_post_json(api, "/v1/volumes", &body));
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.kill9(1);
        let first = first.join().expect("create thread");
        // The client retries elsewhere, as after a timeout, until it gets an answer that is
        // not "try again" (a copy placed on the node that just died is not confirmed: 503).
        let retried = retry_create(&c, 2, &name, "1");
        let uuid = retried["uuid"].as_str().expect("uuid").to_string();
        if let Ok((201, body)) = &first {
            let made: serde_json::Value = serde_json::from_str(body).expect("create answer");
            assert_eq!(
                made["uuid"],
                uuid.as_str(),
                "the retry made a second volume after the first succeeded"
            );
        }
        c.restart(1);
        poll(&format!("every node to hold {name} once, as {uuid}"), LIMIT, || {
            for id in [1, 2, 3] {
                let list = c.cli_json(id, &["volume", "list"]);
                let same: Vec<&serde_json::Value> = list
                    .as_array()
                    .map(|a| a.iter().filter(|v| v["name"] == name.as_str()).collect())
                    .unwrap_or_default();
                if same.len() != 1 || same[0]["uuid"] != uuid.as_str() {
                    return Err(format!("node {id}: {same:?}"));
                }
            }
            Ok(())
        });
        println!(
            "MEASURED create killed after {delay_ms} ms: first attempt {:?}; retry via node 2 -> {uuid}; every node agrees",
            first.as_ref().map(|(code, _)| *code)
        );
    }
}

/// Creates 16 MiB volume `name` through node `via` as a client retrying after a timeout
/// would: again and again while the answer is "try again" (503), failing the test on any
/// other refusal. Returns the volume.
fn retry_create(c: &Cluster, via: u64, name: &str, replicas: &str) -> serde_json::Value {
    poll(&format!("a retried create of {name} to succeed"), LIMIT, || {
        let out = c.cli(via, &["--json", "volume", "create", name, "--size", "16M", "--replicas", replicas]);
        if out.success() {
            Ok(out.json())
        } else if out.stderr.contains("HTTP 503") {
            Err(out.stderr.clone())
        } else {
            panic!("the retried create was refused: {out}")
        }
    })
}

/// The catalog leader as node `via` sees it (`Err` while there is none).
fn catalog_leader(c: &Cluster, via: u64) -> Result<u64, String> {
    let v = catalog_view(c, via)?;
    match v["leader"].as_u64() {
        Some(l) if l != 0 => Ok(l),
        _ => Err(format!("no catalog leader: {v}")),
    }
}

#[test]
fn f_the_catalog_leader_killed_during_a_create_leaves_the_volume_once_or_not_at_all() {
    let mut c = Cluster::start_with(3, &DEAD_AFTER);
    wait_all_alive(&c, &[1, 2, 3]);
    for (i, delay_ms) in [0u64, 5, 20, 60].into_iter().enumerate() {
        let name = format!("cat{i}");
        let leader = poll("a catalog leader", LIMIT, || catalog_leader(&c, 1));
        // The create goes to a node that does not lead the catalog, which forwards the
        // proposal to the leader; the leader dies mid-way.
        let via = [1u64, 2, 3].into_iter().find(|&n| n != leader).expect("another node");
        let api = c.node(via).api_addr;
        let body = format!("{{\"name\": \"{name}\", \"size\": \"16M\", \"replicas\": 0}}");
        let first = std::thread::spawn(move || raftblk_tests::http_post_json(api, "/v1/volumes", &body));
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.kill9(leader);
        let first = first.join().expect("create thread");
        let others: Vec<u64> = [1u64, 2, 3].into_iter().filter(|&n| n != leader).collect();
        let new_leader = poll("a new catalog leader", LIMIT, || {
            catalog_leader(&c, via).and_then(|l| {
                if l == leader {
                    Err("still the old one".into())
                } else {
                    Ok(l)
                }
            })
        });
        // Once or not at all: the surviving nodes agree on whether it exists, and on its uuid.
        let seen = poll(&format!("the survivors to agree on {name}"), LIMIT, || {
            let mut seen = Vec::new();
            for &id in &others {
                let uuids = listed(&c, id, &name);
                if uuids.len() > 1 {
                    panic!("node {id} lists {name} twice: {uuids:?}");
                }
                seen.push(uuids.into_iter().next());
            }
            if seen.windows(2).all(|w| w[0] == w[1]) {
                Ok(seen[0].clone())
            } else {
                Err(format!("nodes {others:?} see {seen:?}"))
            }
        });
        if let Ok((201, body)) = &first {
            let made: serde_json::Value = serde_json::from_str(body).expect("create answer");
            assert_eq!(
                seen.as_deref(),
                Some(made["uuid"].to_string().as_str()),
                "a create answered 201 is not in the catalog after its leader died"
            );
        }
        // The client's retry (through the other survivor) gets the same volume, or makes it.
        let retry_via = others.iter().copied().find(|&n| n != via).expect("a second survivor");
        let retried = retry_create(&c, retry_via, &name, "0");
        let uuid = retried["uuid"].to_string();
        if let Some(existing) = &seen {
            assert_eq!(existing, &uuid, "the retry made a second volume");
        }
        c.restart(leader);
        poll(&format!("every node to hold {name} once"), LIMIT, || {
            for id in [1, 2, 3] {
                let same = listed(&c, id, &name);
                if same != [uuid.clone()] {
                    return Err(format!("node {id}: {same:?}"));
                }
            }
            Ok(())
        });
        println!(
            "MEASURED catalog leader {leader} killed {delay_ms} ms into a create via node {via}: first answer {:?}, \
             existed after: {}, new catalog leader {new_leader}; retry -> {uuid}; every node agrees",
            first.as_ref().map(|(code, _)| *code),
            seen.is_some()
        );
    }
}

/// The uuids (JSON-quoted) of the volumes called `name` that node `id` lists.
fn listed(c: &Cluster, id: u64, name: &str) -> Vec<String> {
    let list = c.cli_json(id, &["volume", "list"]);
    list.as_array()
        .map(|a| a.iter().filter(|v| v["name"] == name).map(|v| v["uuid"].to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn g_a_create_whose_answer_is_lost_is_not_made_twice_by_its_retry() {
    let mut c = Cluster::start_with(3, &DEAD_AFTER);
    wait_all_alive(&c, &[1, 2, 3]);
    let leader = poll("a catalog leader", LIMIT, || catalog_leader(&c, 1));
    let mut others = [1u64, 2, 3].into_iter().filter(|&n| n != leader);
    let (via, third) = (others.next().expect("a node"), others.next().expect("another node"));
    // `via` still reaches the catalog leader, which commits its proposal with `third`, but
    // hears nothing back: the create times out there, as if the answer had been lost.
    c.deafen(via, &[leader]);
    let t = Instant::now();
    let first = c.cli(via, &["--json", "volume", "create", "lost", "--size", "16M", "--replicas", "0"]);
    assert!(
        !first.success() && first.stderr.contains("HTTP 503"),
        "the create should have timed out: {first}"
    );
    let timed_out_after = t.elapsed();
    let committed = poll("the lost create to show on the third node", LIMIT, || {
        let seen = listed(&c, third, "lost");
        if seen.len() == 1 {
            Ok(seen[0].clone())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    // The client retries through another node: it gets the volume the first attempt made.
    let retried = c.cli(third, &["--json", "volume", "create", "lost", "--size", "16M", "--replicas", "0"]);
    assert!(retried.success(), "the retry failed: {retried}");
    assert_eq!(retried.json()["uuid"].to_string(), committed, "the retry made a second volume");
    // The catalog leader dies, `via` hears again: both survivors hold the one volume.
    c.kill9(leader);
    c.heal(via);
    poll("both survivors to hold the volume once", LIMIT, || {
        for id in [via, third] {
            let seen = listed(&c, id, "lost");
            if seen != [committed.clone()] {
                return Err(format!("node {id}: {seen:?}"));
            }
        }
        Ok(())
    });
    println!(
        "MEASURED lost answer: create via node {via} timed out after {timed_out_after:?} (HTTP 503) though committed \
         by catalog leader {leader}; retry via node {third} returned the same volume {committed}; after the leader's \
         kill both survivors list it once"
    );
}

/// Every volume's copies as node `via` lists them, by name, with its health.
fn copies_and_health(c: &Cluster, via: u64) -> Result<Vec<(String, Vec<u64>, String)>, String> {
    let out = c.cli(via, &["--json", "volume", "list"]);
    if !out.success() {
        return Err(format!("node {via}: {out}"));
    }
    let list: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    Ok(list
        .as_array()
        .ok_or("not a list")?
        .iter()
        .map(|v| {
            let voters = v["voters"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect());
            (
                v["name"].as_str().unwrap_or("").to_string(),
                voters.unwrap_or_default(),
                v["health"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// Issue 12's healing target: 20 replicas=2 volumes, every one with a copy on the node that
/// is killed, are all back to three healthy copies within `node_dead_after_s` + 15 s (the
/// healer replaces copies of several volumes at once and never waits on the dead node).
/// `RAFTBLK_HEAL_ROUNDS` (default 1) kills a node this many times in a row, restarting
/// each victim before the next; `tests/heal-rounds.sh` runs the 10 x 10 of the issue.
/// `RAFTBLK_HEAL_LOGS=1` prints every node's log when a round times out (and at the end).
#[test]
fn j_twenty_volumes_heal_within_dead_after_plus_15s() {
    const VOLUMES: usize = 20;
    const BOUND: Duration = Duration::from_secs(5 + 15);
    if !require_tools("healing at scale", &["qemu-io"]) {
        return;
    }
    let rounds: usize = std::env::var("RAFTBLK_HEAL_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let mut c = Cluster::start_with(5, &DEAD_AFTER);
    wait_all_alive(&c, &FIVE);
    // Created through node 1, which placement prefers: every volume has a copy there.
    let names: Vec<String> = (0..VOLUMES).map(|i| format!("s{i:02}")).collect();
    for name in &names {
        c.create_volume(1, name, "32M", 2);
    }
    let pats: Vec<(String, Vec<Pat>)> = names
        .iter()
        .step_by(5)
        .enumerate()
        .map(|(i, n)| (n.clone(), vec![pat(0x50 + i as u8, 0, MIB), pat(0x60 + i as u8, 8 * MIB, 64 * 1024)]))
        .collect();
    for (name, p) in &pats {
        let leader = c.wait_leader(name, &voters(&c, 1, name).unwrap(), LIMIT);
        write_patterns(&c.nbd_uri(leader, name), p);
    }
    let mut victim = 1;
    let mut took = Vec::new();
    for round in 1..=rounds {
        let before = copies_and_health(&c, victim % 5 + 1).expect("the volume list");
        let affected: Vec<&String> =
            before.iter().filter(|(_, v, _)| v.contains(&victim)).map(|(n, _, _)| n).collect();
        assert!(round > 1 || affected.len() == VOLUMES, "node 1 holds copies of {affected:?} only");
        let survivor = *FIVE.iter().find(|&&id| id != victim).expect("a survivor");
        let t = Instant::now();
        c.kill9(victim);
        let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            poll("every volume back to three healthy copies without the killed node", LIMIT, || {
                let now = copies_and_health(&c, survivor)?;
                let short: Vec<String> = now
                    .iter()
                    .filter(|(_, v, h)| v.contains(&victim) || v.len() != 3 || h != "healthy")
                    .map(|(n, v, h)| format!("{n} on {v:?} {h}"))
                    .collect();
                if now.len() == VOLUMES && short.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} of {} not healed: {short:?}", short.len(), now.len()))
                }
            })
        }));
        if let Err(e) = healed {
            if std::env::var("RAFTBLK_HEAL_LOGS").is_ok() {
                c.print_logs(4000);
            }
            std::panic::resume_unwind(e);
        }
        let healed = t.elapsed();
        println!(
            "MEASURED healing round {round}: node {victim} (copies of {} volumes) killed, all back to 3 healthy copies after {healed:?}",
            affected.len()
        );
        took.push(healed);
        for (name, p) in &pats {
            let leader = c.wait_leader(name, &voters(&c, survivor, name).unwrap(), LIMIT);
            assert_patterns_read(&c.nbd_uri(leader, name), p);
        }
        c.restart(victim);
        wait_all_alive(&c, &FIVE);
        // The next victim: the node holding the most copies now.
        let now = copies_and_health(&c, survivor).expect("the volume list");
        victim = *FIVE
            .iter()
            .max_by_key(|id| (now.iter().filter(|(_, v, _)| v.contains(id)).count(), **id))
            .expect("a node");
    }
    if std::env::var("RAFTBLK_HEAL_LOGS").is_ok() {
        c.print_logs(4000);
    }
    let slow: Vec<(usize, Duration)> =
        took.iter().enumerate().filter(|(_, d)| **d > BOUND).map(|(i, d)| (i + 1, *d)).collect();
    assert!(slow.is_empty(), "rounds over the {BOUND:?} bound (round, time): {slow:?}; all: {took:?}");
}
