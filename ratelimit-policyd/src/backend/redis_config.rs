//! The Redis store as `[store]` configures it: its [`RedisStoreConfig`], and
//! `import-baselines`, which writes learned baselines into it.

use ratelimit_core::store::{RedisStore, RedisStoreConfig, TimeSource};

use crate::config::Backend as BackendConfig;

/// The [`RedisStoreConfig`] of a Redis `[store]` (`None` for the memory store).
pub fn redis_store_config(backend: &BackendConfig) -> Option<RedisStoreConfig> {
    let BackendConfig::Redis {
        url,
        cluster_nodes,
        tls,
        password,
        key_prefix,
        connect_timeout,
        command_timeout,
        server_time,
        batch,
    } = backend
    else {
        return None;
    };
    let mut rc = if cluster_nodes.is_empty() {
        RedisStoreConfig::new(url.clone())
    } else {
        RedisStoreConfig::cluster(cluster_nodes.iter().cloned())
    };
    rc.tls_ca = tls.ca.clone();
    rc.tls_client_cert =
        tls.client
            .as_ref()
            .map(|(cert, key)| ratelimit_core::store::redis::TlsClientCert {
                cert_pem: cert.clone(),
                key_pem: key.expose().as_bytes().to_vec(),
            });
    rc.password = password.as_ref().map(|p| p.expose().to_string());
    rc.key_prefix = key_prefix.clone();
    rc.connect_timeout = *connect_timeout;
    rc.command_timeout = *command_timeout;
    rc.batch = *batch;
    rc.time_source = if *server_time {
        TimeSource::Server
    } else {
        TimeSource::Caller
    };
    Some(rc)
}

/// `import-baselines`: writes the baselines of the snapshot `file` into the Redis
/// store `cfg` names; the line to print, or what was wrong.
pub fn import_baselines(
    cfg: &crate::config::Config,
    file: &std::path::Path,
    replace: bool,
) -> Result<String, String> {
    let Some(rc) = redis_store_config(&cfg.store.backend) else {
        return Err(format!(
            "{}: [store] backend is \"memory\": day-one baselines for the memory store are \
             its snapshot (copy the file to snapshot_path + \".baseline\")",
            cfg.source
        ));
    };
    let Some(baseline) = cfg.baseline.any() else {
        return Err(format!(
            "{}: no [baseline] section: nothing would use them",
            cfg.source
        ));
    };
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let states =
        ratelimit_core::store::decode_baselines(&bytes, file).map_err(|e| e.to_string())?;
    let store = RedisStore::new(rc).map_err(|e| e.to_string())?;
    let done = store
        .import_baselines(&states, &baseline, replace)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "imported {} baselines from {} into Redis at {} ({} kept: already there{})",
        done.written,
        file.display(),
        store.config().endpoint(),
        done.kept,
        if replace {
            ""
        } else {
            "; --replace overwrites them"
        }
    ))
}
