//! The service as deployed: several instances on one Redis, gRPC over
//! TCP, and Redis failing under it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tollgate_quota::grpc::quota_client::QuotaClient;
use tollgate_quota::testing::{inspect, RedisServer};
use tollgate_quota::tollgate_proto::quota::v1::admit_response::Outcome;
use tollgate_quota::{serve, QuotaService, Settings};

#[tokio::test]
async fn two_service_instances_on_one_redis_are_interchangeable() {
    let s = Setup::manual();
    let (q1, q2) = (s.quota.clone(), s.another());
    let tpm = per_minute("key:tess:tokens_per_minute", 1000);

    // An Admit retried on the other instance gets the first answer.
    let first = q1
        .admit(admit_req("r1", vec![charge(&tpm, 100)]))
        .await
        .unwrap();
    let retried = q2
        .admit(admit_req("r1", vec![charge(&tpm, 100)]))
        .await
        .unwrap();
    assert_eq!(retried, first);
    // Settled on one, the retry on the other is a duplicate.
    assert!(
        q2.settle(settle_req("r1", vec![charge(&tpm, -40)]))
            .await
            .unwrap()
            .applied
    );
    assert!(
        !q1.settle(settle_req("r1", vec![charge(&tpm, -40)]))
            .await
            .unwrap()
            .applied
    );
    // A sync retried on the other instance: the same grant, applied once.
    let g1 = q1
        .sync(sync_req("envoy-a", vec![bsync(&tpm, 1, 0, 100)]))
        .await
        .unwrap();
    let g2 = q2
        .sync(sync_req("envoy-a", vec![bsync(&tpm, 1, 0, 100)]))
        .await
        .unwrap();
    assert_eq!(g2.grants, g1.grants);
    let stored = inspect(&s.client(), &tpm.id).await.unwrap();
    // 1000 - 100 + 40 - lease 100.
    assert_eq!((stored.value, stored.leased), (840.0, 100));
    // Each instance sees what the other did.
    let r = q2
        .admit(admit_req("r2", vec![charge(&tpm, 0)]))
        .await
        .unwrap();
    assert_eq!(remaining(&r), vec![840.0]);
}

async fn start_server(
    quota: QuotaService,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, quota, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (url, stop, task)
}

#[tokio::test]
async fn serves_grpc_from_two_replicas_and_stops_on_shutdown() {
    let redis = RedisServer::start().unwrap();
    let make = || QuotaService::new(redis.client().unwrap(), Settings::default()).unwrap();
    let (url1, stop1, task1) = start_server(make()).await;
    let (url2, stop2, task2) = start_server(make()).await;
    let mut c1 = QuotaClient::connect(url1).await.unwrap();
    let mut c2 = QuotaClient::connect(url2).await.unwrap();
    let rpm = per_minute("key:uma:requests_per_minute", 2);

    let a = c1
        .admit(admit_req("r1", vec![charge(&rpm, 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&a), Outcome::Admitted);
    let b = c2
        .admit(admit_req("r2", vec![charge(&rpm, 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&b), Outcome::Admitted);
    let c = c1
        .admit(admit_req("r3", vec![charge(&rpm, 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcome(&c),
        Outcome::Limited,
        "one bucket behind both replicas"
    );
    // Errors cross the wire with their code and text.
    let err = c2.admit(admit_req("", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "request_id is empty");

    stop1.send(()).unwrap();
    stop2.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task1)
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), task2)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn redis_down_is_unavailable_and_a_restarted_redis_gets_the_scripts_again() {
    let redis = RedisServer::start().unwrap();
    let port = redis.port();
    let settings = Settings {
        redis_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let quota = QuotaService::new(redis.client().unwrap(), settings).unwrap();
    let rpm = per_minute("key:vic:requests_per_minute", 10);
    let r = quota
        .admit(admit_req("r1", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);

    drop(redis);
    let started = Instant::now();
    let err = quota
        .admit(admit_req("r2", vec![charge(&rpm, 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().starts_with("quota store unavailable: "),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered in {:?}",
        started.elapsed()
    );

    // Redis comes back empty (no persistence, no scripts): the service
    // reconnects, meets NOSCRIPT, loads the scripts and answers.
    let _redis = RedisServer::start_on(port).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        match quota.admit(admit_req("r3", vec![charge(&rpm, 1)])).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery within 10 s: {e}"),
        }
    };
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![9.0], "a fresh bucket in the new Redis");
}

#[tokio::test]
async fn flushed_scripts_are_loaded_again() {
    let s = Setup::manual();
    let rpm = per_minute("key:wes:requests_per_minute", 10);
    s.quota
        .admit(admit_req("r1", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    let mut conn = s.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = s
        .quota
        .admit(admit_req("r2", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    assert_eq!(remaining(&r), vec![8.0]);
    let g = s
        .quota
        .sync(sync_req("a", vec![bsync(&rpm, 1, 0, 1)]))
        .await
        .unwrap();
    assert_eq!(g.grants[0].lease, 1);
}

#[tokio::test]
async fn a_redis_that_never_answers_is_unavailable_at_once() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let quota = QuotaService::new(client, Settings::default()).unwrap();
    let started = Instant::now();
    let err = quota.ping().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().starts_with("quota store unavailable: "),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn a_script_failure_is_internal() {
    let s = Setup::manual();
    let rpm = per_minute("key:xan:requests_per_minute", 10);
    // Something else wrote a bucket's key: not a Redis outage but our bug
    // or a foreign writer, reported as such.
    let mut conn = s.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg("tg:{tg}:b:key:xan:requests_per_minute")
        .arg(&["k", "1", "v", "garbage", "t", "0", "l", "0", "x", "0"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = s
        .quota
        .admit(admit_req("r", vec![charge(&rpm, 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(
        err.message().starts_with("quota script failed: "),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_foreign_value_on_our_key_is_internal() {
    let s = Setup::manual();
    let rpm = per_minute("key:yul:requests_per_minute", 10);
    let mut conn = s.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("tg:{tg}:b:key:yul:requests_per_minute")
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = s
        .quota
        .admit(admit_req("r", vec![charge(&rpm, 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(err.message().contains("WRONGTYPE"), "{}", err.message());
}

#[tokio::test]
async fn a_read_only_redis_is_unavailable() {
    // A replica (of a primary that is not there) refuses writes, as a
    // demoted primary does during a failover.
    let s = Setup::manual();
    let mut conn = s.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = s
        .quota
        .admit(admit_req("r", vec![charge(&per_minute("k", 10), 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().starts_with("quota store unavailable: ")
            && err
                .message()
                .contains("You can't write against a read only replica"),
        "{}",
        err.message()
    );
}
