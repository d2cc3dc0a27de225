//! The Redis store over TLS (`rediss://` and `rediss+cluster://`, feature
//! `tls`) against a `redis-server`, and a Redis Cluster, started with TLS on
//! loopback, with a certificate authority and a server certificate this
//! test generates.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use idem_core::store::StoreErrorKind;
use idem_core::store::redis::RedisStoreBuilder;
use idem_core::{Fingerprint, Idempotency, Key, RedisStore, Settings};
use idem_test::process::free_port;
use idem_test::redis_server::{self, RedisCluster, RedisServer};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA, and a certificate it signed for `127.0.0.1` and `localhost`, as
/// PEM files in `dir`; answers the CA's PEM.
fn certificates(dir: &Path) -> String {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "idem test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let server = server.signed_by(&server_key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca.pem()
}

/// A server listening with TLS on the returned port (and in plain text on
/// its own, for the harness's readiness check).
fn tls_server(dir: &Path) -> (RedisServer, u16) {
    let port = free_port();
    let server = RedisServer::start_with(&as_strs(&tls_args(dir, port)));
    (server, port)
}

/// The `redis-server` arguments for TLS on `port`, with the certificates in
/// `dir`, clients not asked for theirs.
fn tls_args(dir: &Path, port: u16) -> Vec<String> {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    vec![
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path("server.pem"),
        "--tls-key-file".into(),
        path("server.key"),
        "--tls-ca-cert-file".into(),
        path("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn rediss_connects_with_the_servers_ca_and_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let (_server, port) = tls_server(dir.path());

    let store = RedisStore::node(format!("rediss://127.0.0.1:{port}"))
        .tls_root_certificate(ca)
        .connect()
        .await
        .expect("a TLS connection");
    let idem = Idempotency::new(store);
    let key = Key::new("tls.charge", &"order-1").unwrap();
    let fingerprint = Fingerprint::of(&100).unwrap();
    let mut runs = 0;
    for _ in 0..3 {
        let receipt: u32 = idem
            .run(&Settings::default(), key, fingerprint, async {
                runs += 1;
                Ok::<_, idem_core::Error>(7)
            })
            .await
            .unwrap();
        assert_eq!(receipt, 7);
    }
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn a_server_certificate_nobody_trusts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (_server, port) = tls_server(dir.path());

    // The system's roots do not include the test's CA.
    let refused = RedisStore::node(format!("rediss://127.0.0.1:{port}"))
        .connection_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect_err("an untrusted certificate");
    assert_eq!(refused.kind(), StoreErrorKind::Unavailable, "{refused}");

    // Another CA is not this server's either.
    let other = tempfile::tempdir().unwrap();
    let other_ca = certificates(other.path());
    let refused = RedisStore::node(format!("rediss://127.0.0.1:{port}"))
        .tls_root_certificate(other_ca)
        .connect()
        .await
        .expect_err("a certificate of another CA");
    assert_eq!(refused.kind(), StoreErrorKind::Unavailable, "{refused}");
}

#[tokio::test]
async fn a_plain_text_client_does_not_reach_a_tls_port() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (_server, port) = tls_server(dir.path());
    let store = RedisStore::node(format!("redis://127.0.0.1:{port}"))
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .connect()
        .await;
    assert!(store.is_err(), "redis:// must not talk to a TLS port");
}

/// A Redis Cluster of three primaries that speak TLS to clients and to each
/// other (`tls-cluster yes`), created over TLS; answers the cluster and its
/// TLS ports. Each node keeps a plain-text port for the harness, where it
/// announces plain-text ports, while TLS clients are told TLS ports.
fn tls_cluster(dir: &Path) -> (RedisCluster, Vec<u16>) {
    let (mut nodes, mut ports) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        // The cluster bus listens on the TLS port + 10000: free too.
        let port = redis_server::free_port();
        let mut args = tls_args(dir, port);
        args.extend(
            ["--tls-cluster", "yes", "--tls-replication", "yes"]
                .into_iter()
                .chain(RedisCluster::NODE_ARGS)
                .map(String::from),
        );
        nodes.push(RedisServer::start_with(&as_strs(&args)));
        ports.push(port);
    }
    let ca = dir.join("ca.pem");
    let output = Command::new(redis_server::cli_binary())
        .args([
            "--tls",
            "--cacert",
            ca.to_str().unwrap(),
            "--cluster",
            "create",
        ])
        .args(ports.iter().map(|port| format!("127.0.0.1:{port}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        output.status.success(),
        "redis-cli --tls --cluster create failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let cluster = RedisCluster { nodes };
    cluster.wait_until_ok();
    (cluster, ports)
}

#[tokio::test]
async fn a_tls_cluster_is_reached_on_every_primary_and_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let (cluster, ports) = tls_cluster(dir.path());

    // The URL form reaches the nodes over TLS: here their certificate is
    // not trusted (the test's CA is not a system root), which is a refusal
    // to connect, not a configuration error.
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let untrusted = Idempotency::connect(&format!("rediss+cluster://{}", hosts.join(",")))
        .await
        .expect_err("the test's CA is not trusted by default");
    assert_eq!(untrusted.kind(), StoreErrorKind::Unavailable, "{untrusted}");

    let store = RedisStore::cluster(ports.iter().map(|p| format!("rediss://127.0.0.1:{p}")))
        .tls_root_certificate(ca)
        .connect()
        .await
        .expect("a TLS cluster connection");
    let idem = Idempotency::new(store);
    let mut runs = 0;
    for order in 0..30 {
        let key = Key::new("tls.cluster.charge", &order).unwrap();
        let fingerprint = Fingerprint::of(&100).unwrap();
        for _ in 0..2 {
            let receipt: u32 = idem
                .run(&Settings::default(), key, fingerprint, async {
                    runs += 1;
                    Ok::<_, idem_core::Error>(order)
                })
                .await
                .unwrap();
            assert_eq!(receipt, order);
        }
    }
    assert_eq!(runs, 30, "each key ran once");
    // 30 keys spread over the slots: every primary was reached over TLS,
    // by redirection from the first.
    for node in &cluster.nodes {
        let keys: u64 = node.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 0, "a primary holds no record");
    }
}

/// TLS material the connection could not use is a `Config` error when the
/// store is built, naming the setting, not a server that looks down.
#[test]
fn tls_material_that_cannot_be_used_is_refused_when_built() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
    let url = "rediss://127.0.0.1:6379";
    let refused = |store: RedisStoreBuilder, says: &str| {
        let error = store.connect_lazy().expect_err(says);
        assert_eq!(error.kind(), StoreErrorKind::Config, "{error}");
        assert!(error.to_string().contains(says), "{error}");
    };
    // A path where the PEM text belongs, nothing, and text that is not PEM.
    let path = dir.path().join("ca.pem").display().to_string();
    for root in [path.as_str(), "", "not a certificate"] {
        refused(
            RedisStore::node(url).tls_root_certificate(root),
            "`tls_root_certificate` (PEM text: the file's contents",
        );
    }
    refused(
        RedisStore::node(url).tls_root_certificate(&ca[..ca.len() / 2]),
        "does not parse",
    );
    refused(
        RedisStore::cluster([url]).tls_root_certificate(""),
        "holds no `-----BEGIN CERTIFICATE-----` section",
    );
    refused(
        RedisStore::node(url).tls_client_certificate("", key.clone()),
        "`tls_client_certificate`",
    );
    refused(
        RedisStore::node(url).tls_client_certificate(ca.clone(), "no key"),
        "holds no private key",
    );
    // Certificates for an address without TLS: it would not use them.
    refused(
        RedisStore::node("redis://127.0.0.1:6379").tls_root_certificate(ca.clone()),
        "which does not use TLS",
    );
    // What a TLS connection can use is accepted.
    RedisStore::node(url)
        .tls_root_certificate(ca.clone())
        .tls_client_certificate(ca, key)
        .connect_lazy()
        .expect("PEM certificates and a PEM key");
}
