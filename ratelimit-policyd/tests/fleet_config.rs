//! `[store]` keys for a fleet: `redis_cluster_nodes`, `redis_ca_file`,
//! `redis_client_cert_file`, `redis_client_key_file`: what they build, and the errors
//! (`file:line: store.KEY: message`) for combinations that cannot work.

use ratelimit_policyd::config::{Backend, describe, load};

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n";

/// A directory holding the PEM files and `t.toml` with `store` as its `[store]`.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), CERT).unwrap();
        std::fs::write(dir.path().join("client.pem"), CERT).unwrap();
        std::fs::write(dir.path().join("client.key"), KEY).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not pem\n").unwrap();
        Dir(dir)
    }

    fn load(&self, store: &str) -> Result<ratelimit_policyd::config::Config, String> {
        let p = self.0.path().join("t.toml");
        std::fs::write(&p, format!("[store]\nbackend = \"redis\"\n{store}")).unwrap();
        load(&p).map_err(|e| e.to_string())
    }

    fn error(&self, store: &str) -> String {
        match self.load(store) {
            Err(e) => e,
            Ok(c) => panic!("accepted {store:?}: {:?}", c.store),
        }
    }
}

#[test]
fn cluster_nodes_and_tls_files_are_read() {
    let dir = Dir::new();
    let c = dir
        .load(
            "redis_cluster_nodes = [\"rediss://10.0.0.1:7000\", \"rediss://:pw@10.0.0.2:7000\"]\n\
             redis_ca_file = \"ca.pem\"\n\
             redis_client_cert_file = \"client.pem\"\n\
             redis_client_key_file = \"client.key\"\n",
        )
        .unwrap();
    let Backend::Redis {
        url,
        cluster_nodes,
        tls,
        ..
    } = &c.store.backend
    else {
        panic!("not redis: {:?}", c.store.backend);
    };
    assert_eq!(url, "");
    assert_eq!(cluster_nodes.len(), 2);
    assert_eq!(tls.ca.as_deref(), Some(CERT.as_bytes()));
    let (cert, key) = tls.client.as_ref().unwrap();
    assert_eq!(cert, CERT.as_bytes());
    assert_eq!(key.expose(), KEY.trim_end());
    // The key never shows in Debug; the summary hides passwords in URLs too.
    let debug = format!("{:?}", c.store);
    assert!(!debug.contains("MIGH"), "{debug}");
    let text = describe(&c);
    assert!(
        text.contains(
            "store: redis cluster rediss://10.0.0.1:7000,rediss://:***@10.0.0.2:7000 \
             with the CA from redis_ca_file with a client certificate"
        ),
        "{text}"
    );

    // One server over TLS.
    let c = dir
        .load("redis_url = \"rediss://cache:6380/\"\nredis_ca_file = \"ca.pem\"\n")
        .unwrap();
    let Backend::Redis { cluster_nodes, .. } = &c.store.backend else {
        panic!("not redis");
    };
    assert!(cluster_nodes.is_empty());
}

#[test]
fn impossible_combinations_name_the_key_and_line() {
    let dir = Dir::new();
    let nodes = "redis_cluster_nodes = [\"redis://a:7000\", \"redis://b:7000\"]\n";
    for (store, want) in [
        (
            format!("redis_url = \"redis://a/\"\n{nodes}"),
            ":4: store.redis_cluster_nodes: set redis_url (one server) or redis_cluster_nodes (a cluster), not both",
        ),
        (
            "redis_cluster_nodes = []\n".into(),
            ":3: store.redis_cluster_nodes: must list at least one seed node",
        ),
        (
            "redis_cluster_nodes = [\"http://a:7000\"]\n".into(),
            ":3: store.redis_cluster_nodes: \"http://a:7000\": expected redis://host:port or rediss://host:port",
        ),
        (
            "redis_cluster_nodes = [\"rediss://a:7000\", \"redis://b:7000\"]\n".into(),
            ":3: store.redis_cluster_nodes: mixes redis:// and rediss://",
        ),
        (
            "redis_url = \"redis://a/\"\nredis_ca_file = \"ca.pem\"\n".into(),
            ":4: store.redis_ca_file: needs rediss:// (TLS), but redis_url uses redis://",
        ),
        (
            "redis_ca_file = \"ca.pem\"\n".into(),
            ":3: store.redis_ca_file: needs rediss:// (TLS), but redis_url uses redis://",
        ),
        (
            format!("{nodes}redis_client_cert_file = \"client.pem\"\nredis_client_key_file = \"client.key\"\n"),
            ":4: store.redis_client_cert_file: needs rediss:// (TLS), but redis_cluster_nodes uses redis://",
        ),
        (
            "redis_url = \"rediss://a/\"\nredis_client_cert_file = \"client.pem\"\n".into(),
            ":4: store.redis_client_cert_file: needs redis_client_key_file too",
        ),
        (
            "redis_url = \"rediss://a/\"\nredis_client_key_file = \"client.key\"\n".into(),
            ":4: store.redis_client_key_file: needs redis_client_cert_file too",
        ),
        (
            "redis_url = \"rediss://a/\"\nredis_ca_file = \"missing.pem\"\n".into(),
            ":4: store.redis_ca_file: cannot read ",
        ),
        (
            "redis_url = \"rediss://a/\"\nredis_ca_file = \"junk.pem\"\n".into(),
            "junk.pem holds no PEM CERTIFICATE",
        ),
        (
            "redis_url = \"rediss://a/\"\nredis_client_cert_file = \"client.pem\"\nredis_client_key_file = \"junk.pem\"\n".into(),
            ":5: store.redis_client_key_file: holds no PEM PRIVATE KEY",
        ),
        (
            format!("{nodes}redis_key_prefix = \"rl{{x}}:\"\n"),
            "store.redis_key_prefix: must not contain { or } with redis_cluster_nodes",
        ),
        (
            "redis_cluster_nodes = [\"redis://:pw@a:7000\"]\nredis_password_file = \"ca.pem\"\n"
                .into(),
            ":4: store.redis_password_file: redis_cluster_nodes has a password too",
        ),
    ] {
        let e = dir.error(&store);
        assert!(e.contains("t.toml"), "{e}");
        assert!(e.contains(want), "{store:?}\n  got: {e}\n want: {want}");
    }
    // A brace in the prefix is fine for one server.
    dir.load("redis_key_prefix = \"rl{x}:\"\n").unwrap();
}

#[test]
fn redis_batch_is_read_shown_and_refused_on_a_cluster() {
    let dir = Dir::new();
    let c = dir
        .load("redis_url = \"redis://127.0.0.1:6379/\"\nredis_batch = true\n")
        .unwrap();
    let Backend::Redis { batch, .. } = &c.store.backend else {
        panic!("not redis");
    };
    assert!(*batch);
    let text = describe(&c);
    assert!(text.contains("server time, batched)"), "{text}");
    let c = dir
        .load("redis_url = \"redis://127.0.0.1:6379/\"\n")
        .unwrap();
    let Backend::Redis { batch, .. } = &c.store.backend else {
        panic!("not redis");
    };
    assert!(!*batch, "off by default");
    let e = dir.error("redis_cluster_nodes = [\"redis://10.0.0.1:7000\"]\nredis_batch = true\n");
    assert!(
        e.ends_with(
            "t.toml:4: store.redis_batch: works with one server (redis_url), not with \
             redis_cluster_nodes"
        ),
        "{e}"
    );
}
