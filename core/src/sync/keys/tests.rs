#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
//! The fetcher against the service's own paging, in memory: what Envoy's
//! shared data holds after each answer, and what a request then finds.

use super::*;
use crate::policy::table::TableError;
use crate::policy::{self, Policy};
use crate::sync::key_service::KeyService;
use crate::testing::MemStore;
use crate::vkey::{sha256, sha256_hex};
use serde_json::{json, Value};
use std::sync::Arc;

fn doc(keys: &[(&str, bool)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(id, revoked)| {
            json!({"id": id, "key_sha256": sha256_hex(&format!("tg-{id}")), "revoked": revoked, "groups": ["eng"]})
        })
        .collect();
    json!({"version": 1, "groups": {"eng": {"models": ["claude-*"]}}, "keys": keys})
}

/// One call: what the fetcher asks, answered by the service.
fn call(
    fetch: &mut KeyFetch,
    store: &MemStore,
    service: &KeyService,
    limit: usize,
    now: u64,
) -> Option<Applied> {
    let path = fetch.next_call(store, "/v1/keys", now)?;
    let query: std::collections::HashMap<&str, &str> = path
        .split_once('?')
        .unwrap()
        .1
        .split('&')
        .map(|kv| kv.split_once('=').unwrap())
        .collect();
    let epoch = query
        .get("epoch")
        .map(|e| u64::from_str_radix(e, 16).unwrap());
    let since = query["since"].parse().unwrap();
    let served = service.page(epoch, since, query.get("after").copied(), limit);
    let page = Page {
        status: 200,
        epoch: Some(served.epoch),
        generation: Some(served.generation),
        next: served.next.clone(),
        body: served.body().into_bytes(),
    };
    Some(fetch.on_response(store, Some(&page), now))
}

/// Calls until the table is in (a state written), as the filter chains them.
fn fetch_all(
    fetch: &mut KeyFetch,
    store: &MemStore,
    service: &KeyService,
    limit: usize,
) -> (usize, TableState) {
    let mut calls = 0;
    loop {
        calls += 1;
        match call(fetch, store, service, limit, 1_000).unwrap() {
            Applied::Records { state: Some(s), .. } => return (calls, s),
            Applied::Records { state: None, .. } => {}
            Applied::Failed(why) => panic!("{why}"),
        }
    }
}

fn view(d: &Value, store: &MemStore) -> Policy {
    let base = serde_json::to_vec(&policy::table::without_keys(d)).unwrap();
    let (mut p, _) = policy::compile(&base, "p", 0).unwrap();
    p.use_key_table(
        Arc::new(policy::base_of(&base).unwrap()),
        TableState::read(store),
    );
    p
}

fn key_of(p: &Policy, store: &MemStore, id: &str) -> Result<Option<(String, bool)>, TableError> {
    Ok(p.resolve(store, &sha256(format!("tg-{id}").as_bytes()))?
        .and_then(|s| p.key(s.key))
        .map(|k| (k.id.clone(), k.revoked)))
}

#[test]
fn the_whole_table_arrives_in_pages_then_only_what_changed() {
    let store = MemStore::new();
    let mut service = KeyService::new(0xabc);
    let ids: Vec<String> = (0..25).map(|i| format!("k{i}")).collect();
    let d = doc(&ids.iter().map(|i| (i.as_str(), false)).collect::<Vec<_>>());
    service.update(&d);
    let mut fetch = KeyFetch::new("vm1".into());
    assert_eq!(
        key_of(&view(&d, &store), &store, "k3"),
        Err(TableError::NotLoaded)
    );
    let (calls, state) = fetch_all(&mut fetch, &store, &service, 10);
    assert_eq!(calls, 3, "25 records in pages of 10");
    assert_eq!(
        state,
        TableState {
            epoch: 0xabc,
            generation: 1,
            next_epoch: None
        }
    );
    let p = view(&d, &store);
    for id in &ids {
        assert_eq!(key_of(&p, &store, id), Ok(Some((id.clone(), false))));
    }
    // Revoke k3, remove k4, add k25: one call carries the three records.
    let mut changed: Vec<(&str, bool)> = ids.iter().map(|i| (i.as_str(), i == "k3")).collect();
    changed.retain(|(i, _)| *i != "k4");
    changed.push(("k25", false));
    let d2 = doc(&changed);
    assert_eq!(service.update(&d2), 3);
    match call(&mut fetch, &store, &service, 10, 2_000).unwrap() {
        Applied::Records { written, state } => {
            assert_eq!(written, 3);
            assert_eq!(state.unwrap().generation, 2);
        }
        other => panic!("{other:?}"),
    }
    let p = view(&d2, &store);
    assert_eq!(key_of(&p, &store, "k3"), Ok(Some(("k3".into(), true))));
    assert_eq!(key_of(&p, &store, "k4"), Ok(None));
    assert_eq!(key_of(&p, &store, "k25"), Ok(Some(("k25".into(), false))));
    // Nothing changed: the service would hold this call; it says so.
    assert!(service.is_current(Some(0xabc), 2));
}

#[test]
fn a_restarted_service_is_a_new_table_and_old_keys_work_until_it_is_in() {
    let store = MemStore::new();
    let mut old = KeyService::new(1);
    let d = doc(&[("a", false), ("b", false), ("c", false)]);
    old.update(&d);
    let mut fetch = KeyFetch::new("vm1".into());
    fetch_all(&mut fetch, &store, &old, 10);
    // The restarted service lost nothing but its epoch; "c" was removed.
    let mut new = KeyService::new(2);
    let d2 = doc(&[("a", false), ("b", false)]);
    new.update(&d2);
    // First page of the new table: both epochs count meanwhile.
    match call(&mut fetch, &store, &new, 1, 2_000).unwrap() {
        Applied::Records { state: None, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(TableState::read(&*store).unwrap().next_epoch, Some(2));
    let p = view(&d2, &store);
    assert_eq!(key_of(&p, &store, "c"), Ok(Some(("c".into(), false))));
    fetch_all(&mut fetch, &store, &new, 1);
    assert_eq!(
        TableState::read(&*store).unwrap(),
        TableState {
            epoch: 2,
            generation: 1,
            next_epoch: None
        }
    );
    let p = view(&d2, &store);
    assert_eq!(key_of(&p, &store, "c"), Ok(None));
    assert_eq!(key_of(&p, &store, "b"), Ok(Some(("b".into(), false))));
}

#[test]
fn one_vm_fetches_and_a_failed_call_waits_before_the_next() {
    let store = MemStore::new();
    let mut service = KeyService::new(9);
    service.update(&doc(&[("a", false)]));
    let mut vm1 = KeyFetch::new("vm1".into());
    let mut vm2 = KeyFetch::new("vm2".into());
    assert!(vm1.next_call(&*store, "/v1/keys", 1_000).is_some());
    // vm1's call is under way: neither starts another.
    assert_eq!(vm1.next_call(&*store, "/v1/keys", 1_001), None);
    assert_eq!(vm2.next_call(&*store, "/v1/keys", 1_001), None);
    let failed = vm1.on_response(&*store, None, 1_100);
    assert_eq!(
        failed,
        Applied::Failed("no answer from the key service".into())
    );
    assert_eq!(
        vm1.next_call(&*store, "/v1/keys", 1_100 + RETRY_MS - 1),
        None
    );
    assert_eq!(
        vm2.next_call(&*store, "/v1/keys", 1_100 + RETRY_MS - 1),
        None
    );
    let path = vm2
        .next_call(&*store, "/v1/keys", 1_100 + RETRY_MS)
        .unwrap();
    assert_eq!(path, "/v1/keys?since=0");
    // vm2 dies mid-call: its lease runs out and vm1 takes over.
    let later = 1_100 + RETRY_MS + LEASE_MS;
    assert_eq!(vm1.next_call(&*store, "/v1/keys", later - 1), None);
    assert!(vm1.next_call(&*store, "/v1/keys", later + 1).is_some());
    // A service error is a failed call with its words.
    let page = Page {
        status: 503,
        body: b"policy invalid".to_vec(),
        ..Page::default()
    };
    assert_eq!(
        vm1.on_response(&*store, Some(&page), later + 2),
        Applied::Failed("the key service answered 503: policy invalid".into())
    );
}

#[test]
fn a_malformed_page_writes_no_state() {
    let store = MemStore::new();
    let mut fetch = KeyFetch::new("vm1".into());
    fetch.next_call(&*store, "/v1/keys", 0).unwrap();
    let page = Page {
        status: 200,
        epoch: Some(1),
        generation: Some(1),
        next: None,
        body: b"zz {}\n".to_vec(),
    };
    assert_eq!(
        fetch.on_response(&*store, Some(&page), 0),
        Applied::Failed("a malformed hash in the key table".into())
    );
    assert_eq!(TableState::read(&*store), None);
}
