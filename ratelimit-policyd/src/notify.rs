//! The systemd readiness protocol (`sd_notify`): one datagram, such as `READY=1`, to
//! the Unix socket named in `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket). Without the variable (not started by systemd with `Type=notify`)
//! nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (`"READY=1"`, `"STOPPING=1"`) to the service manager. `Ok(false)`
/// when there is none to tell (`NOTIFY_SOCKET` unset or empty).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&socket, name, state)?;
    } else {
        socket.send_to(state.as_bytes(), &target)?;
    }
    Ok(true)
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract NOTIFY_SOCKET names exist only on Linux",
    ))
}

/// Tells the service manager, logging (not failing) when it cannot be told.
pub fn tell(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "told the service manager"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(state, error = %e, "cannot notify the service manager (NOTIFY_SOCKET)")
        }
    }
}
