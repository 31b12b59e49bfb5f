//! How a [`RedisStore`](super::RedisStore) reaches Redis: the client for one server or
//! for a cluster's seed nodes, built from the configuration with its TLS settings
//! checked (see "Redis Cluster" and "TLS" in the [module docs](super)).

use redis::RedisError;
use redis::cluster::{ClusterClient, ClusterClientBuilder};

use super::RedisStoreConfig;

/// How the store opens connections: to one server, or to a cluster's nodes.
pub(super) enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl Client {
    /// The client for `config` (checked, not connected). The error is a message for
    /// `StoreError::Unavailable` (it never contains a password).
    pub(super) fn new(config: &RedisStoreConfig) -> Result<Client, String> {
        let endpoint = config.endpoint();
        let invalid = |e: RedisError| format!("invalid Redis configuration {endpoint}: {e}");
        if config.is_cluster() && !config.url.is_empty() {
            return Err(format!(
                "invalid Redis configuration: both a URL ({}) and cluster nodes ({endpoint}); \
                 set one",
                config.redacted_url()
            ));
        }
        let addresses: Vec<&str> = if config.is_cluster() {
            config.cluster_nodes.iter().map(String::as_str).collect()
        } else {
            vec![config.url.as_str()]
        };
        let mut infos = Vec::with_capacity(addresses.len());
        for address in &addresses {
            let info = redis::IntoConnectionInfo::into_connection_info(*address)
                .map_err(|e| format!("invalid Redis URL {}: {e}", super::redact_url(address)))?;
            let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
            if !tls && (config.tls_ca.is_some() || config.tls_client_cert.is_some()) {
                return Err(format!(
                    "a TLS CA or client certificate is set but {} is not a rediss:// URL \
                     (TLS is never optional once configured)",
                    super::redact_url(address)
                ));
            }
            infos.push(info);
        }
        check_pem(config)?;
        let certs = tls_certificates(config);
        if config.is_cluster() {
            if config.key_prefix.contains(['{', '}']) {
                return Err(format!(
                    "the key prefix {:?} contains a brace: on a Redis Cluster the braces \
                     must be the key's hash tag",
                    config.key_prefix
                ));
            }
            // No retries inside the client: a timed-out command would be sent again on
            // the same connection (counted twice, and its late reply would answer the
            // next command). `run_cluster` retries only what is safe, within
            // command_timeout.
            let mut builder = ClusterClientBuilder::new(infos)
                .retries(0)
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.command_timeout);
            if let Some(password) = &config.password {
                builder = builder.password(password);
            }
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            return builder.build().map(Client::Cluster).map_err(invalid);
        }
        let mut info = infos
            .pop()
            .ok_or_else(|| format!("no Redis URL in {endpoint}"))?;
        if let Some(password) = &config.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        match certs {
            None => redis::Client::open(info),
            Some(certs) => redis::Client::build_with_tls(info, certs),
        }
        .map(Client::Single)
        .map_err(invalid)
    }
}

/// Refuses PEM that holds nothing usable: it would fail every handshake, later and
/// less clearly. (The certificates themselves are parsed when connecting.)
fn check_pem(config: &RedisStoreConfig) -> Result<(), String> {
    let has = |pem: &[u8], what: &str| {
        let marker = format!("-----BEGIN {what}");
        pem.windows(marker.len()).any(|w| w == marker.as_bytes())
    };
    if config
        .tls_ca
        .as_ref()
        .is_some_and(|pem| !has(pem, "CERTIFICATE-----"))
    {
        return Err("the TLS CA holds no PEM certificate".into());
    }
    if let Some(c) = &config.tls_client_cert {
        if !has(&c.cert_pem, "CERTIFICATE-----") {
            return Err("the TLS client certificate holds no PEM certificate".into());
        }
        // PRIVATE KEY, RSA PRIVATE KEY, EC PRIVATE KEY.
        if !has(&c.key_pem, "PRIVATE KEY-----")
            && !has(&c.key_pem, "RSA PRIVATE KEY-----")
            && !has(&c.key_pem, "EC PRIVATE KEY-----")
        {
            return Err("the TLS client key holds no PEM private key".into());
        }
    }
    Ok(())
}

/// The CA and client certificate for rustls, if any is configured.
fn tls_certificates(config: &RedisStoreConfig) -> Option<redis::TlsCertificates> {
    if config.tls_ca.is_none() && config.tls_client_cert.is_none() {
        return None;
    }
    Some(redis::TlsCertificates {
        client_tls: config
            .tls_client_cert
            .as_ref()
            .map(|c| redis::ClientTlsConfig {
                client_cert: c.cert_pem.clone(),
                client_key: c.key_pem.clone(),
            }),
        root_cert: config.tls_ca.clone(),
    })
}
